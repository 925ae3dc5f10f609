"""TOFU data: the JSON-lines files of the Hugging Face dataset ``locuslab/TOFU``, read from a local
folder holding those files or, only when the user names it, from the hub."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Union

from ..jsonl import read_jsonl

HUB_NAME = "locuslab/TOFU"

# config name -> fields every record must have
SPLIT_FIELDS: Dict[str, tuple] = {
    "full": ("question", "answer"),
    "retain_perturbed": ("question", "answer", "paraphrased_answer", "perturbed_answer", "paraphrased_question"),
    "real_authors": ("question", "answer"),
    "real_authors_perturbed": ("question", "answer", "perturbed_answer"),
    "world_facts": ("question", "answer"),
    "world_facts_perturbed": ("question", "answer", "perturbed_answer"),
}
for _p in ("01", "05", "10"):
    SPLIT_FIELDS[f"forget{_p}"] = ("question", "answer")
    SPLIT_FIELDS[f"forget{_p}_perturbed"] = SPLIT_FIELDS["retain_perturbed"]
for _p in ("90", "95", "99"):
    SPLIT_FIELDS[f"retain{_p}"] = ("question", "answer")

# forget split -> the retain split that complements it in ``full``
RETAIN_OF = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}


def load_tofu_split(split: str, data_dir: Optional[Union[str, Path]] = None) -> List[dict]:
    """Rows of one TOFU config as a list of dicts.

    ``data_dir`` is a folder holding ``<split>.json`` (JSON lines, as on the hub). With
    ``data_dir=None`` the split is loaded from the hub with ``datasets`` (a download).
    """
    if split not in SPLIT_FIELDS:
        raise ValueError(f"unknown TOFU split {split!r}; valid: {', '.join(sorted(SPLIT_FIELDS))}")
    if data_dir is None:
        import datasets  # only for a hub download: the local-folder path never needs it

        rows = [dict(r) for r in datasets.load_dataset(HUB_NAME, split, split="train")]
    else:
        path = Path(data_dir) / f"{split}.json"
        if not path.is_file():
            raise FileNotFoundError(f"TOFU split {split!r} not found: expected {path}")
        rows = read_jsonl(path)
    if not rows:
        raise ValueError(f"TOFU split {split!r} is empty")
    missing = [f for f in SPLIT_FIELDS[split] if f not in rows[0]]
    if missing:
        raise ValueError(f"TOFU split {split!r} lacks fields {missing}")
    return rows
