"""Splits for gsm8k_ja: the search reads a local JSONL of translated GSM8K training problems (named in the task YAML
under `dataset_kwargs.data_files`, relative to this folder, so `evomerge run --check` can see it is missing), the final
evaluation reads MGSM-ja's test set from the Hub.  Both have `question` and `answer_number`."""
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load_gsm8k_ja(data_files: dict[str, str], **_: object) -> datasets.DatasetDict:
    search = HERE / data_files["search"]
    test = datasets.load_dataset("juletxara/mgsm", "ja", split="test")
    return datasets.DatasetDict({
        "search": datasets.Dataset.from_json(str(search)),
        "test": test.select_columns(["question", "answer_number"]),
    })
