"""Every user mistake is one ConfigError naming the key, before Ray or torch start, and nothing is
written. The table runs in-process through the CLI's own steps (normalize, compose, prepare,
preflight): fast, nothing trains. A few cases also run as a user types them, in a subprocess.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from conftest import run_cli
from yolotune.cli import prepare
from yolotune.config import register_configs
from yolotune.errors import ConfigError
from yolotune.overrides import composition_error, normalize, replace_space_entries

register_configs()

# A valid small experiment: every case changes one thing.
BASE = ["model=yolo11n-scratch", "space=minimal", "train.epochs=10", "train.imgsz=64", "train.batch=2", "iterations=2"]


def attempt(storage: Path, cache: Path, *overrides: str, preflight: bool = True):
    """The CLI's path up to the first trial, in-process; returns the prepared experiment."""
    own_data = any(o.startswith("data=") for o in overrides)
    shapes = [] if own_data else ["data=shapes", "data.train_images=4", "data.val_images=2", "data.imgsz=64",
                                  f"data.cache_dir={cache}"]
    argv = normalize([f"storage={storage}", "name=bad", *shapes, *overrides])
    try:
        with initialize_config_module("yolotune.conf", version_base="1.3"):
            cfg = compose("config", overrides=argv)
    except Exception as e:  # noqa: BLE001
        error = composition_error(e, argv)
        if error is None:
            raise
        raise error from None
    replace_space_entries(cfg, argv)
    exp, exp_dir, _ = prepare(cfg, argv)
    if preflight:
        from yolotune.runner import preflight as heavy_checks

        heavy_checks(exp, exp_dir)
    return exp


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    """Data YAMLs broken in each way, and model files that do not load."""
    root = tmp_path_factory.mktemp("bad-data")
    (root / "images").mkdir()
    files = {
        "empty.yaml": "",
        "list.yaml": "- a\n- b\n",
        "notyaml.yaml": "train: [unclosed\n",
        "no_train.yaml": "val: images\nnames: {0: a}\n",
        "no_val.yaml": "train: images\nnames: {0: a}\n",
        "no_names.yaml": "train: images\nval: images\n",
        "missing_dirs.yaml": f"path: {root}\ntrain: nowhere/train\nval: nowhere/val\nnames: {{0: a}}\n",
        "broken.pt": "not a checkpoint",
        "broken_model.yaml": "backbone: 3\n",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    (root / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (root / "a_file").write_text("x")
    return root


# (case id, overrides, key named by the error)
CASES = [
    # 1. Hydra composition: unknown or misspelt keys, groups and options, wrong types, syntax
    ("typo-group-key", ["scheduler.grace_periood=3"], "scheduler.grace_periood"),
    ("unknown-top-key", ["iteration=3"], "iteration"),
    ("unknown-add", ["+foo=1"], "foo"),
    ("unknown-add-nested", ["+scheduler.foo=1"], "scheduler.foo"),
    ("unknown-nested", ["resources.gpus=1"], "resources.gpus"),
    ("unknown-model-key", ["model.weight=x.pt"], "model.weight"),
    ("unknown-wandb-key", ["wandb.projekt=x"], "wandb.projekt"),
    ("unknown-failure-key", ["failure.retries=2"], "failure.retries"),
    ("unknown-ray-key", ["ray.adress=auto"], "ray.adress"),
    ("unknown-group-option", ["scheduler=foo"], "scheduler"),
    ("typo-group-option", ["scheduler=ashaa"], "scheduler"),
    ("unknown-search", ["search=grid"], "search"),
    ("unknown-space-option", ["space=big"], "space"),
    ("unknown-data-option", ["data=coco"], "data"),
    ("unknown-model-option", ["model=yolo8n"], "model"),
    ("unknown-resources-option", ["resources=tpu"], "resources"),
    ("unknown-wandb-option", ["wandb=on"], "wandb"),
    ("unknown-preset", ["experiment=fast"], "experiment"),
    ("schema-option", ["scheduler=schema_asha"], "scheduler"),
    ("schema-group", ["schema/scheduler=asha"], "schema/scheduler"),
    ("iterations-word", ["iterations=ten"], "iterations"),
    ("iterations-float", ["iterations=2.5"], "iterations"),
    ("iterations-null", ["iterations=null"], "iterations"),
    ("resume-word", ["resume=maybe"], "resume"),
    ("seed-word", ["seed=abc"], "seed"),
    ("grace-word", ["scheduler.grace_period=soon"], "scheduler.grace_period"),
    ("rf-word", ["scheduler.reduction_factor=x"], "scheduler.reduction_factor"),
    ("cpu-word", ["resources.cpu_per_trial=abc"], "resources.cpu_per_trial"),
    ("gpu-word", ["resources.gpu_per_trial=half"], "resources.gpu_per_trial"),
    ("concurrency-float", ["resources.max_concurrent_trials=1.5"], "resources.max_concurrent_trials"),
    ("shapes-word", ["data.train_images=many"], "data.train_images"),
    ("max-failures-word", ["failure.max_failures=x"], "failure.max_failures"),
    ("syntax-open-bracket", ["iterations=["], "iterations"),
    ("syntax-open-brace", ["train.lr0={"], "train.lr0"),
    ("data-yaml-on-shapes", ["data.yaml=my.yaml"], "data.yaml"),
    ("wandb-tags-not-list", ["wandb.tags=5"], "wandb.tags"),
    # 4. values that Ray or Ultralytics would reject later
    ("iterations-zero", ["iterations=0"], "iterations"),
    ("iterations-negative", ["iterations=-3"], "iterations"),
    ("epochs-zero", ["train.epochs=0"], "train.epochs"),
    ("epochs-float", ["train.epochs=2.5"], "train.epochs"),
    ("grace-zero", ["scheduler.grace_period=0"], "scheduler.grace_period"),
    ("grace-past-epochs", ["scheduler.grace_period=11"], "scheduler.grace_period"),
    ("max-t-zero", ["scheduler.max_t=0"], "scheduler.max_t"),
    ("max-t-past-epochs", ["scheduler.max_t=11"], "scheduler.max_t"),
    ("grace-past-max-t", ["train.epochs=5", "scheduler.grace_period=3", "scheduler.max_t=2"], "scheduler.grace_period"),
    ("rf-one", ["scheduler.reduction_factor=1"], "scheduler.reduction_factor"),
    ("rf-below-one", ["scheduler.reduction_factor=0.5"], "scheduler.reduction_factor"),
    ("rf-nan", ["scheduler.reduction_factor=nan"], "scheduler.reduction_factor"),
    ("rf-inf", ["scheduler.reduction_factor=inf"], "scheduler.reduction_factor"),
    ("brackets-zero", ["scheduler.brackets=0"], "scheduler.brackets"),
    ("hyperband-rf", ["scheduler=hyperband", "scheduler.reduction_factor=1"], "scheduler.reduction_factor"),
    ("hyperband-max-t", ["scheduler=hyperband", "scheduler.max_t=11"], "scheduler.max_t"),
    ("median-grace", ["scheduler=median", "scheduler.grace_period=0"], "scheduler.grace_period"),
    ("median-samples", ["scheduler=median", "scheduler.grace_period=1", "scheduler.min_samples_required=0"],
     "scheduler.min_samples_required"),
    ("pbt-interval-zero", ["scheduler=pbt", "scheduler.perturbation_interval=0"], "scheduler.perturbation_interval"),
    ("pbt-interval-past", ["scheduler=pbt", "scheduler.perturbation_interval=11"], "scheduler.perturbation_interval"),
    ("pbt-quantile", ["scheduler=pbt", "scheduler.perturbation_interval=1", "scheduler.quantile_fraction=0.6"],
     "scheduler.quantile_fraction"),
    ("pbt-quantile-negative", ["scheduler=pbt", "scheduler.perturbation_interval=1",
                               "scheduler.quantile_fraction=-0.1"], "scheduler.quantile_fraction"),
    ("pbt-resample", ["scheduler=pbt", "scheduler.perturbation_interval=1", "scheduler.resample_probability=1.5"],
     "scheduler.resample_probability"),
    ("pbt-grid", ["scheduler=pbt", "scheduler.perturbation_interval=1", "space.lr0='grid([0.01, 0.1])'"],
     "space.lr0.dist"),
    ("optuna-startup", ["search=optuna", "search.n_startup_trials=-1"], "search.n_startup_trials"),
    ("optuna-grid", ["search=optuna", "space.lr0='grid([0.01, 0.1])'"], "space.lr0.dist"),
    ("hyperopt-points", ["search=hyperopt", "search.n_initial_points=-2"], "search.n_initial_points"),
    ("bohb-rf", ["search=bohb", "search.reduction_factor=1"], "search.reduction_factor"),
    ("cpu-negative", ["resources.cpu_per_trial=-1"], "resources.cpu_per_trial"),
    ("cpu-zero-no-gpu", ["resources.cpu_per_trial=0", "resources.gpu_per_trial=0"], "resources.cpu_per_trial"),
    ("cpu-nan", ["resources.cpu_per_trial=nan"], "resources.cpu_per_trial"),
    ("gpu-negative", ["resources.gpu_per_trial=-0.5"], "resources.gpu_per_trial"),
    ("gpu-odd-fraction", ["resources.gpu_per_trial=1.5"], "resources.gpu_per_trial"),
    ("gpu-none-here", ["resources=gpu"], "resources.gpu_per_trial"),
    ("cpu-beyond-machine", ["resources.cpu_per_trial=512"], "resources.cpu_per_trial"),
    ("concurrency-zero", ["resources.max_concurrent_trials=0"], "resources.max_concurrent_trials"),
    ("max-failures-negative", ["failure.max_failures=-1"], "failure.max_failures"),
    ("metric-unknown", ["metric=mAP"], "metric"),
    ("metric-empty", ["metric=''"], "metric"),
    ("mode-word", ["mode=maximum"], "mode"),
    ("seed-negative", ["seed=-1"], "seed"),
    ("seed-huge", ["seed=99999999999"], "seed"),
    ("wandb-mode", ["wandb.mode=sometimes"], "wandb.mode"),
    ("wandb-project-slash", ["wandb=offline", "wandb.project=a/b"], "wandb.project"),
    ("momentum-negative", ["~space.momentum", "+train.momentum=-0.1"], "train.momentum"),
    ("momentum-above-one", ["~space.momentum", "+train.momentum=1.5"], "train.momentum"),
    ("space-momentum-high", ["space.momentum.high=1.5"], "space.momentum.high"),
    ("space-lr0-high", ["space.lr0.high=2.0"], "space.lr0.high"),
    ("space-lrf-low", ["space.lrf.low=-0.5"], "space.lrf.low"),
    ("space-wd-high", ["space.weight_decay.high=3"], "space.weight_decay.high"),
    ("space-choice-bad-value", ["+space.mosaic='choice([0.5, 2.0])'"], "space.mosaic.values[1]"),
    ("space-choice-bad-type", ["+space.cos_lr={dist:choice,values:[true,3]}"], "space.cos_lr.values[1]"),
    ("space-warmup-word", ["space.warmup_epochs='choice([1, \"two\"])'"], "space.warmup_epochs.values[1]"),
    ("imgsz-word", ["train.imgsz=big"], "train.imgsz"),
    ("imgsz-zero", ["train.imgsz=0"], "train.imgsz"),
    ("imgsz-float", ["train.imgsz=64.5"], "train.imgsz"),
    ("imgsz-huge", ["train.imgsz=100000"], "train.imgsz"),
    ("batch-word", ["train.batch=abc"], "train.batch"),
    ("batch-zero", ["train.batch=0"], "train.batch"),
    ("batch-negative", ["train.batch=-2"], "train.batch"),
    ("fraction-big", ["+train.fraction=3.5"], "train.fraction"),
    ("fraction-zero", ["+train.fraction=0"], "train.fraction"),
    ("patience-negative", ["+train.patience=-1"], "train.patience"),
    ("workers-float", ["+train.workers=1.5"], "train.workers"),
    ("cos-lr-word", ["+train.cos_lr=sometimes"], "train.cos_lr"),
    ("optimizer-number", ["train.optimizer=3"], "train.optimizer"),
    ("amp-word", ["+train.amp=maybe"], "train.amp"),
    ("dropout-above-one", ["+train.dropout=2"], "train.dropout"),
    ("nbs-zero", ["+train.nbs=0"], "train.nbs"),
    ("close-mosaic-word", ["+train.close_mosaic=x"], "train.close_mosaic"),
    ("box-nan", ["+train.box=nan"], "train.box"),
    ("degrees-inf", ["+train.degrees=inf"], "train.degrees"),
    ("optimizer-auto-tuning-lr0", ["train.optimizer=auto"], "train.optimizer"),
    ("train-unknown", ["+train.epoch=3"], "train.epoch"),
    ("train-unknown-no-plus", ["train.momentun=0.9"], "train.momentun"),
    ("bare-unknown", ["momentun=0.9"], "momentun"),
    ("train-owned-data", ["+train.data=coco8.yaml"], "train.data"),
    ("train-owned-model", ["+train.model=x.pt"], "train.model"),
    ("train-owned-project", ["+train.project=x"], "train.project"),
    ("train-owned-name", ["+train.name=x"], "train.name"),
    ("train-owned-exist-ok", ["+train.exist_ok=true"], "train.exist_ok"),
    ("train-owned-resume", ["+train.resume=true"], "train.resume"),
    ("train-owned-mode", ["+train.mode=val"], "train.mode"),
    ("train-val-false", ["+train.val=false"], "train.val"),
    ("train-save-false", ["+train.save=false"], "train.save"),
    ("train-and-space", ["+train.lr0=0.01"], "train.lr0"),
    ("model-no-suffix", ["model.weights=yolo11n"], "model.weights"),
    ("model-missing-pt", ["model.weights=/no/such/model.pt"], "model.weights"),
    ("model-unknown-yaml", ["model.weights=nosuchmodel.yaml"], "model.weights"),
    ("model-offline-pt", ["model.weights=yolo11n.pt"], "model.weights"),
    # 5. data
    ("data-missing-file", ["data=coco8", "data.yaml=/no/such/data.yaml"], "data.yaml"),
    ("data-relative-missing", ["data=coco8", "data.yaml=./nothing.yaml"], "data.yaml"),
    ("data-unknown-name", ["data=coco8", "data.yaml=nosuchdataset.yaml"], "data.yaml"),
    ("shapes-zero-images", ["data.train_images=0"], "data.train_images"),
    ("shapes-zero-val", ["data.val_images=0"], "data.val_images"),
    ("shapes-classes", ["data.classes=4"], "data.classes"),
    ("shapes-imgsz", ["data.imgsz=8"], "data.imgsz"),
    ("shapes-seed", ["data.seed=-1"], "data.seed"),
    # 6. storage and names
    ("name-parent", ["name=../../x"], "name"),
    ("name-absolute", ["name=/abs"], "name"),
    ("name-dot", ["name=."], "name"),
    ("name-dotdot", ["name=.."], "name"),
    ("name-slash", ["name=a/b"], "name"),
    ("name-hidden", ["name=.x"], "name"),
    ("name-newline", ["name='a\nb'"], "name"),
    ("name-space", ["name='a b'"], "name"),
    ("name-empty", ["name=''"], "name"),
    ("storage-cloud", ["storage=s3://bucket/x"], "storage"),
    ("storage-empty", ["storage=''"], "storage"),
    ("ray-address-garbage", ["ray.address=not an address"], "ray.address"),
    ("ray-address-no-port", ["ray.address=somehost"], "ray.address"),
    # 7. keys yolotune owns or forbids, in the space too
    ("space-val", ["+space.val='choice([true, false])'"], "space.val"),
    ("space-save", ["+space.save='choice([true, false])'"], "space.save"),
    ("space-resume", ["+space.resume='choice([true, false])'"], "space.resume"),
    ("space-data", ["+space.data='choice([\"a.yaml\"])'"], "space.data"),
    ("space-model", ["+space.model='choice([\"a.pt\"])'"], "space.model"),
    ("space-epochs", ["+space.epochs='randint(1, 3)'"], "space.epochs"),
    ("space-unknown", ["+space.lr00={dist:uniform,low:0,high:1}"], "space.lr00"),
    # 8. space entries: no silent coercion
    ("qrandint-fractional-q", ["+space.close_mosaic='qrandint(0, 10, 2.5)'"], "space.close_mosaic.q"),
    ("quniform-off-grid-high", ["space.lrf='quniform(0.2, 0.95, 0.2)'"], "space.lrf.high"),
    ("quniform-off-grid-low", ["space.lrf='quniform(0.15, 0.95, 0.2)'"], "space.lrf.low"),
    ("quniform-zero-q", ["space.lrf='quniform(0.2, 0.8, 0)'"], "space.lrf.q"),
    ("replace-keeps-nothing", ["space.lr0={dist:uniform,low:0.001}"], "space.lr0.high"),
    ("replace-choice-empty", ["space.lr0={dist:choice,values:[]}"], "space.lr0.values"),
    ("low-above-high", ["space.lr0.low=0.5", "space.lr0.high=0.1"], "space.lr0.low"),
    ("low-equals-high", ["space.lr0.low=0.1", "space.lr0.high=0.1"], "space.lr0.low"),
    ("low-nan", ["space.lrf.low=nan"], "space.lrf.low"),
    ("high-inf", ["space.lrf.high=inf"], "space.lrf.high"),
    ("low-word", ["space.lr0.low=abc"], "space.lr0.low"),
    ("loguniform-zero", ["space.lr0.low=0"], "space.lr0.low"),
    ("dist-unknown", ["space.lr0.dist=normal"], "space.lr0.dist"),
    ("dist-field-unknown", ["+space.lr0.mean=3"], "space.lr0.mean"),
    ("randint-float-bounds", ["+space.close_mosaic='randint(0.5, 3)'"], "space.close_mosaic.low"),
    ("sugar-arity", ["space.lr0='uniform(0.1)'"], "space.lr0"),
    ("sugar-code", ["space.lr0='__import__(\"os\").system(\"true\")'"], "space.lr0"),
    ("sugar-unknown-dist", ["space.lr0='gauss(0, 1)'"], "space.lr0.dist"),
    ("space-entry-number", ["space.lr0=0.01"], "space.lr0"),
    ("budget-words", ["budget.time='2 hours'"], "budget.time"),
    ("budget-negative", ["budget.time=-5m"], "budget.time"),
    ("budget-zero", ["budget.time=0"], "budget.time"),
    ("budget-zero-minutes", ["budget.time=0m"], "budget.time"),
    ("budget-unit", ["budget.time=2d"], "budget.time"),
]


@pytest.mark.parametrize("overrides,key", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_naming_the_key(overrides, key, tmp_path, shapes_cache):
    storage = tmp_path / "runs"
    with pytest.raises(ConfigError) as err:
        attempt(storage, shapes_cache, *BASE, *overrides)
    assert err.value.key == key, str(err.value)
    assert "\n" not in str(err.value) and str(err.value).startswith(f"{key}=")
    assert not storage.exists()  # nothing written


@pytest.mark.parametrize("name,key", [
    ("empty.yaml", "data.yaml"), ("list.yaml", "data.yaml"), ("notyaml.yaml", "data.yaml"),
    ("binary.yaml", "data.yaml"), ("no_train.yaml", "data.yaml"), ("no_val.yaml", "data.yaml"),
    ("no_names.yaml", "data.yaml"), ("missing_dirs.yaml", "data.yaml"), ("images", "data.yaml"),
])
def test_broken_data_yaml(name, key, data_files, tmp_path, shapes_cache):
    with pytest.raises(ConfigError) as err:
        attempt(tmp_path / "runs", shapes_cache, *BASE, "data=coco8", f"data.yaml={data_files / name}")
    assert err.value.key == key
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["broken.pt", "broken_model.yaml", "images"])
def test_model_that_does_not_load(name, data_files, tmp_path, shapes_cache):
    with pytest.raises(ConfigError) as err:
        attempt(tmp_path / "runs", shapes_cache, *BASE, f"model.weights={data_files / name}")
    assert err.value.key == "model.weights"


def test_storage_that_is_a_file(data_files, tmp_path, shapes_cache):
    with pytest.raises(ConfigError) as err:
        attempt(data_files / "a_file" / "runs", shapes_cache, *BASE)
    assert err.value.key == "storage"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere: the permission check cannot fail as root")
def test_storage_not_writable(tmp_path, shapes_cache):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ConfigError) as err:
        attempt(locked / "runs", shapes_cache, *BASE)
    assert err.value.key == "storage"


def test_existing_name_is_refused(tmp_path, shapes_cache):
    (tmp_path / "runs" / "bad").mkdir(parents=True)
    with pytest.raises(ConfigError) as err:
        attempt(tmp_path / "runs", shapes_cache, *BASE)
    assert err.value.key == "name"


# The boundaries, the other way: the last valid values pass every check (nothing trains).
VALID = [
    ["scheduler.grace_period=3"], ["scheduler.grace_period=1"], ["scheduler.max_t=3", "scheduler.grace_period=3"],
    ["scheduler.reduction_factor=1.01"], ["scheduler.brackets=1"], ["iterations=1"], ["scheduler.grace_period=10"],
    ["scheduler=fifo", "+train.val=false"], ["scheduler=pbt", "scheduler.perturbation_interval=3",
                                             "scheduler.quantile_fraction=0.5", "scheduler.resample_probability=1"],
    ["scheduler=pbt", "scheduler.perturbation_interval=1", "scheduler.quantile_fraction=0",
     "scheduler.resample_probability=0"],
    ["scheduler=median", "scheduler.grace_period=3", "scheduler.min_samples_required=1"],
    ["search=optuna", "search.n_startup_trials=0"], ["search=hyperopt", "search.n_initial_points=0"],
    ["resources.cpu_per_trial=1", "resources.gpu_per_trial=0"], ["resources.max_concurrent_trials=1"],
    ["failure.max_failures=0"], ["seed=0"], ["seed=4294967295"], ["mode=min", "metric=val/box_loss"],
    ["metric='metrics/mAP50-95(B)'"], ["space.momentum.high=1.0"], ["space.lrf.low=0.0"],
    ["~space.lr0", "~space.momentum", "train.optimizer=auto"], ["+space.mosaic='choice([0.0, 1.0])'"],
    ["+space.close_mosaic='qrandint(0, 10, 2)'"], ["space.lrf='quniform(0.2, 0.8, 0.2)'"],
    ["space.lr0={dist:choice,values:[0.001,0.01]}"], ["space.lr0='loguniform(1e-4, 1e-2)'"],
    ["train.imgsz=32"], ["train.batch=1"], ["+train.fraction=1.0"], ["+train.fraction=0.5"],
    ["+train.patience=0"], ["name=my-exp_1.2"], ["data.train_images=1", "data.val_images=1"], ["data.classes=1"],
    ["epochs=12"], ["imgsz=64"], ["train.cos_lr=true"], ["+train.cos_lr=true"],
    ["budget.time=2h"], ["budget.time=90m"], ["budget.time=3600s"], ["budget.time=3600"], ["budget.time=0.5"],
    ["budget.time=1.5h"], ["budget.time=null"], ["experiment=recommended"],
    ["experiment=recommended", "scheduler=fifo", "search=random", "space=default"],
]


@pytest.mark.parametrize("overrides", VALID, ids=[" ".join(v) for v in VALID])
def test_valid_boundaries_are_accepted(overrides, tmp_path, shapes_cache):
    exp = attempt(tmp_path / "runs", shapes_cache, *BASE, *overrides, preflight=False)
    assert exp.iterations >= 1
    assert not (tmp_path / "runs").exists()


def test_replacing_a_space_entry_replaces_it(tmp_path, shapes_cache):
    exp = attempt(tmp_path / "runs", shapes_cache, *BASE, "space.lr0={dist:choice,values:[0.001,0.01]}",
                  preflight=False)
    assert exp.space["lr0"] == {"dist": "choice", "values": [0.001, 0.01]}


def test_bare_train_arguments_go_to_train(tmp_path, shapes_cache):
    exp = attempt(tmp_path / "runs", shapes_cache, *BASE, "epochs=12", "imgsz=64", "cos_lr=true", preflight=False)
    assert (exp.train["epochs"], exp.train["imgsz"], exp.train["cos_lr"]) == (12, 64, True)


def test_preflight_passes_a_valid_experiment(tmp_path, shapes_cache):
    attempt(tmp_path / "runs", shapes_cache, *BASE)
    assert not (tmp_path / "runs").exists()


# As a user types them: one line on stderr, exit 2, no traceback, nothing written.
CLI_CASES = [
    (["iterations=ten"], "iterations"),
    (["+foo=1"], "foo"),
    (["scheduler=foo"], "scheduler"),
    (["train.imgsz=big"], "train.imgsz"),
    (["name=../../x"], "name"),
    (["space.lr0.low=0.5", "space.lr0.high=0.1"], "space.lr0.low"),
    (["ray.address=127.0.0.1:1", "resources.cpu_per_trial=1"], "ray.address"),
]


@pytest.mark.parametrize("overrides,key", CLI_CASES, ids=[c[0][0] for c in CLI_CASES])
def test_cli_prints_one_line_and_exits_2(overrides, key, tmp_path, shapes_cache):
    proc = run_cli(f"storage={tmp_path}/runs", "name=bad", "data=shapes", f"data.cache_dir={shapes_cache}", *BASE, *overrides,
                   timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"yolotune: error: {key}="), lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "runs").exists()


def test_multirun_runs_the_valid_jobs_and_lists_the_bad_one(tmp_path, shapes_cache):
    """iterations=ten does not compose and train.imgsz=big fails validation: both are failed rows, while
    the valid job's config is composed and reaches its run (here refused at preflight by cpu_per_trial)."""
    proc = run_cli("-m", f"storage={tmp_path}/runs", "data=shapes", f"data.cache_dir={shapes_cache}", *BASE,
                   "iterations=ten,2", "resources.cpu_per_trial=512", timeout=300)
    summary = next((tmp_path / "runs" / "multirun").glob("*/multirun_summary.csv")).read_text().splitlines()
    assert len(summary) == 3, summary  # header + both jobs
    assert "iterations=ten: an integer" in summary[1]
    assert "resources.cpu_per_trial=512" in summary[2]
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
