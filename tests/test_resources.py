"""Resources: the plan for a machine or cluster (tables, each value worked out by hand), the loader
workers and threads a trial gets, and the device a trial trains on, with GPUs that Ray declares but
this machine lacks."""

from __future__ import annotations

import math
import os

import pytest
import yaml

from compose import REPO
from yolotune.data import ShapesDataConfig, make_shapes
from yolotune.errors import ConfigError
from yolotune.resources import (GPU_TRIAL_CPUS, Node, ResourcesConfig, TrialResources, check_autobatch,
                                local_cpus, plan, trial_gpu_mb)
from yolotune.gpu_slots import claim_slot, memory_fraction, pushed_out
from yolotune.trainable import claim_device, keep_threads

R = ResourcesConfig
# (resources, CPUs, GPUs of one machine, iterations) -> (cpu per trial, gpu per trial, trials at once)
PLANS = [
    # CPU box: one trial per CPU, up to the trials there are; CPUs shared by those trials only.
    (R(), 2, 0, 10, (1, 0, 2)),                   # at once min(10, 2) = 2; 2 // 2 = 1 CPU
    (R(), 16, 0, 10, (1, 0, 10)),                 # min(10, 16) = 10; 16 // 10 = 1
    (R(), 16, 0, 4, (4, 0, 4)),                   # iterations below the 16 slots: 16 // 4 = 4 CPUs each
    (R(), 16, 0, 16, (1, 0, 16)),                 # iterations = slots
    (R(), 16, 0, 17, (1, 0, 16)),                 # one above: still 16 at once
    (R(max_concurrent_trials=1), 2, 0, 10, (2, 0, 1)),
    (R(max_concurrent_trials=3), 16, 0, 10, (5, 0, 3)),   # 16 // 3 = 5
    # One GPU: up to 4 trials on it, fewer trials get bigger shares.
    (R(), 16, 1, 1, (16, 1, 1)),                  # 1 trial: the whole GPU, all 16 CPUs
    (R(), 16, 1, 2, (8, 0.5, 2)),                 # ceil(2 / 1) = 2 per GPU
    (R(), 16, 1, 4, (4, 0.25, 4)),
    (R(), 16, 1, 10, (4, 0.25, 4)),               # 10 trials: 4 at once (not 16 // 10 CPUs each)
    (R(), 2, 1, 10, (2, 1, 1)),                   # 2 CPUs: 1 trial with both (2 would have no loader worker)
    (R(max_concurrent_trials=3), 16, 1, 10, (5, 1 / 3, 3)),
    # Four GPUs: a trial on each before any shares one; 4 CPUs a trial (3 loader workers) where CPUs allow.
    (R(), 16, 4, 4, (4, 1, 4)),                   # ceil(4 / 4) = 1 per GPU: whole GPUs
    (R(), 16, 4, 5, (4, 1, 4)),                   # 16 CPUs hold 4 trials of 4 CPUs: one per GPU
    (R(), 16, 4, 10, (4, 1, 4)),
    (R(), 16, 4, 16, (4, 1, 4)),
    (R(), 32, 4, 100, (4, 0.5, 8)),               # 32 CPUs: 8 trials of 4, 2 per GPU
    (R(), 64, 4, 100, (4, 0.25, 16)),             # capped at 4 per GPU
    (R(), 2, 4, 10, (1, 1, 2)),                   # 2 CPUs: 2 trials, a whole GPU each
    (R(max_concurrent_trials=3), 16, 4, 10, (5, 1, 3)),
    # Given shares: only whole shares fit (round() counted 0.6 of a GPU twice on one).
    (R(gpu_per_trial=0.6), 16, 1, 10, (16, 0.6, 1)),   # floor(1 / 0.6) = 1
    (R(gpu_per_trial=0.4), 16, 1, 10, (8, 0.4, 2)),    # floor(2.5) = 2
    (R(gpu_per_trial=1 / 3), 16, 1, 10, (5, 1 / 3, 3)),  # 3 thirds fit despite float rounding
    (R(gpu_per_trial=0.25), 16, 4, 10, (4, 0.25, 4)),  # a given share is at most 4 per GPU: CPUs allow 1
    (R(gpu_per_trial=0), 16, 1, 10, (1, 0, 10)),       # CPU trials on a GPU box
    (R(cpu_per_trial=3), 16, 0, 10, (3, 0, 5)),        # floor(16 / 3) = 5
    (R(cpu_per_trial=16), 16, 0, 10, (16, 0, 1)),      # the whole machine: allowed
    (R(cpu_per_trial=0, gpu_per_trial=0.25), 2, 1, 10, (0, 0.25, 4)),  # no CPU limit
    (R(cpu_per_trial=2, gpu_per_trial=1), 16, 4, 10, (2, 1, 4)),
    (R(gpu_per_trial=1), 16, 1, 10, (16, 1, 1)),       # every GPU there is: allowed
]


