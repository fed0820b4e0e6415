"""What a trial does for GPU training, checked with real CPU trials: it trains on the device it was
given, leaves nothing behind in a reused worker, fetches nothing, and checkpoints as often as asked;
the AMP check once per node, and running out of GPU memory (called directly: no GPU here)."""

from __future__ import annotations

import json
import os
import time
import weakref
from types import SimpleNamespace

import pytest
import yaml

from conftest import REPO, run_cli, small_sweep_overrides
from yolotune.layout import read_jsonl
from yolotune.resources import local_cpus
from yolotune.results import load

TRIALS = 4


@pytest.fixture(scope="module")
def one_worker_sweep(tmp_path_factory, shapes_cache):
    """4 trials one after another in one reused worker (all CPUs: 1 slot), ASHA stopping some of them early,
    each with data loader processes (worker_probe.py), and a checkpoint every 2 epochs."""
    storage = tmp_path_factory.mktemp("storage")
    overrides = small_sweep_overrides(storage, shapes_cache, "one-worker", iterations=TRIALS, epochs=3)
    proc = run_cli(*overrides, f"resources.cpu_per_trial={local_cpus()}", "resources.gpu_per_trial=0",
                   "resources.max_concurrent_trials=1", "checkpoint.every=2",
                   "+ray.runtime_env.worker_process_setup_hook=worker_probe.install",
                   env={"PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return storage / "one-worker"


@pytest.mark.slow
def test_a_reused_worker_keeps_nothing_of_its_previous_trials(one_worker_sweep):
    results = load(one_worker_sweep)
    assert results.status_counts().get("ERROR", 0) == 0
    assert results.status_counts().get("TERMINATED", 0) == TRIALS
    history = results.history()
    assert history["pid"].nunique() == 1  # one worker ran every trial
    assert (history.groupby("trial_id")["epoch"].max() < 3).any()  # ASHA stopped some trials early
    probes = sorted((read_jsonl(d / "probe.jsonl")[0] for d in one_worker_sweep.glob("trial_*")),
                    key=lambda records: records[0]["time"])  # in the order the trials ran
    starts = [next(r for r in records if r["when"] == "start") for records in probes]
    training = [r for records in probes for r in records if r["when"] == "training"]
    assert min(r["children"] for r in training) >= 1  # loader processes existed while training ...
    assert [r["children"] for r in starts] == [0] * TRIALS  # ... and none outlived its trial
    assert [r["trainers"] for r in starts] == [1] * TRIALS  # only the new trial's trainer is alive
    assert max(r["tensor_mib"] for r in starts) - min(r["tensor_mib"] for r in starts) < 1  # no old tensors
    rss = [r["rss"] / 2**20 for r in starts]
    print("worker RSS at each trial's start (MiB):", [round(m) for m in rss])
    # A kept trainer would add at least the tensors it trains with (model, EMA, optimizer, gradients);
    # smaller growth is the allocator and library caches settling (the first trial warms them up).
    trainer_mib = min(r["tensor_mib"] for r in training) - max(r["tensor_mib"] for r in starts)
    growth = [b - a for a, b in zip(rss[1:], rss[2:])]
    assert trainer_mib > 20 and max(growth) < trainer_mib, (rss, trainer_mib)


@pytest.mark.slow
def test_trials_train_on_the_cpu_and_fetch_nothing(one_worker_sweep):
    for trial_dir in one_worker_sweep.glob("trial_*"):
        args = yaml.safe_load((trial_dir / "train" / "args.yaml").read_text())
        assert args["device"] == "cpu" and args["deterministic"] is False and args["workers"] == 0
        assert not (trial_dir / "weights").exists()  # no AMP check model fetched into the trial's cwd
        rows = read_jsonl(trial_dir / "history.jsonl")[0]
        assert rows and all(row["gpu"] == "" for row in rows)
    assert set(load(one_worker_sweep).dataframe()["gpu"]) == {""}


@pytest.mark.slow
def test_checkpoints_every_two_epochs_and_at_the_end(one_worker_sweep):
    for trial_dir in one_worker_sweep.glob("trial_*"):
        epochs = len(read_jsonl(trial_dir / "history.jsonl")[0])
        checkpoints = sorted(trial_dir.glob("checkpoint_*"))
        result_rows = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
        with_checkpoint = [r["epoch"] for r in result_rows if r.get("checkpoint_dir_name")]
        # Epoch 2, and epoch 3 as the last; a trial ASHA stopped after epoch 1 has none (never resumed).
        assert with_checkpoint == {1: [], 2: [2], 3: [2, 3]}[epochs]
        assert len(checkpoints) == min(len(with_checkpoint), 1)  # the newest is kept
        assert not list(trial_dir.glob(".ckpt-*"))  # the temp dirs in the trial dir are gone
        # A checkpointed last.pt moved into its checkpoint folder (no copy); Ultralytics writes a new one next epoch.
        assert (trial_dir / "train" / "weights" / "last.pt").exists() == (not with_checkpoint or
                                                                           with_checkpoint[-1] != epochs)


class OnTheGpu:
    """A model as the AMP check sees it: its parameters on GPU 0 (no GPU needed to say so)."""

    def parameters(self):
        import torch

        yield SimpleNamespace(device=torch.device("cuda", 0))


@pytest.fixture
def gpu_node(tmp_path, monkeypatch):
    """This machine as a GPU node with an empty yolotune cache; returns the downloads Ultralytics asked for
    (none may be: each would be a request, or a wait offline)."""
    import torch
    from ultralytics.utils import downloads

    monkeypatch.setenv("YOLOTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    asked = []

    def download(*args, **kwargs):
        asked.append(args or kwargs)
        raise ConnectionError("a trial downloaded")

    monkeypatch.setattr(downloads, "attempt_download_asset", download)
    monkeypatch.setattr(downloads, "safe_download", download)
    return asked


def test_the_amp_check_runs_once_per_node_and_gpu_model_and_later_trials_reuse_it(gpu_node, tmp_path, monkeypatch):
    """Ultralytics' check (stubbed: it needs a GPU) runs in the first trial only, on the driver's copy of its
    model, and its result (AMP off here) is what later trials train with; another GPU model is checked again."""
    import torch
    import ultralytics.utils
    from ultralytics.utils import checks

    from yolotune.worker_setup import AMP_CHECK_MODEL, node_amp_check

    weights = tmp_path / "driver-weights"
    weights.mkdir()
    (weights / AMP_CHECK_MODEL).write_bytes(b"model")
    checked_in = []

    def check_amp(model):
        checked_in.append(ultralytics.utils.WEIGHTS_DIR)
        return False

    monkeypatch.setattr(checks, "check_amp", check_amp)
    assert [node_amp_check(OnTheGpu(), str(weights)) for _trial in range(3)] == [False] * 3
    assert checked_in == [weights] and gpu_node == []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    assert node_amp_check(OnTheGpu(), str(weights)) is False and len(checked_in) == 2


@pytest.mark.parametrize("driver_weights", ["not-on-this-node", None], ids=["cluster-node", "driver-offline"])
def test_a_node_without_the_amp_check_model_skips_the_check_with_amp_on_at_once(gpu_node, tmp_path, capsys,
                                                                                  driver_weights):
    """Ultralytics' own check runs, finds no model and downloads nothing: AMP on, at once, said in the trial's
    log; the skip is not kept, so a trial that finds the model later still checks."""
    from yolotune.worker_setup import node_amp_check

    weights_dir = str(tmp_path / driver_weights) if driver_weights else None
    started = time.time()
    assert node_amp_check(OnTheGpu(), weights_dir) is True
    assert time.time() - started < 10 and gpu_node == []
    assert capsys.readouterr().out.count("yolotune: AMP check skipped, AMP on") == 1
    assert not list((tmp_path / "cache" / "amp-check").glob("*.json"))


def test_the_memory_of_a_trial_that_failed_is_free_when_the_gpu_cache_is_emptied(tmp_path, monkeypatch,
                                                                                    ultralytics_log_to_stdout):
    """A failed trial's error holds the frames it went through, and their locals (the model): they are
    dropped before torch.cuda.empty_cache, or the GPU memory stays taken while Ray keeps the error."""
    import torch

    from yolotune import trainable

    models = []

    def train_until_it_fails(*args):
        model = torch.nn.Linear(2, 2)
        models.append(weakref.ref(model))
        raise RuntimeError("training failed")

    freed_when_emptied = []
    monkeypatch.setattr(trainable, "_train", train_until_it_fails)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed_when_emptied.append(models[0]() is None))
    monkeypatch.setattr(trainable.ray, "get_gpu_ids", lambda: [])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # claim_device sets it: restored afterwards
    monkeypatch.setattr(trainable.tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "t_00000"))
    monkeypatch.setattr(trainable.tune, "get_checkpoint", lambda: None)
    with pytest.raises(RuntimeError, match="training failed"):
        trainable.train_trial({}, {"experiment_dir": str(tmp_path)})
    assert freed_when_emptied == [True]


def test_a_trial_out_of_gpu_memory(shapes_cache, tmp_path, monkeypatch):
    """A real (tiny, CPU) trial that runs out of memory in both its epochs: Ultralytics halves the batch in
    the first (4 -> 2) and the history row says so; the second fails the trial with one line that names the
    batch and the GPU share. Neither asks the package index for a newer Ultralytics, and the trainer runs
    the node's AMP check."""
    import torch
    import ultralytics.engine.trainer
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.utils import checks

    from yolotune import trainable, worker_setup
    from yolotune.data import ShapesDataConfig, make_shapes

    data = make_shapes(ShapesDataConfig(train_images=4, val_images=2, imgsz=64, cache_dir=str(shapes_cache)))
    preprocess, ooms = DetectionTrainer.preprocess_batch, []

    def out_of_memory_once_per_epoch(trainer, batch):
        if len(ooms) == trainer.epoch:
            ooms.append(trainer.batch_size)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return preprocess(trainer, batch)

    monkeypatch.setattr(DetectionTrainer, "preprocess_batch", out_of_memory_once_per_epoch)
    asked_index = []
    monkeypatch.setattr(checks, "ONLINE", True)
    monkeypatch.setattr(checks, "IS_PIP_PACKAGE", True)
    monkeypatch.setattr(checks, "check_latest_pypi_version", lambda *a: asked_index.append(a))
    monkeypatch.setattr(checks, "check_pip_update_available", checks.check_pip_update_available)  # restored after
    amp_checks = []
    monkeypatch.setattr(worker_setup, "node_amp_check", lambda model, weights_dir: amp_checks.append(model) or False)
    monkeypatch.setattr(ultralytics.engine.trainer, "check_amp", ultralytics.engine.trainer.check_amp)  # restored after
    reported = []
    monkeypatch.setattr(trainable.ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "node"))
    monkeypatch.setattr(trainable.tune, "report", lambda metrics, checkpoint=None: reported.append(metrics))
    job = {"weights": "yolo11n.yaml", "data": str(data / "data.yaml"), "experiment_dir": str(tmp_path),
           "train": {"epochs": 2, "imgsz": 64, "batch": 4, "workers": 0, "plots": False, "val": False},
           "threads": torch.get_num_threads(), "metric": "val/box_loss", "mode": "min", "gpu_per_trial": 0.25}
    with pytest.raises(RuntimeError) as failed:
        trainable._train({}, job, tmp_path, None, "cpu", "")
    assert str(failed.value) == ("CUDA out of memory training batch 2 on 0.25 GPU: lower batch or space.batch, "
                                 "or give trials more GPU (resources.gpu_per_trial)")
    assert isinstance(failed.value.__cause__, torch.cuda.OutOfMemoryError) and ooms == [4, 2]
    assert [row["trained_batch"] for row in read_jsonl(tmp_path / "history.jsonl")[0]] == [2]
    assert [metrics["trained_batch"] for metrics in reported] == [2]
    assert asked_index == [] and len(amp_checks) == 1


