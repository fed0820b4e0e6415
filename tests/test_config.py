"""Config core: every group option composes into a valid typed experiment; the CLI shows it fast."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from compose import REPO, compose_config, experiment, options
from conftest import run_cli
from yolotune.config import GROUPS, options as option_classes, register_configs, to_experiment, validate
from yolotune.errors import ConfigError
from yolotune.overrides import normalize

GROUPS_ON_DISK = [p.name for p in sorted((REPO / "conf").iterdir()) if p.is_dir() and p.name != "hydra"]
NEEDS_LOGIN = {("wandb", "online")}  # tested in test_wandb

# The guide's default space (box deliberately widened, see conf/space/default.yaml).
GUIDE_DEFAULT_SPACE = {
    "lr0": (1e-5, 1e-1), "lrf": (0.01, 1.0), "momentum": (0.6, 0.98), "weight_decay": (0.0, 0.001),
    "warmup_epochs": (0.0, 5.0), "warmup_momentum": (0.0, 0.95), "box": (1.0, 20.0), "cls": (0.2, 4.0),
    "hsv_h": (0.0, 0.1), "hsv_s": (0.0, 0.9), "hsv_v": (0.0, 0.9), "degrees": (0.0, 45.0),
    "translate": (0.0, 0.9), "scale": (0.0, 0.9), "shear": (0.0, 10.0), "perspective": (0.0, 0.001),
    "flipud": (0.0, 1.0), "fliplr": (0.0, 1.0), "mosaic": (0.0, 1.0), "mixup": (0.0, 1.0),
    "cutmix": (0.0, 1.0), "copy_paste": (0.0, 1.0),
}


# What an option of one task needs besides (the default model is detect's; its default data coco8 is no
# classification dataset).
TASK_COMPANIONS = {("model", "yolo11n-cls"): ["data=shapes"], ("model", "yolo11n-cls-scratch"): ["data=shapes"],
                   ("space", "classify"): ["model=yolo11n-cls-scratch", "data=shapes"],
                   ("space", "pose"): ["model=yolo11n-pose-scratch"], ("space", "obb"): ["model=yolo11n-obb-scratch"]}


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS_ON_DISK for o in options(g)])
def test_every_option_composes_and_validates(group, option):
    exp = experiment(f"{group}={option}", *TASK_COMPANIONS.get((group, option), []))
    if (group, option) not in NEEDS_LOGIN and not (group == "search" and option == "bohb"):
        validate(exp)
    if group in GROUPS:
        assert type(getattr(exp, group)).__name__.endswith("Config")


@pytest.mark.parametrize("preset", options("experiment"))
@pytest.mark.parametrize("group", ["scheduler", "search", "space", "data", "resources"])
def test_presets_compose_with_every_option_of_every_group(preset, group):
    for option in options(group):
        experiment(f"experiment={preset}", f"{group}={option}")  # composes and types


def test_register_configs_stores_the_schema_and_every_options_schema(monkeypatch):
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    monkeypatch.setattr(store, "repo", {})  # empty: what this call stores, not what importing the tests did
    register_configs()
    schemas = [f"schema_{group}_{name}.yaml" for group in GROUPS for name in option_classes(group)]
    assert store.list("") == sorted([*schemas, "yolotune_schema.yaml"])  # no group: --help shows none
    for group in GROUPS:
        for name in option_classes(group):
            assert store.load(f"schema_{group}_{name}.yaml").node.type == name


def _saved(**changes):
    """A composed config as the runner saves it (plain, untyped), with ``changes`` (dotted keys)."""
    plain = OmegaConf.create(OmegaConf.to_container(compose_config()))
    for key, value in changes.items():
        OmegaConf.update(plain, key, value, merge=False, force_add=True)
    return plain


# (key, saved value, the first line of OmegaConf's message: what the user reads after "key='': ")
SAVED_ERRORS = [
    ("iterations", "ten", "Value 'ten' of type 'str' could not be converted to Integer"),
    ("seed", "abc", "Value 'abc' of type 'str' could not be converted to Integer"),
    ("scheduler.grace_period", "soon", "Value 'soon' of type 'str' could not be converted to Integer"),
    ("resources.cpu_per_trial", "many", "Value 'many' of type 'str' could not be converted to Float"),
    ("failure.max_failures", "x", "Value 'x' of type 'str' could not be converted to Integer"),
    ("name", "${nowhere}", "Interpolation key 'nowhere' not found"),
    ("scheduler.max_t", "${nowhere}", "Interpolation key 'nowhere' not found"),
]


@pytest.mark.parametrize("key,value,message", SAVED_ERRORS, ids=[f"{k}={v}" for k, v, _ in SAVED_ERRORS])
def test_a_saved_config_with_a_wrong_type_or_interpolation_names_the_key(key, value, message):
    with pytest.raises(ConfigError) as err:
        to_experiment(_saved(**{key: value}))
    assert (err.value.key, err.value.value, err.value.allowed) == (key, "", message)
    assert str(err.value) == f"{key}='': {message}"  # one line: OmegaConf's full_key/object_type lines dropped


SCHEDULERS, SEARCHES = "asha, fifo, hyperband, median, pbt", "random, optuna, hyperopt, bohb"


@pytest.mark.parametrize("key,value,message", [
    ("name", "${nowhere}", "name='': Interpolation key 'nowhere' not found"),
    ("scheduler.type", "ashaa", f"scheduler.type=ashaa: one of {SCHEDULERS}"),
    ("search.type", None, f"search.type=None: one of {SEARCHES}"),
    ("scheduler", "asha", f"scheduler.type=None: one of {SCHEDULERS}"),  # a group that is not a mapping
    ("scheduler.foo", 1, "scheduler.foo=1: not a key of scheduler=asha (its keys: grace_period, reduction_factor, "
                         "max_t, brackets)"),
    ("colour", "red", "colour=red: not a key of the experiment nor an Ultralytics train argument "
                      "(docs/configuration/index.md lists the keys)"),
    ("train", [1], "train=[1]: a mapping"), ("train", None, "train=None: a mapping"),
    ("space", 3, "space=3: a mapping"), ("space", None, "space=None: a mapping"),
])
def test_a_damaged_saved_config_names_the_key(key, value, message):
    with pytest.raises(ConfigError) as err:
        to_experiment(_saved(**{key: value}))
    assert str(err.value) == message


def test_a_saved_config_that_is_not_a_mapping_is_refused():
    with pytest.raises(ConfigError) as err:
        to_experiment(OmegaConf.create([1, 2]))
    assert (err.value.key, err.value.value, err.value.allowed) == ("config", [1, 2], "a mapping")


@pytest.mark.parametrize("key", ["train", "space"])
def test_a_saved_config_without_train_or_space_names_it(key):
    saved = _saved()
    del saved[key]
    with pytest.raises(ConfigError) as err:
        to_experiment(saved)
    assert str(err.value) == f"{key}=None: a mapping"


def test_a_saved_config_keeps_escaped_interpolations_and_ignores_hydras_keys():
    """``\\${...}`` in a saved config is the text ``${...}``, in lists too; Hydra's own nodes are not
    experiment keys."""
    exp = to_experiment(_saved(**{"wandb.tags": ["a\\${b}", "c"], "hydra": {"job": {"name": "x"}},
                                  "defaults": ["_self_"]}))
    assert exp.wandb.tags == ["a${b}", "c"]


# A URI's credentials would be written into the saved config: every place a URI can hold one.
CREDENTIALS = ["s3://AKIAX@bucket/x", "s3://:secret@bucket/x", "s3://AKIAX:secret@bucket/x",
               "s3://bucket/x?access_key=AKIAX", "s3://bucket/x?secret_key=abc", "s3://bucket/x?session_token=tok",
               "s3://bucket/x?region=us-east-1&session_token=tok"]


@pytest.mark.parametrize("uri", CREDENTIALS)
def test_a_storage_uri_with_credentials_is_refused(uri):
    exp = experiment("space=minimal", f"storage='{uri}'")
    with pytest.raises(ConfigError) as err:
        validate(exp)
    assert (err.value.key, err.value.value) == ("storage", uri)
    assert err.value.allowed == ("a URI without credentials; give them as AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                                 "or AWS_PROFILE in every node's environment")


def test_a_storage_under_a_file_is_refused(tmp_path):
    (tmp_path / "a_file").write_text("")
    storage = str(tmp_path / "a_file" / "runs")
    with pytest.raises(ConfigError) as err:
        validate(experiment("space=minimal", f"storage={storage}"))
    assert (err.value.key, err.value.value, err.value.allowed) == (
        "storage", storage, f"a directory; {tmp_path / 'a_file'} is a file")


@pytest.mark.parametrize("prefix,key", [("", "config"), ("search.", "search")])
def test_an_error_that_names_no_key_is_given_the_group_or_config(prefix, key):
    """Any exception (not only OmegaConf's, which name their key) becomes one line."""
    from yolotune.config import _omegaconf_error

    error = _omegaconf_error(ValueError("first line\nsecond line"), prefix=prefix)
    assert (error.key, error.value, error.allowed) == (key, "", "first line")


def test_a_storage_uri_without_credentials_is_accepted():
    """The region given: pyarrow would otherwise ask S3 for the bucket's (no network here)."""
    validate(experiment("space=minimal", "storage='s3://bucket/prefix?region=us-east-1'"))


@pytest.mark.parametrize("storage", ["dir", "s3://bucket/prefix?region=us-east-1"])
def test_the_yolotune_local_resolver_is_where_yolotune_writes_a_storage(storage, tmp_path, monkeypatch):
    """conf/hydra/yolotune.yaml puts a multirun's summary there: a directory itself, a URI's mirror in the cache."""
    monkeypatch.setenv("YOLOTUNE_CACHE", str(tmp_path / "cache"))
    OmegaConf.clear_resolver("yolotune_local")
    register_configs()  # registers it (importing yolotune did too, before a mutation test's mutant was active)
    storage = str(tmp_path / storage) if storage == "dir" else storage
    want = tmp_path / "cache" / "s3" / "bucket" / "prefix" if "://" in storage else Path(storage).resolve()
    cfg = OmegaConf.create({"storage": storage, "sweep_dir": "${yolotune_local:${storage}}/multirun"})
    assert cfg.sweep_dir == f"{want}/multirun"


@pytest.mark.parametrize("where,key", [("", "1"), ("scheduler", "scheduler.1")])
def test_a_number_as_a_key_of_a_saved_config_is_named(where, key):
    """YAML reads `1: x` as an int key: refused as unknown, like any other (it raised TypeError)."""
    saved = _saved()
    (saved[where] if where else saved)[1] = "x"
    with pytest.raises(ConfigError) as err:
        to_experiment(saved)
    assert (err.value.key, err.value.value) == (key, "x")


def test_a_saved_config_keeps_train_and_space_as_given():
    """Merging them into the schema's defaults would bring back keys the experiment removed."""
    exp = to_experiment(_saved(train={"epochs": 3}, space={"lr0": "uniform(0.1, 0.2)"}))
    assert exp.train == {"epochs": 3} and exp.space == {"lr0": "uniform(0.1, 0.2)"}


def test_default_space_is_the_guides():
    space = OmegaConf.to_container(compose_config().space)
    assert {k: (v["low"], v["high"]) for k, v in space.items()} == GUIDE_DEFAULT_SPACE
    assert {v["dist"] for v in space.values()} == {"uniform"}


def test_defaults():
    exp = experiment()
    assert (exp.iterations, exp.storage, exp.resume, exp.metric, exp.mode) == (10, "runs/tune", False, "fitness", "max")
    assert exp.train["epochs"] == 100 and exp.epochs == 100
    assert (exp.scheduler.type, exp.scheduler.grace_period, exp.scheduler.reduction_factor) == ("asha", 10, 3)
    assert exp.search.type == "random" and exp.data.yaml == "coco8.yaml" and exp.model.weights == "yolo11n.pt"
    assert exp.wandb.mode == "disabled"


def test_option_yamls_state_only_what_differs_from_their_schema():
    """A YAML option repeats no default of its dataclass."""
    for group in GROUPS_ON_DISK:
        for option in options(group):
            own = OmegaConf.load(REPO / "conf" / group / f"{option}.yaml") or {}
            own = {k: v for k, v in OmegaConf.to_container(own).items() if k != "defaults"} if own else {}
            if group not in ("scheduler", "search", "data", "resources", "model", "wandb") or not own:
                continue
            schema = getattr(experiment(f"{group}={option}"), group)
            defaults = type(schema)()
            for key, value in own.items():
                assert getattr(defaults, key) != value, f"conf/{group}/{option}.yaml restates {key}={value}"


def test_hydra_overrides_edit_the_space():
    cfg = compose_config("space.lr0.high=0.01", "~space.mixup", "+space.dropout={dist:uniform,low:0,high:0.5}")
    assert cfg.space.lr0.high == 0.01 and "mixup" not in cfg.space and cfg.space.dropout.high == 0.5


@pytest.mark.parametrize("override,env_vars", [
    ('ray.runtime_env={env_vars:{A:"1"}}', {"A": "1"}),
    ('+ray.runtime_env={env_vars:{A:"1"}}', {"A": "1"}),
    ('ray.runtime_env.env_vars={A:"1",B:"2"}', {"A": "1", "B": "2"}),
    ("ray.runtime_env.env_vars.A=1", {"A": 1}),
])
def test_rays_runtime_env_takes_new_keys_without_a_plus(override, env_vars):
    """Ray's mapping is empty by default, so every key in it is new to Hydra (which wants a + for that)."""
    exp = to_experiment(compose_config(*normalize([override])))
    assert exp.ray.runtime_env == {"env_vars": env_vars}


def test_compact_string_form():
    exp = experiment("space=minimal", "space.lr0='loguniform(1e-5, 1e-1)'")
    validate(exp)
    assert exp.dists["lr0"].dist == "loguniform" and (exp.dists["lr0"].low, exp.dists["lr0"].high) == (1e-5, 1e-1)


@pytest.mark.subprocess
def test_cfg_job_is_fast_and_shows_the_default_space(tmp_path):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "yolotune", "--cfg", "job"], cwd=tmp_path, capture_output=True,
                          text=True)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    shown = OmegaConf.create(proc.stdout)
    assert set(shown.space) == set(GUIDE_DEFAULT_SPACE)
    print(f"--cfg job took {elapsed:.2f}s")


