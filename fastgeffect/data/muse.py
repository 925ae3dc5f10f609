"""MUSE data (Shi et al. 2024, ``muse-bench/MUSE-News`` / ``MUSE-Books``) from a local folder.

Layout, as ``huggingface-cli download muse-bench/MUSE-News --repo-type dataset --local-dir D``
writes it: one folder per subset, one file per split, ``D/<subset>/<split>-00000-of-00001.parquet``
(every ``<split>-*.parquet`` shard is read, in name order). The offline generator writes the same
rows as JSON lines, ``D/<subset>/<split>.jsonl``; a split given both ways is refused (which one is
meant?). The hub's older ``<split>.json`` files (MUSE's own JSON arrays, kept beside the parquet
files) are not read.

Subsets, splits and the fields of each row (a string each):

* ``raw``: forget, retain1 (required), retain2, holdout (optional): ``text``. MUSE unlearns on
  raw/forget with raw/retain1 as the retain corpus.
* ``knowmem``: forget_qa, retain_qa, forget_qa_icl, retain_qa_icl: ``question``, ``answer``.
* ``verbmem``: forget: ``prompt``, ``gt`` (the true continuation).
* ``privleak``: forget, holdout (required), retain (optional): ``text``.
* ``scal``, ``sust`` (MUSE-News only, optional): forget_1 … forget_4: ``text``.

Every file is read and every row checked by :func:`load_muse` before it returns, so a missing or
malformed file fails with its path before a run writes anything. A TOFU folder is recognised and
refused with that name.

    data = load_muse("D")
    data.raw["forget"]        # list of str
    data.knowmem["forget_qa"] # list of {"question", "answer"}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from ..jsonl import read_jsonl
from .tofu import SPLIT_FIELDS as TOFU_SPLITS

HUB_NAMES = ("muse-bench/MUSE-News", "muse-bench/MUSE-Books")

# subset -> (required splits, optional splits, fields of each row)
LAYOUT: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...], Tuple[str, ...]]] = {
    "raw": (("forget", "retain1"), ("retain2", "holdout"), ("text",)),
    "knowmem": (("forget_qa", "retain_qa", "forget_qa_icl", "retain_qa_icl"), (), ("question", "answer")),
    "verbmem": (("forget",), (), ("prompt", "gt")),
    "privleak": (("forget", "holdout"), ("retain",), ("text",)),
    "scal": ((), tuple(f"forget_{i}" for i in range(1, 5)), ("text",)),
    "sust": ((), tuple(f"forget_{i}" for i in range(1, 5)), ("text",)),
}
TEXT_SUBSETS = ("raw", "privleak", "scal", "sust")  # rows kept as their text alone


@dataclass(frozen=True)
class MuseData:
    """One MUSE folder, read and checked. Text subsets map split -> list of documents (str);
    ``knowmem`` and ``verbmem`` map split -> list of row dicts with their fields. ``files`` maps
    ``"<subset>/<split>"`` -> the file(s) it was read from. Optional splits the folder lacks are absent."""
    root: Path
    raw: Dict[str, List[str]]
    knowmem: Dict[str, List[dict]]
    verbmem: Dict[str, List[dict]]
    privleak: Dict[str, List[str]]
    scal: Dict[str, List[str]] = field(default_factory=dict)
    sust: Dict[str, List[str]] = field(default_factory=dict)
    files: Dict[str, List[str]] = field(default_factory=dict)


def is_tofu_folder(root: Path) -> bool:
    """Whether ``root`` holds TOFU's files (``<split>.json``) and none of MUSE's subset folders."""
    return any((root / f"{s}.json").is_file() for s in TOFU_SPLITS) and not any((root / s).is_dir() for s in LAYOUT)


def split_files(root: Path, subset: str, split: str) -> Optional[List[Path]]:
    """The file(s) holding one split: its parquet shards or its ``.jsonl``; None when neither exists."""
    folder = root / subset
    shards = sorted(folder.glob(f"{split}-*.parquet"))
    jsonl = folder / f"{split}.jsonl"
    if shards and jsonl.is_file():
        raise ValueError(f"MUSE split {subset}/{split} is given twice, as {shards[0]} and as {jsonl}: keep one")
    if shards:
        return shards
    return [jsonl] if jsonl.is_file() else None


def read_rows(path: Path) -> List:
    """The rows of one parquet or JSON-lines file (a file that cannot be read names itself)."""
    if path.suffix == ".jsonl":
        try:
            return read_jsonl(path)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text ({e.reason}): MUSE's JSON-lines files are UTF-8") from None
    import pyarrow.parquet as pq  # a dependency of datasets; only needed for the hub's files

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise ValueError(f"{path} is not a readable parquet file ({type(e).__name__}: {e})") from None


def check_split_rows(rows: List, fields: Tuple[str, ...], where: str) -> None:
    if not rows:
        raise ValueError(f"{where} has no row")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{where}: row {i} is a {type(row).__name__}, not an object with the field(s) "
                             + ", ".join(fields))
        for f in fields:
            if not isinstance(row.get(f), str):
                problem = f"has no {f!r} field" if f not in row else f"has {f!r} = {row[f]!r}, not a string"
                raise ValueError(f"{where}: row {i} {problem}")


def load_split(root: Path, subset: str, split: str, required: bool) -> Tuple[Optional[List], List[str]]:
    """``(rows, files)`` of one split, checked; ``(None, [])`` for a missing optional split."""
    fields = LAYOUT[subset][2]
    paths = split_files(root, subset, split)
    if paths is None:
        if required:
            raise FileNotFoundError(f"MUSE folder {root} lacks {subset}/{split}: expected "
                                    f"{root / subset / (split + '-00000-of-00001.parquet')} (the hub's layout) or "
                                    f"{root / subset / (split + '.jsonl')} (JSON lines with the field(s) "
                                    f"{', '.join(fields)})")
        return None, []
    rows: List = []
    for p in paths:
        part = read_rows(p)
        check_split_rows(part, fields, str(p))
        rows.extend(part)
    if subset in TEXT_SUBSETS:
        rows = [r["text"] for r in rows]
    else:
        rows = [{f: r[f] for f in fields} for r in rows]
    return rows, [str(p) for p in paths]


def load_muse(data_dir: Union[str, Path]) -> MuseData:
    """Read and check every MUSE split of ``data_dir`` (module docstring); raises before returning
    on a missing folder or required file, a malformed row, or a TOFU folder."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"MUSE data folder {root} does not exist")
    if is_tofu_folder(root):
        raise ValueError(f"{root} is a TOFU folder (it holds TOFU's <split>.json files, no MUSE subset folder): "
                         f"--benchmark muse needs MUSE's layout ({', '.join(LAYOUT)} subfolders, as "
                         f"{HUB_NAMES[0]} on the hub); use --benchmark tofu for this folder")
    parts: Dict[str, Dict[str, List]] = {}
    files: Dict[str, List[str]] = {}
    for subset, (required, optional, _) in LAYOUT.items():
        parts[subset] = {}
        for split in required + optional:
            rows, paths = load_split(root, subset, split, split in required)
            if rows is not None:
                parts[subset][split] = rows
                files[f"{subset}/{split}"] = paths
    return MuseData(root=root, files=files, **parts)


__all__ = ["HUB_NAMES", "LAYOUT", "MuseData", "is_tofu_folder", "load_muse"]
