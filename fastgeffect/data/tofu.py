"""TOFU data: the JSON-lines files of the Hugging Face dataset ``locuslab/TOFU``, read from a local
folder holding those files or, only when the user names it, from the hub."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

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
# forget split -> its holdout file (TOFU's hub names): as many never-trained authors as the split
# forgets, the non-members of membership inference (:mod:`.holdout`); not in SPLIT_FIELDS, which
# lists what every TOFU folder must hold and what the embedded caches hash
HOLDOUT_OF = {"forget01": "holdout01", "forget05": "holdout05", "forget10": "holdout10"}
HOLDOUT_FIELDS = ("question", "answer")


def check_rows(rows: Sequence, split: str, source: str) -> None:
    """Every row of a split is an object with the split's fields, strings (``perturbed_answer``: a
    non-empty list of strings): a null answer would otherwise be trained on or scored as "None",
    a missing one fail as a bare KeyError."""
    if not rows:
        raise ValueError(f"TOFU split {split!r} ({source}) is empty")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"TOFU split {split!r} ({source}): row {i} is a {type(row).__name__}, not an object "
                             "with the fields " + ", ".join(SPLIT_FIELDS[split]))
        for f in SPLIT_FIELDS[split]:
            v = row.get(f)
            ok = (isinstance(v, list) and len(v) > 0 and all(isinstance(x, str) for x in v)) \
                if f == "perturbed_answer" else isinstance(v, str)
            if not ok:
                problem = f"has no {f!r} field" if f not in row else f"has {f!r} = {v!r}"
                want = "a non-empty list of strings" if f == "perturbed_answer" else "a string"
                raise ValueError(f"TOFU split {split!r} ({source}): row {i} {problem}, expected {want} "
                                 f"(question {str(row.get('question', ''))[:60]!r}); fix or remove the row, or "
                                 "fetch the split again")


def load_tofu_split(split: str, data_dir: Optional[Union[str, Path]] = None) -> List[dict]:
    """Rows of one TOFU config as a list of dicts, every row checked (:func:`check_rows`).

    ``data_dir`` is a folder holding ``<split>.json`` (JSON lines, as on the hub). With
    ``data_dir=None`` the split is loaded from the hub with ``datasets`` (a download).
    """
    if split not in SPLIT_FIELDS:
        raise ValueError(f"unknown TOFU split {split!r}; valid: {', '.join(sorted(SPLIT_FIELDS))}")
    if data_dir is None:
        import datasets  # only for a hub download: the local-folder path never needs it

        rows = [dict(r) for r in datasets.load_dataset(HUB_NAME, split, split="train")]
        source = f"{HUB_NAME} on the hub"
    else:
        path = Path(data_dir) / f"{split}.json"
        if not path.is_file():
            raise FileNotFoundError(f"TOFU split {split!r} not found: expected {path}")
        try:
            rows = read_jsonl(path)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text ({e.reason}): TOFU's files are UTF-8 JSON lines; convert "
                             "it (e.g. iconv -t UTF-8) or fetch the split again") from None
        source = str(path)
    check_rows(rows, split, source)
    return rows
