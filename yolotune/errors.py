"""The one error a user's mistake raises: it names the key, the value and what is allowed."""


class ConfigError(ValueError):
    def __init__(self, key: str, value: object, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r}: {allowed}")
