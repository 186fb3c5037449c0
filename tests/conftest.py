"""Shared fixtures: the shipped tiny zoo, a copy of the demo study pointed at a temporary DB."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "experiments" / "tiny"
FITNESS = ROOT / "fitness" / "tiny"


@pytest.fixture(scope="session")
def tiny() -> Path:
    return TINY


def write_study(tmp: Path, **overrides) -> Path:
    """A study file in `tmp` using the shipped zoo and fitness tasks (absolute paths), small enough for tests."""
    data = yaml.safe_load((TINY / "study.yaml").read_text())
    data["models"] = {"base": str(TINY / "base"), "parents": [str(TINY / "up"), str(TINY / "rot")]}
    data["fitness"]["include_path"] = str(FITNESS)
    data["fitness"]["limit"] = 40
    data["budget"] = 6
    data["optimizer"] = {"name": "cmaes", "popsize": 4}
    data["baselines"] = {"weight": [0.5, 1.0], "density": [0.5]}
    for k, v in overrides.items():
        data[k] = v
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def with_fitness(path: Path, **fields) -> Path:
    """The study file at `path` with these `fitness:` fields set."""
    data = yaml.safe_load(path.read_text())
    data["fitness"].update(fields)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def study_file(tmp_path: Path) -> Path:
    return write_study(tmp_path)


@pytest.fixture
def evomerge_cmd() -> list[str]:
    exe = shutil.which("evomerge")
    assert exe, "the evomerge console script is not installed (pip install -e .)"
    return [exe]
