"""Holdout rows: TOFU-style authors a target was never trained on, the non-members that membership
inference scores against the forget rows (open-unlearning's ``holdout`` set, docs/design.md §6).

A data folder holds them as TOFU's hub files ``holdout01.json`` / ``holdout05.json`` /
``holdout10.json`` (JSON lines, ``question`` and ``answer``), one per forget split with as many
authors as that split forgets. Where they come from: the embedded generator makes authors of its
own (:func:`fastgeffect.embedded.generator.generate_holdout`); a subset of real TOFU
(``--data-dir`` + ``--authors N``) takes the TOFU authors left out of it
(:func:`fastgeffect.data.splits.subset_tofu`); a plain TOFU folder may hold TOFU's own files.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Union

from ..jsonl import read_jsonl
from .tofu import HOLDOUT_FIELDS, HOLDOUT_OF


def question_key(question: str) -> str:
    """What two questions must differ in to be different rows: case and spacing aside."""
    return " ".join(str(question).lower().split())


def holdout_file(split: str, data_dir: Union[str, Path]) -> Path:
    """The holdout file of a forget split (``forget10`` or ``forget10_perturbed``) in ``data_dir``."""
    split = split.replace("_perturbed", "")
    if split not in HOLDOUT_OF:
        raise ValueError(f"unknown forget split {split!r}; valid: {', '.join(sorted(HOLDOUT_OF))}")
    return Path(data_dir) / f"{HOLDOUT_OF[split]}.json"


def load_holdout(split: str, data_dir: Union[str, Path]) -> Optional[List[dict]]:
    """The holdout rows of forget split ``split`` in ``data_dir``, or None when the folder has no
    holdout file for it. Every row is an object with string ``question`` and ``answer``; an empty
    file is refused (:func:`check_holdout` checks the rows against the members)."""
    path = holdout_file(split, data_dir)
    if not path.is_file():
        return None
    rows = read_jsonl(path)
    if not rows:
        raise ValueError(f"{path} holds no row: a holdout set needs non-member rows; remove the file or "
                         "rebuild the data folder")
    for i, row in enumerate(rows):
        bad = [f for f in HOLDOUT_FIELDS if not isinstance(row, dict) or not isinstance(row.get(f), str)]
        if bad:
            raise ValueError(f"{path}: row {i} has no string {', '.join(map(repr, bad))} (a holdout row is an "
                             "object with 'question' and 'answer'); fix or remove the row")
    return rows


def check_holdout(holdout: Optional[Sequence[dict]], forget: Sequence[dict], retain: Sequence[dict] = (),
                  name: str = "holdout") -> None:
    """Refuse a holdout set that is empty or shares a question (case and spacing aside) with the
    forget or retain rows: such a row is a member, and membership inference would score it as a
    non-member. The error names the rows."""
    if not holdout:
        raise ValueError(f"the {name} set is empty: membership inference needs non-member rows (authors never "
                         "trained on, e.g. TOFU's holdout10.json in the data folder)")
    members = {}
    for what, rows in (("forget", forget), ("retain", retain)):
        for i, r in enumerate(rows):
            members.setdefault(question_key(r["question"]), f"{what} row {i}")
    overlap = [(i, members[question_key(r["question"])]) for i, r in enumerate(holdout)
               if question_key(r["question"]) in members]
    if overlap:
        shown = "; ".join(f"{name} row {i} = {where} ({holdout[i]['question'][:60]!r})" for i, where in overlap[:5])
        raise ValueError(f"{len(overlap)} {name} rows ask a question of the forget or retain rows ({shown}"
                         f"{'; ...' if len(overlap) > 5 else ''}): holdout rows must come from authors never "
                         "trained on; remove them or use another holdout file")
