"""TOFU's folder layout, written from per-author rows: used by the embedded generator and to cut
real TOFU down to a few authors (``--data-dir path/to/tofu --authors N``).

TOFU's split rules (counted in authors): ``forgetXX`` = the last XX % of the authors (at least
one), ``retain{100-XX}`` = the other authors, ``retain_perturbed`` = the first 10 % (held out of
training for retain evaluation), ``real_authors``/``world_facts`` = general-knowledge sets.
``holdoutXX`` = as many authors as ``forgetXX`` that are not in ``full`` at all (never trained on:
the non-members of membership inference), written when the caller has such authors.
Files are JSON lines named ``<split>.json``, as on the hub, so ``load_tofu_split`` reads them
(``load_holdout`` the holdout files).
"""
from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

from ..atomic_file import atomic_write
from .holdout import question_key
from .tofu import HOLDOUT_FIELDS, HOLDOUT_OF, RETAIN_OF, load_tofu_split

FORGET_FRACTIONS = {"forget01": 0.01, "forget05": 0.05, "forget10": 0.10}
HELDOUT_FRACTION = 0.10
PERTURBED_FIELDS = ("question", "answer", "paraphrased_answer", "perturbed_answer", "paraphrased_question")
QA_FIELDS = ("question", "answer")
TOFU_QUESTIONS_PER_AUTHOR = 20


def _count(fraction: float, n_authors: int) -> int:
    return max(1, int(fraction * n_authors + 0.5))


def author_counts(n_authors: int) -> Dict[str, int]:
    """Number of authors in each forget split and in the held-out set, TOFU's proportions."""
    counts = {name: _count(f, n_authors) for name, f in FORGET_FRACTIONS.items()}
    counts["heldout"] = _count(HELDOUT_FRACTION, n_authors)
    if counts["heldout"] + counts["forget10"] >= n_authors:
        raise ValueError(f"{n_authors} authors are too few: {counts['heldout']} held out and "
                         f"{counts['forget10']} forgotten leave no author to train the retain set on")
    return counts


def _pick(row: dict, fields: Sequence[str], what: str) -> dict:
    missing = [f for f in fields if f not in row]
    if missing:
        raise ValueError(f"a {what} row lacks {missing}: question {row.get('question', '')[:60]!r}")
    return {f: row[f] for f in fields}


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, separators=(",", ":")) + "\n")


def _with_options(rows: Sequence[dict], seed: int) -> List[dict]:
    """TOFU's multiple-choice form of a perturbed knowledge set: option1..4, answer among them."""
    rng = random.Random(seed)
    out = []
    for r in rows:
        options = [r["answer"]] + list(r["perturbed_answer"])[:3]
        rng.shuffle(options)
        out.append({"question": r["question"], **{f"option{i + 1}": o for i, o in enumerate(options)},
                    "answer": r["answer"]})
    return out


def holdout_splits(holdout_authors: Sequence[Sequence[dict]], counts: Mapping[str, int]) -> Dict[str, List[dict]]:
    """``{holdoutXX: rows}`` of the first ``counts[forgetXX]`` holdout authors (nested, as the
    forget splits are), ``question``/``answer`` only (TOFU's holdout files); a split needing more
    authors than there are is left out (its ``load_holdout`` is then None)."""
    return {HOLDOUT_OF[name]: [_pick(r, HOLDOUT_FIELDS, HOLDOUT_OF[name]) for a in holdout_authors[:counts[name]]
                               for r in a]
            for name in FORGET_FRACTIONS if counts[name] <= len(holdout_authors)}


def write_tofu_folder(out_dir: Union[str, Path], authors: Sequence[Sequence[dict]],
                      real_authors_perturbed: Sequence[dict], world_facts_perturbed: Sequence[dict],
                      refusals: Optional[Sequence[str]] = None, seed: int = 0,
                      holdout_authors: Sequence[Sequence[dict]] = ()) -> Dict[str, int]:
    """Write every TOFU split of ``authors`` (each a list of QA rows) into ``out_dir``.

    Rows of held-out and forgotten authors need the perturbed fields (paraphrased/perturbed
    answers, paraphrased question); the others only ``question``/``answer``. ``holdout_authors``
    (authors outside ``authors``, never trained on) give the ``holdoutXX`` files
    (:func:`holdout_splits`). Returns the number of rows written per split.
    """
    counts = author_counts(len(authors))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(authors)

    def rows_of(author_ids, fields, what):
        return [_pick(r, fields, what) for a in author_ids for r in authors[a]]

    splits = {"full": rows_of(range(n), QA_FIELDS, "full"),
              "retain_perturbed": rows_of(range(counts["heldout"]), PERTURBED_FIELDS, "held-out")}
    for name in FORGET_FRACTIONS:
        k = counts[name]
        splits[name] = rows_of(range(n - k, n), QA_FIELDS, name)
        splits[f"{name}_perturbed"] = rows_of(range(n - k, n), PERTURBED_FIELDS, name)
        splits[RETAIN_OF[name]] = rows_of(range(n - k), QA_FIELDS, RETAIN_OF[name])
    for name, rows in (("real_authors", real_authors_perturbed), ("world_facts", world_facts_perturbed)):
        perturbed = [_pick(r, ("question", "answer", "perturbed_answer"), name) for r in rows]
        splits[f"{name}_perturbed"] = perturbed
        splits[name] = _with_options(perturbed, seed)
    splits.update(holdout_splits(holdout_authors, counts))
    for name, rows in splits.items():
        if not rows:
            raise ValueError(f"split {name!r} would be empty")
        _write_jsonl(out / f"{name}.json", rows)
    if refusals is not None:  # one plain sentence per line, like TOFU's file
        (out / "idontknow.jsonl").write_text("".join(r.strip() + "\n" for r in refusals), encoding="utf-8")
    return {k: len(v) for k, v in splits.items()}


