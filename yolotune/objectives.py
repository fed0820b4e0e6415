"""Several objectives at once: ``objectives=[fitness:max, latency_ms:min]``, their Pareto ranks, and
the ``select`` rule that picks the one trial whose files become best_hyperparameters.yaml and best.pt.

- An objective is ``NAME:MODE``: NAME a reported validation metric (as ``metric``) or one of the
  model's costs that trials measure after training (``MODEL_COSTS``, trainable.py); MODE min or max.
  The first objective is the experiment's ``metric:mode``: it picks each trial's best epoch (whose
  weights are measured and kept) and ``select``'s "most accurate".
- A trial's value of a metric objective is its best over its validated epochs; of a cost, its last
  measured value. Pareto rank 1: no other trial is at least as good in every objective and better in
  one; rank 2: the same once rank 1 is left out, and so on. Trials with identical values share a
  rank; a trial missing a value (errored, unfinished) has no rank.
- ``select``: null, or constraints ``NAME<=NUMBER`` (also ``<``, ``>=``, ``>``) on objectives joined
  by `` and ``: the selected trial is the best by the first objective among the ranked trials that
  meet every constraint (ties: the lower Pareto rank, then the earlier trial); none if no trial does.

Pure: no Ray, torch or Ultralytics, and pandas only to rank (validating a config imports this).
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Sequence

from yolotune.errors import ConfigError
from yolotune.layout import MODEL_COSTS

if TYPE_CHECKING:
    import pandas as pd

COMPARISONS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt}
_CONSTRAINT = re.compile(r"^\s*(\S+?)\s*(<=|>=|<|>)\s*(\S+)\s*$")
FORM = "a list of NAME:MODE, at least two, e.g. [fitness:max, latency_ms:min]"


@dataclass(frozen=True)
class Objective:
    name: str
    mode: str  # min | max


@dataclass(frozen=True)
class Constraint:
    name: str
    op: str
    bound: float

    def met(self, value: float) -> bool:
        return not math.isnan(value) and COMPARISONS[self.op](value, self.bound)

    def __str__(self) -> str:
        return f"{self.name}{self.op}{self.bound:g}"


def parse_objectives(entries: Sequence[str], is_metric) -> List[Objective]:
    """``["fitness:max", "latency_ms:min"]`` -> Objectives; ``is_metric(name)``: a reported metric's name."""
    if len(entries) < 2:
        raise ConfigError("objectives", f"[{', '.join(map(str, entries))}]", f"{FORM}; one objective is metric= and "
                                                                           "mode=")
    found = []
    for entry in entries:
        name, _, mode = str(entry).rpartition(":")
        if mode not in ("min", "max") or not (name in MODEL_COSTS or is_metric(name)):
            raise ConfigError("objectives", entry, f"NAME:min or NAME:max, NAME one of {', '.join(MODEL_COSTS)} or a "
                                                   "reported metric (fitness, metrics/mAP50-95(B), ...)")
        if any(o.name == name for o in found):
            raise ConfigError("objectives", entry, f"{name} is named twice; each objective once")
        found.append(Objective(name, mode))
    if found[0].name in MODEL_COSTS:
        raise ConfigError("objectives", entries[0], "the first objective is a validation metric (it picks each "
                                                    "trial's best epoch), e.g. fitness:max")
    return found


def parse_select(text: Optional[str], objectives: Sequence[Objective]) -> List[Constraint]:
    """``"latency_ms<=5 and params<3"`` -> Constraints on ``objectives``; null: none."""
    if text is None:
        return []
    names = [o.name for o in objectives]
    if not names:
        raise ConfigError("select", text, "needs objectives: it picks among trials ranked by several objectives")
    allowed = f"constraints NAME<=NUMBER (or <, >=, >) joined by ' and ', NAME one of {', '.join(names)}"
    constraints = []
    for part in str(text).split(" and "):
        match = _CONSTRAINT.match(part)
        bound = _number(match[3]) if match else None
        if match is None or match[1] not in names or bound is None:
            raise ConfigError("select", text, allowed)
        constraints.append(Constraint(match[1], match[2], bound))
    return constraints


def _number(text: str) -> Optional[float]:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def check(exp, is_metric) -> None:
    """The rules for ``objectives`` and ``select`` across the experiment (config.validate calls it);
    ``is_metric(name)``: a reported metric's name."""
    if not exp.objectives:
        parse_select(exp.select, [])
        return
    objectives = parse_objectives(exp.objectives, is_metric)
    first = objectives[0]
    if (first.name, first.mode) != (exp.metric, exp.mode):
        raise ConfigError("objectives", exp.objectives[0], f"the first objective is the experiment's metric:mode "
                                                           f"({exp.metric}:{exp.mode}); set metric={first.name} "
                                                           f"mode={first.mode}, or list {exp.metric}:{exp.mode} first")
    parse_select(exp.select, objectives)
    if not exp.scheduler.multi_objective:
        raise ConfigError("scheduler", exp.scheduler.type, "decides on one metric; with objectives use scheduler=fifo")
    if not exp.search.multi_objective:
        raise ConfigError("search", exp.search.type, "optimises one metric; with objectives use search=random or "
                                                     "search=optuna (multi-objective TPE)")


def pareto_ranks(values: pd.DataFrame, objectives: Sequence[Objective]) -> pd.Series:
    """Each row's Pareto rank (1: not dominated) by the ``objectives`` columns of ``values``; <NA> for a
    row missing any of them."""
    import pandas as pd  # here: validating a config imports this module, and needs no pandas

    # every objective as a loss: lower is better
    losses = pd.DataFrame({o.name: values[o.name] * (-1 if o.mode == "max" else 1) for o in objectives},
                          index=values.index).astype(float)
    ranks = pd.Series(pd.NA, index=values.index, dtype="Int64")
    left = losses.dropna()
    rank = 1
    while len(left):
        rows = left.to_numpy()
        front = [i for i, row in enumerate(rows)
                 if not any((other <= row).all() and (other < row).any() for other in rows)]
        ranks[left.index[front]] = rank
        left = left.drop(left.index[front])
        rank += 1
    return ranks


def select(values: pd.DataFrame, objectives: Sequence[Objective], constraints: Sequence[Constraint]):
    """The index label of the selected row of ``values`` (objective columns and ``pareto_rank``), or None."""
    ranked = values[values["pareto_rank"].notna()]
    for constraint in constraints:
        ranked = ranked[ranked[constraint.name].astype(float).map(constraint.met)]
    if ranked.empty:
        return None
    first = objectives[0]
    order = ranked.assign(_order=range(len(ranked))).sort_values(
        [first.name, "pareto_rank", "_order"], ascending=[first.mode == "min", True, True], kind="stable")
    return order.index[0]


def rule(objectives: Sequence[Objective], constraints: Sequence[Constraint]) -> str:
    """The select rule in words."""
    first = objectives[0]
    best = f"the {'highest' if first.mode == 'max' else 'lowest'} {first.name}"
    return best + (f" among trials with {' and '.join(map(str, constraints))}" if constraints else "")