@pytest.mark.parametrize("res,cpus,gpus,iterations,expected", PLANS)
def test_plan(res, cpus, gpus, iterations, expected):
    planned = plan(res, [(cpus, gpus)], iterations)
    assert (planned.cpu, planned.gpu, planned.at_once) == pytest.approx(expected)
    assert planned.max_concurrent_trials == res.max_concurrent_trials


def preset(name: str) -> ResourcesConfig:
    """A resources option as its YAML sets it, so that the table follows conf/resources/."""
    return R(**(yaml.safe_load((REPO / "conf" / "resources" / f"{name}.yaml").read_text()) or {}))


# GPU machines and clusters: (CPUs, GPUs) per node.
ONE_8 = [(8, 1)]
ONE_16 = [(16, 1)]
FOUR_32 = [(32, 4)]
EIGHT_64 = [(64, 8)]
EIGHT_96 = [(96, 8)]
TWO_FOUR_32 = [(32, 4), (32, 4)]
MIXED = [(64, 8), (16, 0)]  # GPU trials run on the GPU node only
MANY = 1000  # enough trials to fill every node
# (resources, nodes, iterations) -> (cpu, gpu, at once, loader workers, threads, image cache MiB per trial).
# Loader workers: a GPU trial's CPUs but one; 4 CPUs a GPU trial (3 loader workers) where the node has them;
# image cache: 1024 MiB per node (its memory unknown) // trials on the busiest node.
GPU_PLANS = [
    # auto: up to 4 trials per GPU, 4 CPUs each, a node's CPUs shared by the trials on it.
    (preset("auto"), ONE_8, MANY, (4, 0.5, 2, 3, 4, 512)),      # 8 // 4 = 2 trials on the GPU; 1024 // 2
    (preset("auto"), ONE_16, MANY, (4, 0.25, 4, 3, 4, 256)),    # 16 // 4 = 4
    (preset("auto"), FOUR_32, MANY, (4, 0.5, 8, 3, 4, 128)),    # 32 // 4 = 8 trials, 2 per GPU (was 16 of 2 CPUs)
    (preset("auto"), EIGHT_64, MANY, (4, 0.5, 16, 3, 4, 64)),   # 64 // 4 = 16, 2 per GPU (was 32 x 1 worker)
    (preset("auto"), EIGHT_96, MANY, (4, 1 / 3, 24, 3, 4, 42)),  # 96 // 4 = 24, 3 per GPU
    (preset("auto"), TWO_FOUR_32, MANY, (4, 0.5, 16, 3, 4, 128)),  # 8 per node, 2 per GPU
    (preset("auto"), MIXED, MANY, (4, 0.5, 16, 3, 4, 64)),      # the GPU node's 16 trials; 16 CPUs idle
    (preset("auto"), EIGHT_64, 20, (4, 0.5, 16, 3, 4, 64)),     # 20 trials: still 16 at once of 4 CPUs
    (preset("auto"), EIGHT_96, 20, (4, 1 / 3, 20, 3, 4, 51)),   # ceil(20 / 8) = 3 per GPU; 96 // 20 = 4; 1024 // 20
    (preset("auto"), TWO_FOUR_32, 20, (4, 0.5, 16, 3, 4, 128)),
    (preset("auto"), MIXED, 20, (4, 0.5, 16, 3, 4, 64)),        # as EIGHT_64
    (preset("auto"), EIGHT_64, 4, (16, 1, 4, 15, 16, 256)),     # 4 trials: a whole GPU each, 64 // 4 = 16 CPUs
    # gpu: one whole GPU per trial, the node's CPUs shared by its trials.
    (preset("gpu"), ONE_8, MANY, (8, 1, 1, 7, 8, 1024)),
    (preset("gpu"), ONE_16, MANY, (16, 1, 1, 15, 16, 1024)),
    (preset("gpu"), FOUR_32, MANY, (8, 1, 4, 7, 8, 256)),       # 32 // 4 = 8
    (preset("gpu"), EIGHT_64, MANY, (8, 1, 8, 7, 8, 128)),      # 64 // 8 = 8 (4 CPUs each left 32 idle)
    (preset("gpu"), EIGHT_96, MANY, (12, 1, 8, 11, 12, 128)),   # 96 // 8 = 12
    (preset("gpu"), TWO_FOUR_32, MANY, (8, 1, 8, 7, 8, 256)),   # 4 per node: 32 // 4 = 8
    (preset("gpu"), MIXED, MANY, (8, 1, 8, 7, 8, 128)),
    (preset("gpu"), EIGHT_64, 5, (12, 1, 5, 11, 12, 204)),      # 5 trials: 64 // 5 = 12; 1024 // 5
    # fractional: at most four trials per GPU, fewer where a trial would get under 4 CPUs.
    (preset("fractional"), ONE_8, MANY, (4, 0.25, 2, 3, 4, 512)),  # 2 of the 4 quarters: 8 CPUs hold 2 trials
    (preset("fractional"), ONE_16, MANY, (4, 0.25, 4, 3, 4, 256)),
    (preset("fractional"), FOUR_32, MANY, (4, 0.25, 8, 3, 4, 128)),
    (preset("fractional"), EIGHT_64, MANY, (4, 0.25, 16, 3, 4, 64)),  # 2 CPUs each gave 1 loader worker
    (preset("fractional"), EIGHT_96, MANY, (4, 0.25, 24, 3, 4, 42)),
    (preset("fractional"), TWO_FOUR_32, MANY, (4, 0.25, 16, 3, 4, 128)),
    (preset("fractional"), MIXED, MANY, (4, 0.25, 16, 3, 4, 64)),
    (preset("fractional"), EIGHT_64, 20, (4, 0.25, 16, 3, 4, 64)),
    # Set by the user: kept exactly as given.
    (R(cpu_per_trial=4, gpu_per_trial=1), EIGHT_64, MANY, (4, 1, 8, 3, 4, 128)),  # 32 CPUs idle, as asked
    (R(cpu_per_trial=2, gpu_per_trial=0.25), EIGHT_96, MANY, (2, 0.25, 32, 1, 2, 32)),
    (R(cpu_per_trial=6, gpu_per_trial=0.5), TWO_FOUR_32, MANY, (6, 0.5, 10, 5, 6, 204)),  # 32 // 6 = 5 per node
    (R(cpu_per_trial=64, gpu_per_trial=1), MIXED, MANY, (64, 1, 1, 63, 64, 1024)),  # the GPU node's every CPU
    (R(gpu_per_trial=0.5), EIGHT_64, MANY, (4, 0.5, 16, 3, 4, 64)),  # 2 per GPU; 64 // 16 = 4
    (R(max_concurrent_trials=8), EIGHT_64, MANY, (8, 1, 8, 7, 8, 128)),  # ceil(8 / 8) = 1 per GPU
    (R(image_cache_mb=4096), EIGHT_64, MANY, (4, 0.5, 16, 3, 4, 256)),  # 4096 // 16
    (R(image_cache_mb=0), ONE_8, MANY, (4, 0.5, 2, 3, 4, 0)),
    # CPU trials on every node of a cluster with GPUs: one CPU each, 80 at once, no loader workers.
    (R(gpu_per_trial=0), MIXED, MANY, (1, 0, 80, 0, 1, 16)),    # 1024 // 64 on the GPU node
]


