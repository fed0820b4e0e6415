"""Hydra callback that summarises a multirun: one row per tuning experiment."""

from __future__ import annotations

from hydra.experimental.callback import Callback


class MultirunSummary(Callback):
    pass
