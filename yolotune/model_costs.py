"""What a trial's model costs (``layout.MODEL_COSTS``: latency, parameters, GFLOPs), for experiments with
objectives, and the latency that results count: measured alone.

A trial measures its best epoch's model in its last report (``model_costs``, called by trainable.py):
its parameters and GFLOPs are the same wherever they are counted, but its latency is timed on a device
that the other trials and the trial's own loader workers share, so it jitters and favours the trials
that end last, alone. That in-trial latency is only what the searcher (Optuna) is told when the trial
completes, the one time it can be told. The latency that ``pareto_rank``, ``select``, trials.csv, the
JSON output and the report use is timed again by the driver once ``tuner.fit()`` returns, while no
trial trains (``measure_alone``): one trial at a time, in a Ray task holding a whole device of the
trials' kind (one GPU when they trained on GPUs; else the CPU at ``CPU_THREADS`` threads), each value
appended with its method to ``<exp>/latency.jsonl`` (``read_measured``). A run measures the ended trials
that are not measured yet: those an interrupted run left are measured after the next run's fit
(``resume=true``); ``yolotune results`` reads and measures nothing.

Importing this module imports no torch or Ray (results.py reads the record).
"""

from __future__ import annotations

import io
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from yolotune import layout, records
from yolotune.storage import Location

WARMUP_PASSES, TIMED_PASSES = 3, 15
# Torch's CPU threads while timing alone: the same on every machine and resumed run, and the least jitter.
CPU_THREADS = 1
MEASURED_ALONE = "alone"  # the method of every record in latency.jsonl
# The most one trial's measuring may take, its Ray task's start included (18 passes of YOLO11x at 1280 px on
# 1 CPU thread take a few minutes): it ends a wait for a device that no trial's worker gives back.
TIMEOUT_S = 600


def model_costs(weights: Path, imgsz, device) -> Dict[str, float]:
    """MODEL_COSTS of the model in ``weights`` on ``device``, the same way for every trial (``_inference_model``,
    ``forward_times``): the median time, its parameters (millions) and GFLOPs (Ultralytics' get_flops)."""
    from ultralytics.utils.torch_utils import get_flops

    model, image = _inference_model(weights, imgsz, device)
    return {"latency_ms": statistics.median(forward_times(model, image)),
            "params": sum(p.numel() for p in model.parameters()) / 1e6,
            "gflops": get_flops(model, list(image.shape[2:]))}


def latency_alone(weights: bytes, gpu: bool) -> Dict[str, Any]:
    """The latency record of the checkpoint ``weights`` at the image size it trained at (its train_args),
    on GPU 0 or the CPU at CPU_THREADS threads: what a Ray task holding the device runs (``measure_alone``)."""
    import torch

    torch.set_num_threads(CPU_THREADS)
    device = "cuda:0" if gpu else "cpu"
    ckpt = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=False)
    model, image = _inference_model(ckpt, ckpt["train_args"]["imgsz"], device)
    times = forward_times(model, image)
    low, _, high = statistics.quantiles(times, n=4)
    return {"latency_ms": statistics.median(times), "latency_iqr_ms": high - low, "method": MEASURED_ALONE,
            "device": torch.cuda.get_device_name(0) if gpu else "cpu", "threads": torch.get_num_threads(),
            "imgsz": list(image.shape[2:]), "batch": image.shape[0], "precision": "fp32, Conv+BN fused",
            "warmup": WARMUP_PASSES, "repeats": len(times)}


def _inference_model(weights, imgsz, device):
    """The checkpoint's (a path or a loaded one) EMA, which Ultralytics saves as the model, in fp32 with Conv
    and BatchNorm fused (as Ultralytics predicts) on ``device``, and one zero image of ``imgsz`` there."""
    import torch

    ckpt = weights if isinstance(weights, dict) else torch.load(weights, map_location="cpu", weights_only=False)
    model = (ckpt.get("ema") or ckpt["model"]).float().fuse(verbose=False).eval().to(device)
    height, width = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    return model, torch.zeros(1, 3, height, width, device=device)