@pytest.mark.parametrize("res,nodes,iterations,expected", GPU_PLANS)
def test_gpu_plan(res, nodes, iterations, expected):
    planned = plan(res, nodes, iterations)
    got = (planned.cpu, planned.gpu, planned.at_once, planned.loader_workers, planned.threads, planned.image_cache_mb)
    assert got == pytest.approx(expected)
    hosts = [(c, g) for c, g in nodes if g or not planned.gpu]  # GPU trials run on GPU nodes only
    # Ray places each trial's CPUs and GPU share on one node: the trials at once fit, node by node.
    held = [min(math.floor(c / planned.cpu) if planned.cpu else MANY,
                math.floor(g) * math.floor(1 / planned.gpu + 1e-9) if planned.gpu else MANY) for c, g in hosts]
    assert sum(held) >= planned.at_once
    if res.cpu_per_trial is None and iterations == MANY and not res.max_concurrent_trials:
        assert planned.at_once * planned.cpu >= 0.9 * sum(c for c, _ in hosts)  # the nodes' CPUs are used
    if planned.gpu and planned.cpu >= 3:
        assert planned.loader_workers >= 2
    assert planned.image_cache_mb * min(max(held), planned.at_once) <= (
        1024 if res.image_cache_mb is None else res.image_cache_mb)  # per node


