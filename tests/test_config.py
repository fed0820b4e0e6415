"""Config core: every group option composes into a valid typed experiment; the CLI shows it fast."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from conftest import REPO, run_cli
from yolotune.config import register_configs
from yolotune.experiment import to_experiment
from yolotune.validation import validate

register_configs()

GROUP_OPTIONS = {
    "space": ["default", "minimal", "augment"],
    "scheduler": ["asha", "fifo", "hyperband", "median", "pbt"],
    "search": ["random", "optuna", "hyperopt"],
    "resources": ["auto", "cpu", "gpu", "fractional"],
    "data": ["coco8", "coco128", "shapes"],
    "model": ["yolo11n", "yolo11n-scratch"],
    "wandb": ["off", "offline", "online"],
    "experiment": ["quickstart", "coco8_asha", "augment_only", "pbt"],
}

# The guide's default space (box deliberately widened, see conf/space/default.yaml).
GUIDE_DEFAULT_SPACE = {
    "lr0": (1e-5, 1e-1), "lrf": (0.01, 1.0), "momentum": (0.6, 0.98), "weight_decay": (0.0, 0.001),
    "warmup_epochs": (0.0, 5.0), "warmup_momentum": (0.0, 0.95), "box": (1.0, 20.0), "cls": (0.2, 4.0),
    "hsv_h": (0.0, 0.1), "hsv_s": (0.0, 0.9), "hsv_v": (0.0, 0.9), "degrees": (0.0, 45.0),
    "translate": (0.0, 0.9), "scale": (0.0, 0.9), "shear": (0.0, 10.0), "perspective": (0.0, 0.001),
    "flipud": (0.0, 1.0), "fliplr": (0.0, 1.0), "mosaic": (0.0, 1.0), "mixup": (0.0, 1.0),
    "cutmix": (0.0, 1.0), "copy_paste": (0.0, 1.0),
}


def _compose(*overrides):
    with initialize_config_module("yolotune.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUP_OPTIONS.items() for o in opts])
def test_every_option_composes_and_validates(group, option):
    cfg = _compose(f"{group}={option}")
    exp = to_experiment(cfg)
    if group != "wandb" and option not in ("bohb",):  # wandb=online needs a login; tested in test_wandb
        validate(exp)
    if group == "scheduler":
        assert exp.scheduler.type == option
    if group == "search":
        assert exp.search.type == option


def test_search_bohb_composes():
    assert to_experiment(_compose("search=bohb")).search.type == "bohb"


def test_default_space_is_the_guides():
    space = OmegaConf.to_container(_compose().space)
    assert {k: (v["low"], v["high"]) for k, v in space.items()} == GUIDE_DEFAULT_SPACE
    assert {v["dist"] for v in space.values()} == {"uniform"}


def test_defaults():
    exp = to_experiment(_compose())
    assert (exp.iterations, exp.storage, exp.resume, exp.metric, exp.mode) == (10, "runs/tune", False, "fitness", "max")
    assert exp.train["epochs"] == 100
    assert (exp.scheduler.type, exp.scheduler.grace_period, exp.scheduler.reduction_factor) == ("asha", 10, 3)
    assert exp.search.type == "random" and exp.data.yaml == "coco8.yaml" and exp.model.weights == "yolo11n.pt"
    assert exp.wandb.mode == "disabled"


def test_hydra_overrides_edit_the_space():
    cfg = _compose("space.lr0.high=0.01", "~space.mixup", "+space.dropout={dist:uniform,low:0,high:0.5}")
    assert cfg.space.lr0.high == 0.01 and "mixup" not in cfg.space and cfg.space.dropout.high == 0.5


def test_compact_string_form(tmp_path):
    exp = to_experiment(_compose("space=minimal", "space.lr0='loguniform(1e-5, 1e-1)'"))
    validate(exp)
    assert exp.space["lr0"] == "loguniform(1e-5, 1e-1)"


def test_cfg_job_is_fast_and_shows_the_default_space(tmp_path):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "yolotune", "--cfg", "job"], cwd=tmp_path, capture_output=True,
                          text=True)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    shown = OmegaConf.create(proc.stdout)
    assert set(shown.space) == set(GUIDE_DEFAULT_SPACE)
    print(f"--cfg job took {elapsed:.2f}s")


def test_cfg_job_imports_no_heavy_module(tmp_path):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "yolotune", "--cfg", "job"], cwd=tmp_path,
                          capture_output=True, text=True)
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "ray", "ultralytics", "wandb", "cv2"}


def test_help_lists_groups_and_options():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for group, options in GROUP_OPTIONS.items():
        assert f"{group}:" in proc.stdout
        for option in options:
            assert option in proc.stdout


def test_group_key_typo_fails_at_composition():
    proc = run_cli("--cfg", "job", "scheduler.grace_periood=3")
    assert proc.returncode != 0
    assert "grace_periood" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_installs_as_a_wheel_and_runs_outside_the_checkout(tmp_path):
    """`pip install .` (not -e) ships conf/ inside the package."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(REPO)], check=True, cwd=tmp_path)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py = venv / "bin" / "python"
    wheel = next((tmp_path / "dist").glob("yolotune-*.whl"))
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, cwd=tmp_path)
    proc = subprocess.run([str(py), "-m", "yolotune", "--cfg", "job"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "lr0" in proc.stdout
    where = subprocess.run([str(py), "-c", "import yolotune.conf, os; print(os.path.dirname(yolotune.conf.__file__))"],
                           cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert where.startswith(str(venv)), where
