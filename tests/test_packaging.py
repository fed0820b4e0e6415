"""The dependency floors in pyproject.toml are the releases the suite runs with (tests/constraints.txt)."""

from __future__ import annotations

import re
import tomllib

import pytest

from conftest import REPO

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
PINNED = dict(line.split("==") for line in (REPO / "tests" / "constraints.txt").read_text().split() if "==" in line)
RUNTIME = [*PROJECT["dependencies"], *(d for extra, deps in PROJECT["optional-dependencies"].items()
                                       if extra != "dev" and extra != "docs" for d in deps)]


def _release(version: str) -> tuple:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


@pytest.mark.parametrize("requirement", RUNTIME)
def test_each_floor_is_no_older_than_the_tested_release_line(requirement):
    """A floor below the pinned release admits what no test ran (ultralytics>=8.3 admitted releases whose
    select_device put every trial on GPU 0); each floor names the pinned release at least to its minor."""
    name, floor = re.match(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?>=([0-9.]+)", requirement).groups()
    pinned = _release(PINNED[name])
    assert _release(floor) <= pinned and _release(floor)[:2] == pinned[:2], (requirement, PINNED[name])