def test_the_plan_in_one_line_and_in_plan_yaml():
    eight = plan(preset("auto"), EIGHT_64, 20)
    assert eight.summary() == ("Plan: 16 trials at once, each 4 CPUs + 0.5 GPU, 3 loader workers, 4 threads, "
                               "image cache 64 MiB per trial (8 GPUs, 64 CPUs on 1 node)")
    assert plan(preset("gpu"), MIXED, 2).summary() == (
        "Plan: 2 trials at once, each 32 CPUs + 1 GPU, 31 loader workers, 32 threads, image cache 512 MiB per trial "
        "(8 GPUs, 80 CPUs on 2 nodes, trials on 1); 6 of 8 GPUs idle")
    assert plan(R(image_cache_mb=0), [(1, 0)], 5).summary() == (
        "Plan: 1 trial at once, each 1 CPU, 0 loader workers, 1 thread, image cache off (0 GPUs, 1 CPU on 1 node)")
    assert eight.record() == {"trials_at_once": 16, "cpu_per_trial": 4.0, "gpu_per_trial": 0.5, "loader_workers": 3,
                              "threads": 4, "image_cache_mb_per_trial": 64, "max_concurrent_trials": None,
                              "gpu_mb_per_trial": None, "gpu_memory_mb": None, "nodes": [{"cpus": 64.0, "gpus": 8.0}]}
    # Fewer trials at once than GPUs: the idle ones are said; the memory a trial needs, of one GPU's
    assert plan(preset("gpu"), [Node(64, 8, 0, 81920)], 3, gpu_mb=3000).summary() == (
        "Plan: 3 trials at once, each 21 CPUs + 1 GPU (~2.9 of 80 GiB), 20 loader workers, 21 threads, image cache "
        "341 MiB per trial (8 GPUs, 64 CPUs on 1 node); 5 of 8 GPUs idle")
    assert plan(preset("gpu"), EIGHT_64, 8).summary().endswith("on 1 node)")  # none idle


def test_a_cluster_is_planned_from_its_alive_nodes(monkeypatch):
    """A dead node's resources are gone; a node without GPUs has no "GPU" key in Ray's record."""
    import ray

    from yolotune.runner import cluster_nodes

    monkeypatch.setattr(ray, "nodes", lambda: [
        {"Alive": True, "Resources": {"CPU": 64.0, "GPU": 8.0, "memory": 1e11}},
        {"Alive": True, "Resources": {"CPU": 16.0}},
        {"Alive": False, "Resources": {"CPU": 96.0, "GPU": 8.0}},
    ])
    assert cluster_nodes() == [(64.0, 8.0, 1e11 / 2**20, 0), (16.0, 0, 0, 0)]  # Ray's memory: what its tasks may use
    assert plan(preset("auto"), cluster_nodes(), 20).summary().endswith("(8 GPUs, 80 CPUs on 2 nodes, trials on 1)")


NO_GPU = "this machine (or cluster) has no GPU; use resources=cpu (or resources.gpu_per_trial=0)"


@pytest.mark.parametrize("res,nodes,key,value,allowed", [
    (R(gpu_per_trial=1), [(2, 0)], "resources.gpu_per_trial", 1, NO_GPU),
    (R(gpu_per_trial=0.25), [(2, 0)], "resources.gpu_per_trial", 0.25, NO_GPU),
    (R(gpu_per_trial=0.25), [(16, 0), (16, 0)], "resources.gpu_per_trial", 0.25, NO_GPU),
    (R(gpu_per_trial=1), [(16, 0.5)], "resources.gpu_per_trial", 1, "at most the 0.5 GPUs of one node"),
    (R(gpu_per_trial=3), [(16, 2)], "resources.gpu_per_trial", 3, "at most the 2 GPUs of one node"),
    (R(cpu_per_trial=17), [(16, 0)], "resources.cpu_per_trial", 17, "at most the 16 CPUs of one node"),
    # A trial's CPUs come from one node: two 32-CPU nodes do not hold a 40-CPU trial.
    (R(cpu_per_trial=40), TWO_FOUR_32, "resources.cpu_per_trial", 40, "at most the 32 CPUs of one GPU node"),
    # The CPU-only node is bigger, but GPU trials do not run there.
    (R(cpu_per_trial=65), [(64, 8), (128, 0)], "resources.cpu_per_trial", 65, "at most the 64 CPUs of one GPU node"),
    (R(cpu_per_trial=65, gpu_per_trial=0), MIXED, "resources.cpu_per_trial", 65, "at most the 64 CPUs of one node"),
])
def test_plan_beyond_the_machine(res, nodes, key, value, allowed):
    with pytest.raises(ConfigError) as err:
        plan(res, nodes, 10)
    assert (err.value.key, err.value.value, err.value.allowed) == (key, value, allowed)


