"""Splits for gsm8k_ja: the search reads a local JSONL of translated GSM8K training problems, the final evaluation
reads MGSM-ja's test set from the Hub.  Both have `question` and `answer_number`."""
import os
from pathlib import Path

import datasets

SEARCH = Path(os.environ.get("EVOMERGE_GSM8K_JA", Path(__file__).resolve().parent.parent / "data" / "gsm8k_ja_search.jsonl"))


def load_gsm8k_ja(**_: object) -> datasets.DatasetDict:
    if not SEARCH.is_file():
        raise FileNotFoundError(f"{SEARCH}: Japanese GSM8K training problems (JSONL with question, answer_number); "
                                "see experiments/gpu/README.md, or point EVOMERGE_GSM8K_JA at your file")
    test = datasets.load_dataset("juletxara/mgsm", "ja", split="test")
    return datasets.DatasetDict({
        "search": datasets.Dataset.from_json(str(SEARCH)),
        "test": test.select_columns(["question", "answer_number"]),
    })