def forward_times(model, image) -> List[float]:
    """Milliseconds of each of TIMED_PASSES forward passes of ``image`` after WARMUP_PASSES untimed ones,
    each waited for to its end on a GPU."""
    import torch

    sync: Callable[[], None] = torch.cuda.synchronize if image.is_cuda else (lambda: None)
    times = []
    with torch.inference_mode():
        for n in range(WARMUP_PASSES + TIMED_PASSES):
            sync()
            start = time.perf_counter()
            model(image)
            sync()
            if n >= WARMUP_PASSES:
                times.append(1000 * (time.perf_counter() - start))
    return times


def describe(record: Dict[str, Any]) -> str:
    """A latency record's method in words, e.g. ``alone on cpu, 1 thread, 64x64, batch 1, fp32, Conv+BN
    fused, median of 15 after 3 warm-up``."""
    size = "x".join(map(str, record["imgsz"]))
    return (f"{record['method']} on {record['device']}, {layout.count(record['threads'], 'thread')}, {size}, "
            f"batch {record['batch']}, {record['precision']}, median of {record['repeats']} after "
            f"{record['warmup']} warm-up")


def read_measured(exp_dir: Path) -> Dict[str, Dict[str, Any]]:
    """trial id -> its latest latency record in latency.jsonl (none: not measured alone yet)."""
    found, _ = layout.read_jsonl(Path(exp_dir) / layout.MEASURED_LATENCY)
    return {r["trial_id"]: r for r in found
            if isinstance(r.get("trial_id"), str) and isinstance(r.get("latency_ms"), (int, float))}


def unmeasured(trials: List[records.TrialState], measured: Dict[str, Any]) -> List[str]:
    """The trials that ended (TERMINATED: their best weights are final) and have no latency record yet."""
    return [t.trial_id for t in trials if t.status == "TERMINATED" and t.trial_id not in measured]


def measure_alone(location: Location, gpu: bool, say: Optional[Callable[[str], None]] = print) -> List[str]:
    """Time, one at a time, the best weights of every trial of the experiment at ``location`` that ended
    (TERMINATED) and has no latency record yet, each in a Ray task holding one GPU (``gpu``) or
    CPU_THREADS CPUs; append each record to latency.jsonl as it comes (an interrupt keeps those done).
    Call it while no trial runs (after ``tuner.fit()``). Returns the trials measured."""
    import ray

    exp_dir = location.download()  # a store's trial record and latency.jsonl, into the local mirror
    waiting = unmeasured(records.read_trials(exp_dir)[0], read_measured(exp_dir))
    if not waiting:
        return []
    if say:
        device = "a GPU" if gpu else f"the CPU ({layout.count(CPU_THREADS, 'thread')})"
        say(f"Measuring the latency of {layout.count(len(waiting), 'trial')} alone, one at a time, on {device}")
    task = ray.remote(num_cpus=CPU_THREADS, num_gpus=1 if gpu else 0)(latency_alone)
    done = []
    for trial_id in waiting:
        weights = location.fetch(layout.trial_best_weights(trial_id))
        if weights is None:  # it saved no best epoch: no epoch validated
            if say:
                say(f"latency of trial {trial_id} not measured: it has no {layout.TRIAL_BEST_WEIGHTS}")
            continue
        measuring = task.remote(weights.read_bytes(), gpu)
        try:
            record = ray.get(measuring, timeout=TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:  # no device came free (or a model far too slow): none will
            ray.cancel(measuring, force=True)
            if say:
                say(f"latency of trial {trial_id} and the rest not measured: no result within {TIMEOUT_S} s (the "
                    "next run tries again)")
            break
        except Exception as e:  # noqa: BLE001 - one trial's failure leaves the others' and the results to write
            if say:
                say(f"latency of trial {trial_id} not measured (the next run tries again): {layout.first_line(str(e))}")
            continue
        layout.append_jsonl(exp_dir / layout.MEASURED_LATENCY, {"trial_id": trial_id, **record, "time": time.time()})
        done.append(trial_id)
    location.upload(exp_dir / layout.MEASURED_LATENCY)
    return done