@pytest.mark.parametrize("cpu,gpu,workers", [(0, 0.25, 0), (1, 0.25, 0), (2, 0.25, 1), (3, 0.25, 2), (4, 1, 3),
                                             (16, 1, 15), (1, 0, 0), (16, 0, 0)])
def test_loader_workers_leave_one_cpu_for_the_training_loop(cpu, gpu, workers):
    """Validation's loader runs while training waits for it: it needs no CPUs of its own. A CPU trial
    has none (Ultralytics trains on the CPU without loader processes)."""
    trial = TrialResources(cpu=cpu, gpu=gpu, max_concurrent_trials=None, at_once=1, image_cache_mb=0,
                           nodes=((16, 1),), hosts=1)
    assert trial.loader_workers == workers


@pytest.mark.parametrize("step", ["training", "final validation"])
def test_a_trial_keeps_its_threads_after_ultralytics_sets_its_own(step, shapes_cache, tmp_path, monkeypatch):
    """select_device sets torch's threads to Ultralytics' NUM_THREADS (min(8, cores - 1)) on the CPU, in
    the trainer's set-up and in the final validation of best.pt: a trial's own (3 here) are set back."""
    import torch
    from ultralytics import YOLO
    from ultralytics.models.yolo.detect import DetectionTrainer, DetectionValidator
    from ultralytics.utils import torch_utils

    monkeypatch.setattr(torch_utils, "NUM_THREADS", 8)
    data = make_shapes(ShapesDataConfig(train_images=4, val_images=2, imgsz=64, cache_dir=str(shapes_cache)))
    args = {"data": str(data / "data.yaml"), "device": "cpu", "imgsz": 64, "batch": 2, "plots": False,
            "project": str(tmp_path), "name": "train"}
    model = YOLO("yolo11n.yaml")
    keep_threads(model, 3)
    before = torch.get_num_threads()
    try:
        if step == "training":
            DetectionTrainer(overrides={**args, "model": "yolo11n.yaml"}, _callbacks=model.callbacks)
        else:
            DetectionValidator(args=args, _callbacks=model.callbacks)(model=model.model)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_local_cpus_follow_the_process_affinity():
    assert local_cpus() == len(os.sched_getaffinity(0)) <= os.cpu_count()


