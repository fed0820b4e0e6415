"""W&B: a real small sweep logged offline, read back from W&B's own run files (.wandb)."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO, run_cli, small_sweep_overrides
from yolotune.errors import ConfigError
from yolotune.wandb_logging import WandbConfig, check_wandb, run_id

# Well-formed (wandb refuses a malformed key even offline), so it is read and could leak.
FAKE_KEY = "yolotuneFakeKey" + "0123456789" * 4


def _records(path: Path):
    """The protobuf records of a .wandb file: W&B's 7-byte header, then LevelDB-log chunks in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunks = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # W&B's service process is still writing this chunk
            return
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a record is complete
            record = pb.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def read_run(run_dir: Path) -> dict:
    """What W&B would upload for an offline run: identity, config, history rows, summary."""
    run = {"id": run_dir.name.rsplit("-", 1)[-1], "config": {}, "history": [], "summary": {}, "exit_code": None}
    for record in _records(next(run_dir.glob("*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.update(name=r.display_name, group=r.run_group, job_type=r.job_type, project=r.project)
            run["config"].update(_items(r.config.update))
        elif kind == "config":
            run["config"].update(_items(record.config.update))
        elif kind == "history":
            run["history"].append(_items(record.history.item))
        elif kind == "summary":
            run["summary"].update(_items(record.summary.update))
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
    return run


def _result_rows(trial_dir: Path):
    path = trial_dir / "result.json"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _wandb_env(wandb_dir: Path) -> dict:
    return {"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_API_KEY": FAKE_KEY}


@pytest.fixture(scope="module")
def wandb_sweep(tmp_path_factory, shapes_cache):
    """One real sweep (3 trials x 2 epochs, ASHA) with wandb=offline: (experiment dir, W&B dir, runs)."""
    storage, wandb_dir = tmp_path_factory.mktemp("storage"), tmp_path_factory.mktemp("wandb")
    proc = run_cli(*small_sweep_overrides(storage, shapes_cache, "wb", iterations=3, epochs=2), "wandb=offline",
                   env=_wandb_env(wandb_dir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"wandb sync {wandb_dir}/wandb/offline-run-*" in proc.stdout
    runs = [read_run(d) for d in sorted((wandb_dir / "wandb").glob("offline-run-*"))]
    return storage / "wb", wandb_dir, runs


def _trial_runs(runs):
    return {run["id"]: run for run in runs if run.get("job_type") == "trial"}


@pytest.mark.slow
def test_one_finished_run_per_trial_plus_one_summary_run(wandb_sweep):
    exp_dir, _, runs = wandb_sweep
    trials = pd.read_csv(exp_dir / "trials.csv")
    assert len(trials) == 3
    trial_runs = _trial_runs(runs)
    assert set(trial_runs) == {run_id("wb", t) for t in trials.trial_id}
    assert {r["name"] for r in trial_runs.values()} == {f"trial_{t}" for t in trials.trial_id}
    assert [r["job_type"] for r in runs].count("summary") == 1
    assert len(runs) == 4  # nothing else: no second run per trial
    assert all(r["exit_code"] == 0 for r in runs)  # every run was finished, none cut off


@pytest.mark.slow
def test_all_runs_share_the_experiment_group(wandb_sweep):
    _, _, runs = wandb_sweep
    assert {(r["project"], r["group"]) for r in runs} == {("yolotune", "wb")}


@pytest.mark.slow
def test_trial_run_config_holds_its_sampled_values_and_the_fixed_train_args(wandb_sweep):
    exp_dir, _, runs = wandb_sweep
    for run in _trial_runs(runs).values():
        sampled = json.loads((exp_dir / run["name"] / "params.json").read_text())
        assert set(sampled) == {"lr0", "lrf", "momentum", "weight_decay"}
        assert {k: run["config"][k] for k in sampled} == sampled
        assert run["config"]["epochs"] == 2 and run["config"]["imgsz"] == 64 and run["config"]["optimizer"] == "SGD"


@pytest.mark.slow
def test_one_history_row_per_epoch_and_the_best_metric_in_the_summary(wandb_sweep):
    exp_dir, _, runs = wandb_sweep
    for run in _trial_runs(runs).values():
        reported = _result_rows(exp_dir / run["name"])
        assert [row["epoch"] for row in run["history"]] == [r["epoch"] for r in reported] != []
        assert [row["val/box_loss"] for row in run["history"]] == pytest.approx([r["val/box_loss"] for r in reported])
        assert not {"pid", "hostname", "time_total_s", "done"} & set(run["history"][0])  # metrics only
        assert run["summary"]["best_val/box_loss"] == pytest.approx(min(r["val/box_loss"] for r in reported))


@pytest.mark.slow
def test_summary_run_holds_a_table_of_all_trials_and_the_best_config(wandb_sweep):
    exp_dir, wandb_dir, runs = wandb_sweep
    summary = next(r for r in runs if r["job_type"] == "summary")
    best = yaml.safe_load((exp_dir / "best_hyperparameters.yaml").read_text())
    assert {k: summary["config"][k] for k in best} == best
    trials = pd.read_csv(exp_dir / "trials.csv")
    winner = trials.loc[trials["best_val/box_loss"].idxmin()]
    assert summary["summary"]["best_trial_id"] == winner.trial_id
    assert summary["summary"]["best_val/box_loss"] == pytest.approx(winner["best_val/box_loss"])

    [table_file] = (wandb_dir / "wandb").glob(f"offline-run-*-{summary['id']}/files/media/table/trials_*.table.json")
    table = json.loads(table_file.read_text())
    frame = pd.DataFrame(table["data"], columns=table["columns"])
    assert {"trial_id", "status", "lr0", "lrf", "momentum", "weight_decay", "best_val/box_loss"} <= set(frame.columns)
    assert sorted(frame.trial_id) == sorted(trials.trial_id) and set(frame.status) == {"TERMINATED"}
    assert {f"scatter/{p}" for p in ("lr0", "lrf", "momentum", "weight_decay")} <= {
        key.split("/", 2)[-1] for key in summary["config"] if key.startswith("_wandb/visualize/")}


@pytest.mark.slow
def test_the_api_key_is_written_nowhere(wandb_sweep):
    exp_dir, wandb_dir, _ = wandb_sweep
    files = [Path(root, name) for top in (exp_dir, wandb_dir) for root, _, names in os.walk(top) for name in names]
    assert len(files) > 50 and any(f.name == "tuner.pkl" for f in files)  # the scan sees Ray's and W&B's files
    leaked = [f for f in files if f.exists() and FAKE_KEY.encode() in f.read_bytes()]
    assert not leaked


@pytest.mark.slow
def test_a_resumed_trial_continues_its_own_run(tmp_path, shapes_cache):
    """Kill a sweep mid-trial (SIGKILL, whole process group), resume it: the trial's W&B run id is kept."""
    overrides = [o for o in small_sweep_overrides(tmp_path, shapes_cache, "kill", iterations=1, epochs=3)
                 if not o.startswith("scheduler")] + ["scheduler=fifo", "wandb=offline"]
    wandb_runs = tmp_path / "wandb" / "wandb"
    env = {**os.environ, **_wandb_env(tmp_path / "wandb")}
    proc = subprocess.Popen([sys.executable, "-m", "yolotune", *overrides], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    def first_epoch_logged():
        reported = any(_result_rows(d) for d in tmp_path.glob("kill/trial_*"))
        return reported and any(wandb_runs.glob("offline-run-*/*.wandb"))

    # Killed at once after the first epoch, well before the second ends: Ray deletes a trial's older
    # checkpoint as it registers a newer one, before it saves the state naming the newer, and a kill
    # between the two leaves a state naming a deleted checkpoint (an epoch takes a fraction of a second here).
    deadline = time.time() + 300
    while not first_epoch_logged():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=120)
    [trial_dir] = (tmp_path / "kill").glob("trial_*")
    before = len(_result_rows(trial_dir))
    assert before < 3

    resumed = run_cli("resume=true", f"storage={tmp_path}", "name=kill", env=_wandb_env(tmp_path / "wandb"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    trial_id = trial_dir.name.removeprefix("trial_")
    run_dirs = sorted(wandb_runs.glob("offline-run-*"))
    runs = [read_run(d) for d in run_dirs]
    summary_id = next(r["id"] for r in runs if r.get("job_type") == "summary")
    assert {d.name.rsplit("-", 1)[-1] for d in run_dirs} == {run_id("kill", trial_id), summary_id}
    assert len(run_dirs) == 3  # the trial's run before the kill, the same run resumed, the summary
    continued = [r for r in runs if r["id"] == run_id("kill", trial_id)][-1]
    after_resume = _result_rows(trial_dir)[before:]
    assert [row["epoch"] for row in continued["history"]] == [r["epoch"] for r in after_resume]
    assert continued["history"][-1]["epoch"] == 3 and continued["exit_code"] == 0


def test_wandb_not_installed_is_one_line_naming_the_extra(tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules['wandb'] = None  # as if not installed\n")
    proc = run_cli(f"storage={tmp_path}/runs", "wandb=offline", env={"PYTHONPATH": str(shim)})
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("yolotune: error: wandb=offline") and "pip install 'yolotune[wandb]'" in line
    assert not (tmp_path / "runs").exists()  # refused before anything was written


@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    return tmp_path / "netrc"


def test_online_without_a_login_is_one_line(tmp_path, no_wandb_login):
    proc = run_cli(f"storage={tmp_path}/runs", "wandb=online")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("yolotune: error: wandb=online") and "wandb login" in line and "WANDB_API_KEY" in line
    assert not (tmp_path / "runs").exists()


def test_online_accepts_the_login_wandb_would_use(no_wandb_login, monkeypatch):
    with pytest.raises(ConfigError):
        check_wandb(WandbConfig(mode="online"))
    no_wandb_login.write_text(f"machine api.wandb.ai login user password {FAKE_KEY}\n")
    no_wandb_login.chmod(0o600)
    check_wandb(WandbConfig(mode="online"))
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")  # a login for another server is none
    with pytest.raises(ConfigError):
        check_wandb(WandbConfig(mode="online"))
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    check_wandb(WandbConfig(mode="online"))


def _offline_settings(tmp_path: Path, experiment: str, epochs: int) -> dict:
    """The driver's W&B settings (wandb_logging.settings) of an offline experiment ranked by fitness."""
    return {"mode": "offline", "project": "yolotune", "entity": None, "group": experiment, "tags": [], "notes": None,
            "dir": str(tmp_path), "experiment": experiment, "metric": "fitness", "metric_mode": "max",
            "train": {"epochs": epochs}}


def _the_finished_run(tmp_path: Path) -> dict:
    """The one offline run under ``tmp_path``, once W&B's service process has written its exit record."""
    [run_dir] = (tmp_path / "wandb").glob("offline-run-*")
    for _ in range(50):  # give it a moment under load
        run = read_run(run_dir)
        if run["exit_code"] is not None:
            break
        time.sleep(0.2)
    return run


def test_pbt_changed_hyperparameters_update_the_trial_runs_config(tmp_path):
    from yolotune.wandb_logging import TrialRuns

    runs = TrialRuns(_offline_settings(tmp_path, "pbt", epochs=4))
    runs.log("t1", "trial_t1", {"lr0": 0.01}, {"epoch": 1, "fitness": 0.2}, 0.2)
    runs.log("t1", "trial_t1", {"lr0": 0.02}, {"epoch": 2, "fitness": 0.1}, 0.2)  # exploited and perturbed
    runs.close()
    run = _the_finished_run(tmp_path)
    assert run["id"] == run_id("pbt", "t1") and run["exit_code"] == 0
    assert run["config"]["lr0"] == 0.02 and run["config"]["epochs"] == 4
    assert [row["epoch"] for row in run["history"]] == [1, 2] and run["summary"]["best_fitness"] == 0.2


def test_epochs_without_validation_log_their_training_values_and_leave_the_best_alone(tmp_path):
    """validate=decisions: an unvalidated epoch's result has no metric; its run logs what it has, the
    best stays that of the validated epochs (Ray's running max skips the result, as its Trial does)."""
    from ray.tune.experiment import Trial

    from yolotune import layout
    from yolotune.wandb_logging import tune_callback

    callback = tune_callback(_offline_settings(tmp_path, "val", epochs=3))
    callback.setup()
    trial = Trial("__fake", config={"lr0": 0.01}, trial_id="t1", stub=True)
    results = [{"epoch": 1, "validated": 1, "fitness": 0.2, "train/box_loss": 2.0},
               {"epoch": 2, "validated": 0, "train/box_loss": 1.5},  # better training, no validation
               {"epoch": 3, "validated": 1, "fitness": 0.1, "train/box_loss": 1.2, layout.PAST_DEADLINE: 1000}]
    for result in results:
        trial.update_last_result(result)  # Ray updates the trial before calling back
        callback.on_trial_result(iteration=0, trials=[trial], trial=trial, result=result)
    callback.on_trial_complete(iteration=0, trials=[trial], trial=trial)
    callback.runs.close()
    run = _the_finished_run(tmp_path)
    assert [row["epoch"] for row in run["history"]] == [1, 2, 3]
    assert [row.get("fitness") for row in run["history"]] == [0.2, None, 0.1]
    assert [row["validated"] for row in run["history"]] == [1, 0, 1]
    assert not any(layout.PAST_DEADLINE in row for row in run["history"])
    assert run["summary"]["best_fitness"] == 0.2


def test_the_summary_run_holds_the_parameters_importance(tmp_path):
    from test_analysis_fast import decided_experiment

    from yolotune.importance import importance
    from yolotune.results import load
    from yolotune.wandb_logging import log_experiment_summary

    exp_dir = decided_experiment(tmp_path / "exp", "batch")
    log_experiment_summary(exp_dir, _offline_settings(tmp_path, "exp", epochs=2))
    summary = _the_finished_run(tmp_path)["summary"]
    want = importance(load(exp_dir))
    assert {k.removeprefix("importance/"): v for k, v in summary.items() if k.startswith("importance/")} == \
        pytest.approx(want.values)
    assert summary["importance_method"] == want.method and summary["importance_trials"] == 30
    assert max(want.values, key=want.values.get) == "batch"


def test_a_trial_run_carries_its_objectives(tmp_path):
    """The running best of a metric objective, the last measured value of a model cost, as the driver's
    settings (trial_settings) pass the objectives."""
    from ray.tune.experiment import Trial

    from yolotune.wandb_logging import tune_callback

    from compose import experiment
    from yolotune.wandb_logging import trial_settings

    exp = experiment("wandb=offline", "scheduler=fifo", "objectives=[fitness:max,val/box_loss:min,latency_ms:min]")
    callback = tune_callback({**trial_settings(exp, tmp_path / "objectives", {"epochs": 2}), "dir": str(tmp_path)})
    callback.setup()
    trial = Trial("__fake", config={"lr0": 0.01}, trial_id="t1", stub=True)
    # latency measured twice (a run stopped by the time budget, then resumed): the last counts, not the least
    for result in [{"epoch": 1, "validated": 1, "fitness": 0.3, "val/box_loss": 2.0, "latency_ms": 4.0},
                   {"epoch": 2, "validated": 1, "fitness": 0.2, "val/box_loss": 1.0, "latency_ms": 4.5}]:
        trial.update_last_result(result)
        callback.on_trial_result(iteration=0, trials=[trial], trial=trial, result=result)
    callback.on_trial_complete(iteration=0, trials=[trial], trial=trial)
    callback.runs.close()
    summary = _the_finished_run(tmp_path)["summary"]
    assert {k: v for k, v in summary.items() if k.startswith("objective/")} == {
        "objective/fitness": 0.3, "objective/val/box_loss": 1.0, "objective/latency_ms": 4.5}


def test_the_summary_run_holds_the_objectives_and_the_front(tmp_path):
    from test_objectives_fast import RANKS, two_objectives

    from yolotune.wandb_logging import log_experiment_summary

    exp_dir = two_objectives(tmp_path / "exp", "latency_ms<=5")
    log_experiment_summary(exp_dir, _offline_settings(tmp_path, "exp", epochs=2))
    summary = _the_finished_run(tmp_path)["summary"]
    assert sorted(summary["pareto_front"]) == sorted(t for t, rank in RANKS.items() if rank == 1)
    assert summary["objectives"] == ["fitness:max", "latency_ms:min"] and summary["best_trial_id"] == "B"
    assert summary["select"] == "the highest fitness among trials with latency_ms<=5"
    # trial id, 2 objectives, rank, how latency_ms was measured
    assert (summary["pareto_table/nrows"], summary["pareto_table/ncols"]) == (8, 5)