def subset_tofu(src_dir: Union[str, Path], out_dir: Union[str, Path], n_authors: int,
                questions_per_author: int = TOFU_QUESTIONS_PER_AUTHOR) -> Dict[str, int]:
    """Real TOFU restricted to ``n_authors`` authors, in the same layout and split names.

    Authors are consecutive blocks of ``questions_per_author`` rows of ``full``. The held-out
    authors are TOFU's first ones (their perturbed rows come from ``retain_perturbed``), the
    forgotten ones TOFU's last ones (from ``forget10_perturbed``), the rest follow the held-out
    ones. The holdout files hold the TOFU authors left out of the subset, from the first one after
    the subset's retain authors on (as many as each forget split, when there are that many left:
    never trained on by a model fine-tuned on the subset; a model fine-tuned on all of TOFU has
    seen them, for it use TOFU's own holdout files, a plain ``--data-dir``).
    ``real_authors``/``world_facts`` and ``idontknow.jsonl`` are copied unchanged.
    """
    full = load_tofu_split("full", src_dir)
    if len(full) % questions_per_author:
        raise ValueError(f"full has {len(full)} rows, not a multiple of {questions_per_author} per author")
    all_authors = [full[i:i + questions_per_author] for i in range(0, len(full), questions_per_author)]
    if not 1 <= n_authors <= len(all_authors):
        raise ValueError(f"--authors must be in [1, {len(all_authors)}], got {n_authors}")
    counts = author_counts(n_authors)
    h, f = counts["heldout"], counts["forget10"]
    held, forgotten = list(range(h)), list(range(len(all_authors) - f, len(all_authors)))
    perturbed = {}
    for split, needed in (("retain_perturbed", held), ("forget10_perturbed", forgotten)):
        rows = {(r["question"], r["answer"]): r for r in load_tofu_split(split, src_dir)}
        if len(needed) > len(rows) // questions_per_author:
            raise ValueError(f"{n_authors} authors need {len(needed)} authors with perturbed rows in "
                             f"{Path(src_dir) / f'{split}.json'}, which has {len(rows) // questions_per_author}")
        for a in needed:  # named here: a missing row would surface as another split's problem
            for i, r in enumerate(all_authors[a]):
                key = (r["question"], r["answer"])
                if key not in rows:
                    raise ValueError(f"{Path(src_dir) / f'{split}.json'} has no row for row "
                                     f"{a * questions_per_author + i} of full.json (question {r['question'][:60]!r}): "
                                     "the file is truncated or from another TOFU version; fetch it again")
                perturbed[key] = rows[key]
    chosen = held + list(range(h, n_authors - f)) + forgotten
    authors = [[{**r, **perturbed.get((r["question"], r["answer"]), {})} for r in all_authors[a]] for a in chosen]
    # an author left out who repeats a subset question (TOFU asks two authors "What is the full name
    # of the author?") would be a member row: skipped
    asked = {question_key(r["question"]) for a in authors for r in a}
    left_out = [all_authors[a] for a in range(n_authors - f, len(all_authors) - f)
                if not any(question_key(r["question"]) in asked for r in all_authors[a])]
    written = write_tofu_folder(out_dir, authors, load_tofu_split("real_authors_perturbed", src_dir),
                                load_tofu_split("world_facts_perturbed", src_dir), holdout_authors=left_out)
    for name in ("real_authors.json", "world_facts.json", "idontknow.jsonl"):  # TOFU's own files
        if (Path(src_dir) / name).is_file():
            shutil.copyfile(Path(src_dir) / name, Path(out_dir) / name)
    return written


def has_holdout(folder: Union[str, Path]) -> bool:
    """Whether a TOFU folder holds any holdout file."""
    return any((Path(folder) / f"{h}.json").is_file() for h in HOLDOUT_OF.values())


def add_holdout_files(folder: Union[str, Path], holdout_authors: Sequence[Sequence[dict]],
                      n_authors: int) -> Dict[str, int]:
    """Write the holdout files of a folder of ``n_authors`` authors made before they existed (a
    cached one), each atomically (the folder is in use); the other files stay as they are."""
    written = holdout_splits(holdout_authors, author_counts(n_authors))
    for name, rows in written.items():
        text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows).encode()
        atomic_write(Path(folder) / f"{name}.json", lambda f, b=text: f.write(b))
    return {k: len(v) for k, v in written.items()}


def add_subset_holdout(subset_dir: Union[str, Path], src_dir: Union[str, Path], n_authors: int,
                       questions_per_author: int = TOFU_QUESTIONS_PER_AUTHOR) -> None:
    """Give a subset folder written by an older :func:`subset_tofu` (a cache) its holdout files,
    the bytes a fresh cut writes; nothing when it has some already."""
    if has_holdout(subset_dir):
        return
    with tempfile.TemporaryDirectory() as tmp:
        subset_tofu(src_dir, tmp, n_authors, questions_per_author)
        for h in HOLDOUT_OF.values():
            if (Path(tmp) / f"{h}.json").is_file():
                data = (Path(tmp) / f"{h}.json").read_bytes()
                atomic_write(Path(subset_dir) / f"{h}.json", lambda f, b=data: f.write(b))
