"""Multirun: one tuning experiment per combination, a summary, no leaked Ray; user experiment files."""

from __future__ import annotations

import json
import textwrap
import time

import pandas as pd
import pytest
import yaml

from conftest import processes_under, ray_temp_dir, run_cli, small_sweep_overrides
from yolotune.multirun import exit_code


def _tiny(storage, shapes_cache):
    overrides = small_sweep_overrides(storage, shapes_cache, "x", iterations=2, epochs=1)
    return [o for o in overrides if not o.startswith(("name=", "scheduler"))] + ["scheduler=fifo"]


@pytest.mark.slow
def test_multirun_runs_each_job_and_summarises(tmp_path, shapes_cache):
    with ray_temp_dir() as ray_tmp:  # the multirun's own Ray: other Rays on the machine are not its
        proc = run_cli("-m", *_tiny(tmp_path, shapes_cache), "name=a,b", env={"RAY_TMPDIR": str(ray_tmp)})
        deadline = time.time() + 20  # Ray's processes exit within moments of ray.shutdown()
        while processes_under(ray_tmp) and time.time() < deadline:
            time.sleep(0.5)
        assert not processes_under(ray_tmp)  # nothing of its Ray outlives the multirun
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "a" / "trials.csv").is_file() and (tmp_path / "b" / "trials.csv").is_file()
    summary = pd.read_csv(next(tmp_path.glob("multirun/*/multirun_summary.csv")))
    assert list(summary["status"]) == ["ok", "ok"] and list(summary["trials_finished"]) == [2, 2]
    assert "Multirun summary" in proc.stdout
    # Same seed, random search: both experiments sampled the same configurations.
    sampled = [sorted(json.loads(p.read_text()).items() for p in sorted((tmp_path / n).glob("trial_*/params.json")))
               for n in ("a", "b")]
    assert sampled[0] == sampled[1] and len(sampled[0]) == 2
    info = yaml.safe_load((tmp_path / "a" / "provenance.yaml").read_text())
    assert info["command"].startswith("python -m yolotune -m ") and "name=a,b" in info["command"]
    assert {"python", "yolotune", "ultralytics", "ray", "torch"} <= set(info["versions"])
    assert info["git"]["commit"] and isinstance(info["git"]["dirty"], bool)


@pytest.mark.slow
def test_a_failing_job_does_not_stop_the_others(tmp_path, shapes_cache):
    proc = run_cli("-m", *_tiny(tmp_path, shapes_cache), "train.epochs=0,1")
    summary = pd.read_csv(next(tmp_path.glob("multirun/*/multirun_summary.csv")))
    assert proc.returncode == 1  # the multirun reports that a job failed, after running all of them
    assert list(summary["status"]) == ["refused", "ok"]
    assert summary["error"][0].startswith("train.epochs=0")
    assert summary["trials_finished"][1] == 2


@pytest.mark.parametrize("statuses,code", [
    (["ok", "ok"], 0), (["refused", "refused"], 2), (["refused"], 2), (["refused", "ok"], 1), (["failed", "ok"], 1),
    (["failed", "refused"], 1), (["interrupted", "ok"], 1), (["checked", "checked"], 0), (["checked", "ok"], 0),
    (["checked", "refused"], 1),
])
def test_the_exit_code_says_how_the_jobs_went(statuses, code):
    """2 only when every job was refused (nothing ran, as a single run's mistake); 1 when a job failed or was
    refused while others ran; 0 when all finished."""
    assert exit_code(statuses) == code


@pytest.mark.slow
def test_rerun_from_the_experiment_directory(tmp_path, shapes_cache):
    """The documented one-liner re-runs an experiment with its saved config."""
    first = run_cli(*_tiny(tmp_path, shapes_cache), "name=first")
    assert first.returncode == 0, first.stderr[-2000:]
    again = run_cli("--config-path", str(tmp_path / "first" / ".hydra"), "name=again")
    assert again.returncode == 0, again.stderr[-2000:]
    old, new = (yaml.safe_load((tmp_path / n / ".hydra" / "config.yaml").read_text()) for n in ("first", "again"))
    assert {k: v for k, v in old.items() if k != "name"} == {k: v for k, v in new.items() if k != "name"}
    params = [sorted(p.read_text() for p in (tmp_path / n).glob("trial_*/params.json")) for n in ("first", "again")]
    assert params[0] == params[1]


def test_experiment_file_outside_the_package(tmp_path):
    conf = tmp_path / "conf" / "experiment"
    conf.mkdir(parents=True)
    (conf / "my_exp.yaml").write_text(textwrap.dedent("""\
        # @package _global_
        defaults:
          - override /space: augment
          - override /scheduler: median
        iterations: 7
        train:
          epochs: 12
        """))
    for args in (["--config-dir", str(tmp_path / "conf")], [f"hydra.searchpath=[file://{tmp_path / 'conf'}]"]):
        proc = run_cli(*args, "experiment=my_exp", "--cfg", "job", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        cfg = yaml.safe_load(proc.stdout)
        assert cfg["iterations"] == 7 and cfg["train"]["epochs"] == 12 and cfg["scheduler"]["type"] == "median"
        assert "mosaic" in cfg["space"] and "lr0" not in cfg["space"]