@pytest.mark.parametrize("epoch,line", [
    (None, "CUDA out of memory setting up training (batch 4) on 0.25 GPU: lower batch or space.batch, or give trials "
           "more GPU (resources.gpu_per_trial)"),
    (1, "CUDA out of memory training batch 4 on 0.25 GPU: lower batch or space.batch, or give trials more GPU "
        "(resources.gpu_per_trial)"),
])
def test_out_of_memory_is_one_line_wherever_it_happens(epoch, line, shapes_cache, tmp_path, monkeypatch):
    """A real (tiny, CPU) trial runs out of memory while Ultralytics builds its trainer (a callback that
    runs in BaseTrainer.__init__, as moving the model to the card does; the trainer never exists, which
    surfaced as an AttributeError) or in its second epoch (past Ultralytics' first-epoch batch halving): one
    line each, from Ultralytics' own code path, the OOM kept as its cause."""
    import torch
    from ultralytics.utils.callbacks.base import default_callbacks

    from yolotune import trainable
    from yolotune.data import ShapesDataConfig, make_shapes

    def out_of_memory(trainer):
        if epoch is None or trainer.epoch == epoch:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    event = "on_pretrain_routine_start" if epoch is None else "on_train_batch_start"
    monkeypatch.setitem(default_callbacks, event, [*default_callbacks[event], out_of_memory])
    monkeypatch.setattr(trainable.ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "node"))
    monkeypatch.setattr(trainable.tune, "report", lambda metrics, checkpoint=None: None)
    data = make_shapes(ShapesDataConfig(train_images=4, val_images=2, imgsz=64, cache_dir=str(shapes_cache)))
    job = {"weights": "yolo11n.yaml", "data": str(data / "data.yaml"), "experiment_dir": str(tmp_path),
           "train": {"epochs": 2, "imgsz": 64, "batch": 4, "workers": 0, "plots": False, "val": False},
           "threads": torch.get_num_threads(), "metric": "val/box_loss", "mode": "min", "gpu_per_trial": 0.25}
    with pytest.raises(RuntimeError) as failed:
        trainable._train({}, job, tmp_path, None, "cpu", "")
    assert str(failed.value) == line and type(failed.value) is RuntimeError
    assert isinstance(failed.value.__cause__, torch.cuda.OutOfMemoryError)
    assert len(read_jsonl(tmp_path / "history.jsonl")[0]) == (epoch or 0)  # the epochs before it were reported


