"""Resources: the plan for a machine (table, each value worked out by hand), the loader workers a
trial gets, and the device a trial trains on, with GPUs that Ray declares but this machine lacks."""

from __future__ import annotations

import os

import pytest

from yolotune.errors import ConfigError
from yolotune.resources import ResourcesConfig, TrialResources, check_autobatch, local_cpus, plan
from yolotune.trainable import claim_device

R = ResourcesConfig
# (resources, CPUs, GPUs, iterations) -> (cpu per trial, gpu per trial, trials at once)
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
    (R(), 2, 1, 10, (1, 0.5, 2)),                 # 2 CPUs allow 2 at once: half a GPU each
    (R(max_concurrent_trials=3), 16, 1, 10, (5, 1 / 3, 3)),
    # Four GPUs: trials spread over all of them before sharing one.
    (R(), 16, 4, 4, (4, 1, 4)),                   # ceil(4 / 4) = 1 per GPU: whole GPUs
    (R(), 16, 4, 5, (3, 0.5, 5)),                 # ceil(5 / 4) = 2 per GPU; 16 // 5 = 3
    (R(), 16, 4, 10, (1, 1 / 3, 10)),             # ceil(10 / 4) = 3 per GPU (was 0.25: 4/4/2/0)
    (R(), 16, 4, 16, (1, 0.25, 16)),
    (R(), 16, 4, 100, (1, 0.25, 16)),             # capped at 4 per GPU
    (R(), 2, 4, 10, (1, 1, 2)),                   # 2 CPUs: 2 trials, a whole GPU each
    (R(max_concurrent_trials=3), 16, 4, 10, (5, 1, 3)),
    # Given shares: only whole shares fit (round() counted 0.6 of a GPU twice on one).
    (R(gpu_per_trial=0.6), 16, 1, 10, (16, 0.6, 1)),   # floor(1 / 0.6) = 1
    (R(gpu_per_trial=0.4), 16, 1, 10, (8, 0.4, 2)),    # floor(2.5) = 2
    (R(gpu_per_trial=1 / 3), 16, 1, 10, (5, 1 / 3, 3)),  # 3 thirds fit despite float rounding
    (R(gpu_per_trial=0.25), 16, 4, 10, (1, 0.25, 10)),
    (R(gpu_per_trial=0), 16, 1, 10, (1, 0, 10)),       # CPU trials on a GPU box
    (R(cpu_per_trial=3), 16, 0, 10, (3, 0, 5)),        # floor(16 / 3) = 5
    (R(cpu_per_trial=16), 16, 0, 10, (16, 0, 1)),      # the whole machine: allowed
    (R(cpu_per_trial=0, gpu_per_trial=0.25), 2, 1, 10, (0, 0.25, 4)),  # no CPU limit
    (R(cpu_per_trial=2, gpu_per_trial=1), 16, 4, 10, (2, 1, 4)),
    (R(gpu_per_trial=1), 16, 1, 10, (16, 1, 1)),       # every GPU there is: allowed
]


@pytest.mark.parametrize("res,cpus,gpus,iterations,expected", PLANS)
def test_plan(res, cpus, gpus, iterations, expected):
    planned = plan(res, cpus, gpus, iterations)
    assert (planned.cpu, planned.gpu, planned.at_once) == pytest.approx(expected)
    assert planned.max_concurrent_trials == res.max_concurrent_trials


@pytest.mark.parametrize("res,cpus,gpus,key,value,allowed", [
    (R(gpu_per_trial=1), 2, 0, "resources.gpu_per_trial", 1, "this machine has no GPU; use resources=cpu (or "
                                                              "resources.gpu_per_trial=0)"),
    (R(gpu_per_trial=0.25), 2, 0, "resources.gpu_per_trial", 0.25, "this machine has no GPU; use resources=cpu (or "
                                                                    "resources.gpu_per_trial=0)"),
    (R(gpu_per_trial=1), 16, 0.5, "resources.gpu_per_trial", 1, "at most the 0.5 GPUs available"),  # more than there is
    (R(gpu_per_trial=3), 16, 2, "resources.gpu_per_trial", 3, "at most the 2 GPUs available"),
    (R(cpu_per_trial=17), 16, 0, "resources.cpu_per_trial", 17, "at most the 16 CPUs available"),
])
def test_plan_beyond_the_machine(res, cpus, gpus, key, value, allowed):
    with pytest.raises(ConfigError) as err:
        plan(res, cpus, gpus, 10)
    assert (err.value.key, err.value.value, err.value.allowed) == (key, value, allowed)


@pytest.mark.parametrize("cpu,workers", [(1, 0), (2, 0), (3, 0), (4, 1), (5, 1), (6, 2), (16, 7)])
def test_loader_workers_stay_within_the_trials_cpus(cpu, workers):
    # Training: the loop, the pin-memory thread and `workers` loaders; validation: 2 * workers loaders.
    assert TrialResources(cpu=cpu, gpu=0.25, max_concurrent_trials=None, at_once=1).loader_workers == workers
    assert workers == 0 or 2 * workers + 2 <= cpu < 2 * (workers + 1) + 2


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
