"""The search space: typed distributions parsed from the config, and their Ray Tune domains.

Bounds, as docs/configuration/space.md states them:
  uniform(low, high)         float in [low, high]
  loguniform(low, high)      float in [low, high], log-spaced, low > 0
  quniform(low, high, q)     float in [low, high], a multiple of q
  randint(low, high)         int in [low, high]  (inclusive, unlike Ray's randint)
  qrandint(low, high, q)     int in [low, high], a multiple of q (inclusive, as Ray's)
  choice(values)             one of values
  grid(values)               every one of values (a grid search over them)
"""

from __future__ import annotations

import ast
import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional

from yolotune.errors import ConfigError

RANGE_DISTS = ("uniform", "loguniform", "quniform", "randint", "qrandint")
VALUE_DISTS = ("choice", "grid")
DISTS = RANGE_DISTS + VALUE_DISTS
_Q_DISTS = ("quniform", "qrandint")
_FIELDS = {"dist", "low", "high", "q", "values"}
_SUGAR = re.compile(r"^\s*(\w+)\s*\((.*)\)\s*$", re.S)
_PYTHON_LITERALS = re.compile(r"\b(true|false|null)\b")  # YAML's spellings, as users write them in YAML files


@dataclass(frozen=True)
class Dist:
    dist: str
    low: Optional[float] = None
    high: Optional[float] = None
    q: Optional[float] = None
    values: Optional[List[Any]] = None

    def covering(self, sampled: Iterable[Any]) -> "Dist":
        """This distribution widened to hold every value in ``sampled``, as the trials' recorded values may
        lie outside it (PBT moves values past the bounds; a space edited before a resume may lack one):
        a range's bounds, a choice's values (those not declared after the declared ones, by their text)."""
        sampled = list(sampled)
        if self.values is not None:
            declared = {str(v) for v in self.values}
            extra = {str(v): v for v in sampled if str(v) not in declared}
            return dataclasses.replace(self, values=[*self.values, *(extra[k] for k in sorted(extra))])
        return dataclasses.replace(self, low=min([self.low, *sampled]), high=max([self.high, *sampled]))


def parse_dist(key: str, spec: Any) -> Dist:
    """A mapping ``{dist: uniform, low: 0, high: 1}`` or the string ``uniform(0, 1)`` -> Dist."""
    if isinstance(spec, str):
        spec = _parse_sugar(key, spec)
    if not isinstance(spec, dict):
        raise ConfigError(key, spec, "a space entry is a mapping like {dist: uniform, low: 0.0, high: 1.0} "
                                     "or a string like uniform(0.0, 1.0)")
    unknown = sorted(set(spec) - _FIELDS)
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}", spec[unknown[0]], f"allowed fields: {', '.join(sorted(_FIELDS))}")
    dist = spec.get("dist")
    if dist not in DISTS:
        raise ConfigError(f"{key}.dist", dist, f"allowed: {', '.join(DISTS)}")
    if dist in VALUE_DISTS:
        values = spec.get("values")
        if not isinstance(values, (list, tuple)) or len(values) == 0:
            raise ConfigError(f"{key}.values", values, f"{dist} needs a non-empty list of values")
        return Dist(dist, values=list(values))
    low, high = _number(key, "low", spec.get("low")), _number(key, "high", spec.get("high"))
    if low >= high:
        raise ConfigError(f"{key}.low", low, f"must be < {key}.high ({high})")
    if dist == "loguniform" and low <= 0:
        raise ConfigError(f"{key}.low", low, "loguniform needs low > 0")
    if dist in ("randint", "qrandint") and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError(f"{key}.low", low, f"{dist} needs integer low and high")
    q = None
    if dist in _Q_DISTS:
        q = _number(key, "q", spec.get("q"))
        if q <= 0 or (dist == "qrandint" and not float(q).is_integer()):
            raise ConfigError(f"{key}.q", q, "an integer > 0" if dist == "qrandint" else "a number > 0")
        for field in ("low", "high"):  # Ray rounds samples to multiples of q: off-grid bounds would be left
            bound = spec[field]
            if abs(round(bound / q) * q - bound) > 1e-9 * max(1.0, abs(bound)):
                raise ConfigError(f"{key}.{field}", bound, f"a multiple of q ({q}), so that samples stay in "
                                                           "[low, high]")
    if dist in ("randint", "qrandint"):
        low, high = int(low), int(high)
        q = int(q) if q is not None else None
    return Dist(dist, low, high, q)


def parse_space(space: Dict[str, Any], prefix: str = "space") -> Dict[str, Dist]:
    return {name: parse_dist(f"{prefix}.{name}", spec) for name, spec in space.items()}


def _number(key: str, field: str, value: Any) -> float:
    if value is None:
        raise ConfigError(f"{key}.{field}", None, "missing: the distribution needs low and high (and q for "
                                                  "quniform and qrandint)")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key}.{field}", value, "a finite number")
    return value


