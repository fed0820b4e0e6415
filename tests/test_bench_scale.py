"""scripts/bench_scale.py builds experiments that yolotune reads as a day's ASHA sweep: no timing here."""

from __future__ import annotations

import importlib.util
import json

import pytest
import yaml

from compose import REPO
from yolotune.importance import importance
from yolotune.results import load

spec = importlib.util.spec_from_file_location("bench_scale", REPO / "scripts" / "bench_scale.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_a_built_experiment_reads_as_an_asha_sweep_whose_metric_lr0_decides(tmp_path):
    trials = 81
    results = load(bench.build(tmp_path / "scale", trials, weights_mb=0.001))
    frame = results.dataframe()
    assert len(frame) == trials and results.problems == [] and len(results.space) == 22
    ended = frame[frame["status"] == "TERMINATED"]
    # ASHA with reduction 3: 81 trials at rung 10, 27 go on to 30, 9 to 90, 3 to 100 (errored ones cut short)
    reached = ended["epochs"].value_counts().to_dict()
    assert set(reached) <= {10, 30, 90, 100} and sum(reached.values()) == len(ended)
    assert reached.get(100, 0) <= 3 and reached.get(90, 0) + reached.get(100, 0) <= 9
    events = [json.loads(line) for line in (tmp_path / "scale" / "trials.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "errored" for e in events) == (frame["status"] == "ERROR").sum()
    rows = results.history()
    assert set(rows.loc[rows["validated"] == 1, "epoch"]) <= {10, 30, 90, 100}  # validation at decisions only
    assert len(list((tmp_path / "scale").rglob("*.pt"))) == 3 * trials
    judged = importance(results)
    assert max(judged.values, key=judged.values.get) == "lr0"


@pytest.mark.slow
def test_experiments_built_from_a_real_one_keep_its_format(tmp_path, small_sweep):
    """--from: the built trials' history rows carry the real rows' keys and fixed values, their args.yaml the
    real trials' arguments, the saved config the real one's; yolotune reads them as it reads the real one."""
    real_row = json.loads(next(small_sweep.glob("trial_*/history.jsonl")).read_text().splitlines()[0])
    real_args = yaml.safe_load(next(small_sweep.glob("trial_*/train/args.yaml")).read_text())
    exp = bench.build(tmp_path / "scale", 27, weights_mb=0.001, real=small_sweep)
    results = load(exp)
    assert results.problems == [] and len(results.dataframe()) == 27 and len(results.space) == 22
    rows = results.history()
    assert set(real_row) - {"epoch"} <= set(rows.columns)  # every key the real trials report
    assert set(rows["node_id"]) == {real_row["node_id"]} and set(rows["trained_batch"]) == {real_row["trained_batch"]}
    trial = next(exp.glob("trial_*"))
    args, own = yaml.safe_load((trial / "train" / "args.yaml").read_text()), {"project", "save_dir"}
    assert {k: v for k, v in args.items() if k not in {*results.space, *own}} == {
        k: v for k, v in real_args.items() if k not in {*results.space, *own}}
    assert (args["project"], args["save_dir"]) == (str(trial), str(trial / "train"))
    assert results.config["model"] == yaml.safe_load((small_sweep / ".hydra" / "config.yaml").read_text())["model"]
    assert results.config["train"]["epochs"] == bench.EPOCHS
