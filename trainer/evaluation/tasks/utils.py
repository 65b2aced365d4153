"""Dataset loader for the tiny local tasks: data_files in a task YAML are named relative to this folder.

lm_eval 0.4.13 hands `dataset_kwargs` straight to `datasets.load_dataset`, which resolves a relative
`data_files` path against the current working directory, not the YAML's. So each task names
`custom_dataset: !function utils.load_local_json` (lm_eval imports utils.py from the YAML's folder) and
this function anchors the paths here. lm_eval calls it as `custom_dataset(**metadata, **dataset_kwargs)`.
"""

from pathlib import Path
from typing import Any

import datasets

HERE = Path(__file__).resolve().parent


def load_local_json(data_files: dict[str, str], **metadata: Any) -> datasets.DatasetDict:
    """Load json / jsonl `data_files` ({split: file name relative to this folder}); metadata is ignored."""
    files = {split: str(HERE / name) for split, name in data_files.items()}
    return datasets.load_dataset("json", data_files=files)


def process_gen(doc: dict, results: list[str]) -> dict[str, float]:
    """tiny_gen's figures from its filtered reply: exact_match (the reply is the answer, as lm_eval's
    exact_match with no options) and reply_chars (its length in characters)."""
    reply = results[0]
    return {"exact_match": float(reply == doc["answer"]), "reply_chars": float(len(reply))}