@pytest.mark.subprocess
def test_cfg_job_imports_no_heavy_module(tmp_path):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "yolotune", "--cfg", "job"], cwd=tmp_path,
                          capture_output=True, text=True)
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "ray", "ultralytics", "wandb", "cv2"}


@pytest.mark.subprocess
def test_worker_module_imports_no_hydra(tmp_path):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "import yolotune.trainable"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert "ray" in imported  # the check sees the worker's imports
    assert not imported & {"hydra", "omegaconf"}


@pytest.mark.subprocess
def test_help_lists_real_groups_and_options_only():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for group in GROUPS_ON_DISK:
        assert f"  {group}: {', '.join(options(group))}" in proc.stdout
    assert "schema" not in proc.stdout


@pytest.mark.subprocess
def test_group_key_typo_fails_at_composition():
    proc = run_cli("--cfg", "job", "scheduler.grace_periood=3")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("yolotune: error: scheduler.grace_periood=3: not a key of scheduler=asha; "
                                   "did you mean scheduler.grace_period?")


@pytest.mark.slow
def test_installs_as_a_wheel_and_runs_in_the_clone_and_outside_it(tmp_path):
    """`pip install .` (not -e) ships conf/ and the multirun plugin, and the README's quickstart checks out
    both in the clone's root (where Python imports the source folder, which has no conf/ of its own) and
    elsewhere. The wheel is built from a copy of the checkout and installed into a venv that sees this
    environment's packages through a .pth file: its .pth files (an editable yolotune) are not read there,
    and nothing depends on what the base Python has installed."""
    source = tmp_path / "clone"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                                "runs", "site"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, cwd=tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    venv_site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip()
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (Path(venv_site) / "test_deps.pth").write_text("\n".join(sorted(ours)) + "\n")
    wheel = next((tmp_path / "dist").glob("yolotune-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)],
                   check=True, cwd=tmp_path)
    where = subprocess.run([str(py), "-c", "import yolotune.conf, hydra_plugins.yolotune_launcher as p, os; "
                                           "print(os.path.dirname(yolotune.conf.__file__)); print(p.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True).stdout.split()
    assert len(where) == 2 and all(path.startswith(str(venv)) for path in where), where
    quickstart = ["-m", "yolotune", "experiment=quickstart", "dry_run=true", f"data.cache_dir={tmp_path / 'shapes'}"]
    for cwd in (source, tmp_path):
        proc = subprocess.run([str(py), *quickstart], cwd=cwd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "Plan: 2 trials at once" in proc.stdout and "nothing was run" in proc.stdout, proc.stdout
        assert not (cwd / "runs").exists()
    # In the clone's root its own conf/ is read, as edited there: not the copy the wheel installed.
    preset = source / "conf" / "experiment" / "quickstart.yaml"
    preset.write_text(preset.read_text().replace("iterations: 4\n", "iterations: 3\n"))
    proc = subprocess.run([str(py), "-m", "yolotune", "experiment=quickstart", "--cfg", "job"], cwd=source,
                          capture_output=True, text=True)
    assert "iterations: 3\n" in proc.stdout, proc.stderr[-3000:]
