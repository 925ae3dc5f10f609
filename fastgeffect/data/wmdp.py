"""WMDP's unlearning corpora (Li et al. 2024) as lists of documents, read from JSON-lines files.

The layout is the one of the WMDP release (github.com/centerforaisafety/wmdp: its RMU code reads
``data/{name}.jsonl``) and of the hub's ``cais/wmdp-corpora`` (configs ``cyber-forget-corpus``,
``cyber-retain-corpus``, ``bio-retain-corpus``, one string field ``text``, split ``train``); the
bio forget corpus (PubMed papers) is gated and requested separately (``cais/wmdp-bio-forget-corpus``;
RMU reads its ``text`` field). A folder holds, per domain::

    bio-forget-corpus.jsonl    bio-retain-corpus.jsonl
    cyber-forget-corpus.jsonl  cyber-retain-corpus.jsonl

one document a line: a JSON object with a string ``text`` field (other fields are ignored), or a
bare JSON string. (RMU's own reader parses only the bio forget file and feeds the other files'
lines to the tokenizer as they are, JSON quoting included; here every file is parsed.) The RMU
paper trains with WikiText-2 as its retain set instead; any JSON-lines text file can be read with
:func:`read_text_jsonl`. Texts of at most ``min_chars`` characters are dropped, as RMU's
``get_data`` does (``len(text) > min_len``, its default 50). Chunking into token windows is
:class:`~fastgeffect.data.raw_text.TextWindowDataset`'s.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Union

PathLike = Union[str, os.PathLike]

DOMAINS = ("bio", "cyber")
TEXT_FIELD = "text"
MIN_CHARS = 50  # RMU's get_data(min_len=50): shorter lines are headers and blank fragments


def corpus_file(domain: str, split: str) -> str:
    """The release's file name of one corpus, e.g. ``bio-forget-corpus.jsonl``."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown WMDP domain {domain!r}; choose from {', '.join(DOMAINS)}")
    if split not in ("forget", "retain"):
        raise ValueError(f"WMDP corpus split must be 'forget' or 'retain', got {split!r}")
    return f"{domain}-{split}-corpus.jsonl"


def _line_text(value, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get(TEXT_FIELD), str):
        return value[TEXT_FIELD]
    if isinstance(value, dict):
        got = f"a {type(value.get(TEXT_FIELD)).__name__}" if TEXT_FIELD in value else "no such field"
        raise ValueError(f"{where}: expected a string {TEXT_FIELD!r} field, found {got} "
                         f"(fields: {', '.join(sorted(value)) or 'none'})")
    raise ValueError(f"{where}: expected a JSON object with a string {TEXT_FIELD!r} field or a JSON string, "
                     f"got a JSON {type(value).__name__}")


def read_text_jsonl(path: PathLike, *, min_chars: int = MIN_CHARS) -> List[str]:
    """The documents of a JSON-lines text file, in order (module docstring: one object with a string
    ``text`` field, or one JSON string, a line; blank lines skipped), keeping those longer than
    ``min_chars`` characters. A missing file, a line that is not UTF-8 or not JSON, a record without
    a string ``text``, or no document left is a ``ValueError``/``FileNotFoundError`` naming the file
    (and line)."""
    if isinstance(min_chars, bool) or not isinstance(min_chars, int) or min_chars < 0:
        raise ValueError(f"min_chars must be a non-negative integer, got {min_chars!r}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such WMDP corpus file")
    texts, n_records = [], 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise ValueError(f"{where}: not UTF-8 text (a JSON-lines corpus is UTF-8)") from None
            if not line:
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not a JSON line ({e.msg}); a WMDP corpus has one JSON object "
                                 f"with a {TEXT_FIELD!r} field a line") from None
            text = _line_text(value, where)
            n_records += 1
            if len(text) > min_chars:
                texts.append(text)
    if not texts:
        raise ValueError(f"{path}: no document longer than {min_chars} characters "
                         f"({n_records} record{'s' if n_records != 1 else ''})")
    return texts


@dataclass
class WMDPCorpora:
    """Forget and retain documents per domain, in file order."""
    forget: Dict[str, List[str]] = field(default_factory=dict)
    retain: Dict[str, List[str]] = field(default_factory=dict)

    @property
    def forget_texts(self) -> List[str]:
        """Every domain's forget documents, domain after domain."""
        return [t for texts in self.forget.values() for t in texts]

    @property
    def retain_texts(self) -> List[str]:
        return [t for texts in self.retain.values() for t in texts]


def load_wmdp_corpora(data_dir: PathLike, domains: Sequence[str] = DOMAINS, *,
                      min_chars: int = MIN_CHARS) -> WMDPCorpora:
    """The forget and retain corpora of ``domains`` from ``data_dir`` (layout in the module
    docstring). Every file is checked before any is read: the missing ones are named together."""
    if isinstance(domains, str) or not domains:
        raise ValueError(f"domains must be a non-empty list drawn from {', '.join(DOMAINS)}, got {domains!r}")
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{os.fspath(root)}: no such WMDP data folder")
    files = {(d, s): root / corpus_file(d, s) for d in dict.fromkeys(domains) for s in ("forget", "retain")}
    missing = [p.name for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{os.fspath(root)}: missing WMDP corpus file{'s' if len(missing) > 1 else ''} "
                                f"{', '.join(missing)} (expected {{domain}}-{{forget,retain}}-corpus.jsonl, as "
                                "in the WMDP release and the hub's cais/wmdp-corpora)")
    corpora = WMDPCorpora()
    for (domain, split), path in files.items():
        getattr(corpora, split)[domain] = read_text_jsonl(path, min_chars=min_chars)
    return corpora