def test_a_trial_whose_share_others_held_is_retried(monkeypatch):
    """Out of memory with less than its share held and free: a GpuMemoryTaken, which the runner retries."""
    from types import SimpleNamespace as Model

    from yolotune import gpu_slots, trainable

    monkeypatch.setattr(gpu_slots, "neighbour_took_memory", lambda share: share == 0.25)
    error = trainable.out_of_memory_error(Model(trainer=Model(batch_size=8)), {"batch": 16}, 0.25)
    assert isinstance(error, gpu_slots.GpuMemoryTaken) and str(error) == (
        "CUDA out of memory training batch 8 on 0.25 GPU: other processes on the card held part of this trial's "
        "share; retried (failure.max_failures)")
    assert type(trainable.out_of_memory_error(Model(trainer=None), {"batch": 16}, 0.5)) is RuntimeError


def test_a_gpu_share_others_held_is_retried_and_an_own_out_of_memory_is_not(monkeypatch):
    """The runner's failure rule, with the errors as Ray hands them over (RayTaskError of the trial's):
    GpuMemoryTaken keeps the trial's retries (failure.max_failures), its own out-of-memory has none."""
    from ray.exceptions import RayTaskError
    from ray.tune.execution.tune_controller import TuneController

    from yolotune import runner
    from yolotune.gpu_slots import GpuMemoryTaken

    retries_left = []
    monkeypatch.setattr(TuneController, "_process_trial_failure",
                        lambda controller, trial, exception: retries_left.append(trial.max_failures))
    runner._handle_trial_failures()
    trial = SimpleNamespace(max_failures=3)
    for cause in (GpuMemoryTaken("CUDA out of memory training batch 8 on 0.25 GPU: other processes ..."),
                  RuntimeError("CUDA out of memory training batch 8 on 0.25 GPU: lower batch ...")):
        TuneController._process_trial_failure(None, trial, RayTaskError("train_trial", "Traceback ...", cause))
    assert retries_left == [3, 0] and trial.max_failures == 3