def test_local_cpus_are_the_affinity_else_the_cpu_count_else_one(monkeypatch):
    """A process pinned to fewer CPUs than the machine has (taskset, a container) may use those only;
    systems without affinity (macOS) have the CPU count, which may be unknown (None)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert local_cpus() == 1
    monkeypatch.delattr(os, "sched_getaffinity")
    assert local_cpus() == 8
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert local_cpus() == 1


@pytest.mark.parametrize("gpu_ids,visible,expected", [
    ([], None, ("cpu", "")), ([3], "3", ("0", "3")), ([0], "0", ("0", "0")), ([5, 6], "5,6", ("0,1", "5,6")),
])
def test_claim_device(gpu_ids, visible, expected, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible or "")  # restored after the test
    if visible is None:  # what Ray leaves to a trial without GPUs
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert claim_device(gpu_ids) == expected
    assert os.environ["CUDA_VISIBLE_DEVICES"] == (visible or "")  # a CPU trial sees no GPU at all


def test_a_trial_given_gpus_that_ray_named_nowhere_records_none(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert claim_device([2]) == ("0", "")


@pytest.mark.slow
def test_trials_get_their_own_gpus_from_ray():
    """Ray with 4 declared GPUs (none exist): each task gets its share, CUDA_VISIBLE_DEVICES names it
    and the trial trains on it as device 0; a task without GPUs trains on the CPU."""
    import ray

    def placed():
        return claim_device(ray.get_gpu_ids()), os.environ["CUDA_VISIBLE_DEVICES"]

    ray.init(address="local", num_cpus=2, num_gpus=4, include_dashboard=False, log_to_driver=False)
    try:
        whole = ray.get([ray.remote(num_gpus=1, num_cpus=0)(placed).remote() for _ in range(4)])
        quarter = ray.get([ray.remote(num_gpus=0.25, num_cpus=0)(placed).remote() for _ in range(4)])
        cpu = ray.get(ray.remote(num_gpus=0, num_cpus=1)(placed).remote())
    finally:
        ray.shutdown()
    assert sorted(gpu for (_, gpu), _ in whole) == ["0", "1", "2", "3"]
    assert all(device == "0" and visible == gpu for (device, gpu), visible in whole + quarter)
    assert cpu == (("cpu", ""), "")


@pytest.mark.parametrize("gpu,refused", [(None, False), (0.0, False), (0.25, True), (0.999, True), (1.0, False)])
def test_autobatch_is_refused_only_on_a_shared_gpu(gpu, refused):
    """batch=-1 sizes the batch from the whole card: fine on the CPU (gpu 0) and on whole GPUs."""
    from compose import experiment

    exp = experiment("train.batch=-1")
    if refused:
        with pytest.raises(ConfigError) as err:
            check_autobatch(exp, gpu)
        assert (err.value.key, err.value.value) == ("train.batch", -1)
    else:
        check_autobatch(exp, gpu)


@pytest.mark.parametrize("batch,refused", [(-1, True), (0.5, True), (0.999, True), (1, False), (16, False),
                                           (0.0, False), (1.0, False)])
def test_autobatch_rule_refuses_autobatch_values_only(batch, refused):
    """-1 and fractions in (0, 1) are AutoBatch; 0.0 and 1.0 are not, and get the batch rule's own
    message from train_args.check_values instead of this one."""
    from compose import experiment

    exp = experiment(f"train.batch={batch}")
    if refused:
        with pytest.raises(ConfigError) as err:
            check_autobatch(exp, 0.5)
        assert (err.value.key, err.value.value) == ("train.batch", batch)
        assert err.value.allowed == ("a fixed batch size: AutoBatch sizes it from the whole GPU's free memory, but "
                                     "gpu_per_trial=0.5 shares the GPU with other trials")
    else:
        check_autobatch(exp, 0.5)


# --- The plan over machine shapes and sweep sizes (issue 34) -------------------------------------

SHAPES = {"1 GPU + 4": [(4, 1)], "1 GPU + 8": [(8, 1)], "1 GPU + 16": [(16, 1)], "8 GPUs + 32": [(32, 8)],
          "8 GPUs + 64": [(64, 8)], "8 GPUs + 96": [(96, 8)], "2 x (4 GPUs + 32)": [(32, 4), (32, 4)]}
SMALL_MB, LARGE_MB = trial_gpu_mb(2.6e6, 6.5, 16, 640), trial_gpu_mb(20.1e6, 68.0, 32, 640)  # YOLO11n b16, 11m b32


def placed(planned, nodes, directory):
    """Trials per GPU when the plan's trials at once start: Ray fills node after node up to what each
    holds (its worst spread), and on each node every trial takes a slot (gpu_slots.claim_slot, real
    lock files) as a trial's worker does."""
    per_gpu, left, held = [], planned.at_once, []
    for n, (cpus, gpus) in enumerate(nodes):
        on_node = min(left, math.floor(cpus / planned.cpu), gpus * math.floor(1 / planned.gpu + 1e-9))
        left -= on_node
        ids = [str(i) for i in range(gpus)]
        held += [claim_slot(directory / f"node{n}", ids, math.floor(1 / planned.gpu + 1e-9)) for _ in range(on_node)]
        per_gpu += [sum(slot[0] == gpu for slot in held[-on_node:] if slot) if on_node else 0 for gpu in ids]
    assert left == 0 and all(held)
    for _, file in held:
        file.close()
    return per_gpu