def _parse_sugar(key: str, text: str) -> Dict[str, Any]:
    """``loguniform(1e-5, 1e-1)`` -> mapping, with ast.literal_eval (never eval)."""
    match = _SUGAR.match(text)
    if not match:
        raise ConfigError(key, text, f"expected DIST(args), e.g. uniform(0.0, 1.0); DIST one of {', '.join(DISTS)}")
    dist, args_text = match.groups()
    if dist not in DISTS:  # parse_dist refuses it, naming the allowed ones, before any argument is read
        return {"dist": dist}
    args_text = _PYTHON_LITERALS.sub(lambda m: {"true": "True", "false": "False", "null": "None"}[m.group(0)], args_text)
    try:
        args = ast.literal_eval(f"({args_text},)") if args_text.strip() else ()
    except (ValueError, SyntaxError):
        raise ConfigError(key, text, "arguments must be literal numbers or a list of literals") from None
    if dist in VALUE_DISTS:
        values = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else list(args)
        return {"dist": dist, "values": list(values)}
    names = ["low", "high", "q"] if dist in _Q_DISTS else ["low", "high"]
    if len(args) != len(names):
        raise ConfigError(key, text, f"{dist} takes ({', '.join(names)})")
    return {"dist": dist, **dict(zip(names, args))}


def to_ray(dist: Dist):
    """The Ray Tune domain for a Dist (imports Ray, so call it at run time only)."""
    from ray import tune

    if dist.dist == "uniform":
        return tune.uniform(dist.low, dist.high)
    if dist.dist == "loguniform":
        return tune.loguniform(dist.low, dist.high)
    if dist.dist == "quniform":
        return tune.quniform(dist.low, dist.high, dist.q)
    if dist.dist == "randint":
        return tune.randint(dist.low, dist.high + 1)  # Ray's upper bound is exclusive; ours is not
    if dist.dist == "qrandint":
        return tune.qrandint(dist.low, dist.high, dist.q)  # Ray's qrandint already includes high
    if dist.dist == "choice":
        return tune.choice(dist.values)
    return tune.grid_search(dist.values)


def to_ray_space(space: Dict[str, Dist]) -> Dict[str, Any]:
    return {name: to_ray(dist) for name, dist in space.items()}


def from_ray(key: str, domain: Any) -> Dict[str, Any]:
    """A Ray Tune domain (as the guide's ``space={"lr0": tune.uniform(...)}``) -> a config mapping."""
    from ray.tune.search.sample import Categorical, Float, Integer, LogUniform, Normal, Quantized

    if isinstance(domain, dict) and set(domain) == {"grid_search"}:
        return {"dist": "grid", "values": list(domain["grid_search"])}
    if isinstance(domain, Categorical):
        return {"dist": "choice", "values": list(domain.categories)}
    sampler = domain.get_sampler() if isinstance(domain, (Float, Integer)) else None
    quantized = isinstance(sampler, Quantized)
    base = sampler.sampler if quantized else sampler
    if isinstance(base, Normal):
        raise ConfigError(key, ray_call(domain), "a normal distribution is not supported; use uniform or loguniform")
    if isinstance(domain, Float):
        if isinstance(base, LogUniform):
            if quantized:
                raise ConfigError(key, ray_call(domain), "qloguniform is not supported; use loguniform")
            return {"dist": "loguniform", "low": domain.lower, "high": domain.upper}
        if quantized:
            return {"dist": "quniform", "low": domain.lower, "high": domain.upper, "q": sampler.q}
        return {"dist": "uniform", "low": domain.lower, "high": domain.upper}
    if isinstance(domain, Integer):
        if isinstance(base, LogUniform):
            raise ConfigError(key, ray_call(domain), "lograndint is not supported; use randint or qrandint")
        if quantized:
            return {"dist": "qrandint", "low": domain.lower, "high": domain.upper, "q": sampler.q}
        return {"dist": "randint", "low": domain.lower, "high": domain.upper - 1}
    raise ConfigError(key, ray_call(domain), "a Ray Tune domain (tune.uniform, loguniform, quniform, randint, "
                                             "qrandint, choice, grid_search) or a yolotune space mapping")


def ray_call(domain: Any) -> Any:
    """A Ray Tune domain as the call that made it (``tune.qloguniform(1e-05, 0.1, 1e-05)``): its repr
    only names its class and address. Anything else as it is."""
    from ray.tune.search.sample import Float, Function, Integer, LogUniform, Normal, Quantized

    if isinstance(domain, Function):
        return f"tune.sample_from({getattr(domain.func, '__qualname__', domain.func)})"
    if not isinstance(domain, (Float, Integer)):
        return domain
    sampler, q = domain.get_sampler(), None
    if isinstance(sampler, Quantized):
        sampler, q = sampler.sampler, sampler.q
    if isinstance(sampler, Normal):
        name, args = "randn", [sampler.mean, sampler.sd]
    else:
        log = "log" if isinstance(sampler, LogUniform) else ""
        name = log + ("uniform" if isinstance(domain, Float) else "randint")
        args = [domain.lower, domain.upper]
    args += [q] if q is not None else []
    return f"tune.{'q' if q is not None else ''}{name}({', '.join(map(repr, args))})"
