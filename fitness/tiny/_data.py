"""Local JSONL splits for the tiny tasks, found beside this file whatever the working directory."""
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load(skill: str, **_: object) -> datasets.DatasetDict:
    return datasets.DatasetDict(
        {split: datasets.Dataset.from_json(str(HERE / f"{skill}_{split}.jsonl")) for split in ("search", "test")}
    )


def load_up(**kwargs: object) -> datasets.DatasetDict:
    return load("up", **kwargs)


def load_rot(**kwargs: object) -> datasets.DatasetDict:
    return load("rot", **kwargs)