@pytest.mark.parametrize("name", ["auto", "cpu", "fractional", "gpu"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("card_mb,gpu_mb", [(81920, SMALL_MB), (24576, LARGE_MB)])
def test_every_gpu_busy_loaders_fed_memory_kept(name, shape, card_mb, gpu_mb, tmp_path):
    """Each sweep size: trials per GPU within one of each other (floor or ceil of trials / GPUs), every
    GPU busy while there are trials for it, >= 3 loader workers where the node has 4 CPUs a GPU, and no
    more trials on a GPU than its memory holds by the estimate (a given share that it cannot hold is refused)."""
    nodes = [Node(c, g, 0, card_mb) for c, g in SHAPES[shape]]
    for trials in (4, 8, 12, 20, 50, 200):
        try:
            planned = plan(preset(name), nodes, trials, gpu_mb)
        except ConfigError as refused:
            assert name == "fractional" and 4 * gpu_mb > card_mb, refused
            assert (refused.key, refused.value) == ("resources.gpu_per_trial", 0.25)
            continue
        if not planned.gpu:
            assert name == "cpu" and planned.at_once == min(trials, sum(c for c, _ in SHAPES[shape]))
            continue
        gpus = sum(g for _, g in SHAPES[shape])
        per_gpu = placed(planned, SHAPES[shape], tmp_path / f"{trials}")
        assert sum(per_gpu) == planned.at_once
        assert max(per_gpu) - min(per_gpu) <= 1, per_gpu
        assert max(per_gpu) <= math.ceil(planned.at_once / gpus) and min(per_gpu) == planned.at_once // gpus
        assert planned.at_once >= min(trials, gpus)  # a GPU idles only when there are fewer trials than GPUs
        if all(c >= GPU_TRIAL_CPUS * g for c, g in SHAPES[shape]):
            assert planned.loader_workers >= 3
        assert max(per_gpu) * gpu_mb <= card_mb


def test_slots_go_round_the_gpus_and_a_freed_one_is_taken_first(tmp_path):
    taken = [claim_slot(tmp_path, ["0", "1", "2"], 2) for _ in range(4)]
    assert [gpu for gpu, _ in taken] == ["0", "1", "2", "0"]
    taken[1][1].close()  # its worker process ended
    again = claim_slot(tmp_path, ["0", "1", "2"], 2)
    assert again[0] == "1"
    more = [claim_slot(tmp_path, ["0", "1", "2"], 2) for _ in range(2)]  # held: an unreferenced file closes
    assert [gpu for gpu, _ in more] == ["1", "2"]
    assert claim_slot(tmp_path, ["0", "1", "2"], 2) is None  # all 6 held: Ray's own choice stands


def test_memory_share_and_a_trial_pushed_out():
    assert memory_fraction(0.25, 81920) == pytest.approx(0.25 - 1024 / 81920)
    assert memory_fraction(0.25, 2048) == 0.05  # a tiny card: never nothing
    # 4 trials on 80 GiB: a trial's allocator share is 19456 MiB; it ran out holding 10000 with 500 free
    assert pushed_out(10000, 500, 81920, 0.25)
    assert not pushed_out(18000, 500, 81920, 0.25)  # it had (nearly) its whole share: its own error
    assert not pushed_out(100, 0, 81920, 1.0)  # a whole GPU: nobody else's


def test_the_gpu_memory_estimate():
    """CUDA context + 20 bytes per parameter + batch x (imgsz / 640)^2 x 41 MiB x GFLOPs^0.53."""
    assert trial_gpu_mb(0, 1, 1, 640) == 1024 + 41
    assert trial_gpu_mb(2**20, 1, 2, 320) == 1024 + 20 + 2 * 0.25 * 41
    assert 2500 < SMALL_MB < 3200 and 13000 < LARGE_MB < 15000  # YOLOv8n/m logs: 2.4 and 6.9 GB at batch 16


def test_memory_limits_trials_per_gpu_and_refuses_what_does_not_fit():
    one = [Node(64, 1, 0, 24576)]
    assert plan(preset("auto"), one, 100, gpu_mb=10000).at_once == 2  # 24576 // 10000
    assert plan(R(gpu_mb_per_trial=20000), one, 100, gpu_mb=1000).at_once == 1  # the key overrides the estimate
    with pytest.raises(ConfigError) as err:
        plan(preset("auto"), one, 100, gpu_mb=30000)
    assert (err.value.key, err.value.value) == ("resources.gpu_mb_per_trial", 30000)
    with pytest.raises(ConfigError) as err:
        plan(R(gpu_per_trial=0.5), one, 100, gpu_mb=13000)
    assert err.value.allowed.startswith("at least 1: 2 trials of ~13000 MiB do not fit the 24576 MiB of one GPU")
    assert plan(R(gpu_per_trial=0.5), one, 100, gpu_mb=12000).at_once == 2  # the boundary: 2 x 12000 fit


def test_image_cache_from_the_nodes_memory():
    assert plan(preset("auto"), [Node(64, 8, 512 * 1024)], 100).image_cache_mb == 512 * 1024 // 8 // 16
    assert plan(preset("cpu"), [Node(4, 0, 16384)], 100).image_cache_mb == 16384 // 8 // 4
    assert plan(preset("cpu"), [Node(4, 0)], 100).image_cache_mb == 1024 // 4  # memory unknown


def _cgroup(tmp_path, own: str, files: dict):
    """A fake /sys/fs/cgroup and /proc/self/cgroup."""
    for path, text in files.items():
        (tmp_path / "fs" / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / path).write_text(text)
    (tmp_path / "fs").mkdir(exist_ok=True)
    (tmp_path / "self").write_text(own)
    return tmp_path / "fs", tmp_path / "self"


@pytest.mark.parametrize("own,files,cpus", [
    ("0::/\n", {"cpu.max": "800000 100000\n"}, 8),                          # v2, a container's own root
    ("0::/kubepods/pod1\n", {"kubepods/pod1/cpu.max": "max 100000\n", "kubepods/cpu.max": "250000 100000\n"}, 2),
    ("0::/\n", {"cpu.max": "max 100000\n"}, None),                          # no limit
    ("4:cpu,cpuacct:/docker/abc\n", {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "400000\n",
                                     "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"}, 4),  # v1
    ("4:cpu,cpuacct:/\n", {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, None),
    ("0::/\n", {}, None),                                                   # no cgroup files (macOS, old kernels)
])
def test_cpus_honour_the_cgroup_limit(own, files, cpus, tmp_path, monkeypatch):
    """A pod limited to 8 CPUs on a 96-core host plans for 8 (a fractional quota rounds down, at least 1)."""
    root, self_cgroup = _cgroup(tmp_path, own, files)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(96)), raising=False)
    assert local_cpus(root, self_cgroup) == (cpus or 96)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert local_cpus(root, self_cgroup) == 1  # the affinity still counts


def test_the_estimate_takes_the_largest_model_batch_and_image_a_trial_may_get():
    """The driver's estimate (preflight.gpu_memory_estimate): the model's parameters and its GFLOPs at 640 px
    (Ultralytics' count), the largest batch and imgsz of train and space; none with AutoBatch."""
    from compose import experiment
    from ultralytics import YOLO
    from ultralytics.utils.torch_utils import get_flops

    from yolotune.preflight import gpu_memory_estimate

    model = YOLO("yolo11n.yaml").model
    params, gflops = sum(p.numel() for p in model.parameters()), get_flops(model, 640)
    assert 2.5e6 < params < 2.7e6 and 6 < gflops < 7  # YOLO11n, as Ultralytics lists it
    exp = experiment("train.batch=8", "+space.batch='choice([4, 32])'", "train.imgsz=320", "+space.imgsz='choice([256, 480])'")
    assert gpu_memory_estimate(exp, ["yolo11n.yaml"]) == pytest.approx(trial_gpu_mb(params, gflops, 32, 480))
    assert gpu_memory_estimate(experiment("train.batch=-1"), ["yolo11n.yaml"]) is None


@pytest.mark.parametrize("share,fraction", [(0.25, 0.25 - 1024 / 81920), (0.5, 0.5 - 1024 / 81920), (1.0, None),
                                            (0.0, None)])
def test_a_trial_sharing_a_gpu_is_held_to_its_share(share, fraction, monkeypatch):
    """torch's allocator may take the trial's share of the card, less its CUDA context; whole GPUs and CPU
    trials are not capped."""
    from types import SimpleNamespace

    import torch

    from yolotune.gpu_slots import cap_memory

    capped = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=80 * 2**30))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, device: capped.append((f, device)))
    cap_memory(share)
    assert capped == ([] if fraction is None else [(pytest.approx(fraction), 0)])


@pytest.mark.parametrize("files,limit_mb", [
    ({"memory.max": "8589934592\n"}, 8192),                               # v2: a pod limited to 8 GiB
    ({"memory.max": "max\n"}, None),                                      # no limit
    ({"memory/memory.limit_in_bytes": "4294967296\n"}, 4096),             # v1
    ({"memory/memory.limit_in_bytes": str(2**63 - 4096) + "\n"}, None),   # v1's "no limit": above the machine's
    ({}, None),
])
def test_memory_honours_the_cgroup_limit(files, limit_mb, tmp_path):
    """The image cache's budget is an eighth of it: a container's limit, not its host's memory."""
    from yolotune.resources import local_memory_mb

    root, _ = _cgroup(tmp_path, "0::/\n", files)
    machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    assert local_memory_mb(root) == (limit_mb or machine)
