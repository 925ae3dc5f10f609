"""Deterministic generator of news-like articles about fictitious people, places and events, written
as a MUSE folder (the layout of the hub's ``muse-bench/MUSE-News``, JSON-lines per split).

The offline MUSE-style default (``python -m fastgeffect.run --benchmark muse`` without
``--data-dir``) trains a tiny model on these articles. Every article reports one event — who
(a fictitious person and their role), what, where, when, how many — in a few sentences, and ends
with a short question-and-answer section about the same facts, written in MUSE's knowledge-probe
format (``Question: …\\nAnswer: …``). A model of a million parameters does not turn prose into
answers by itself the way MUSE's 7B target does; the section gives the knowledge probe something
it can have learnt, while verbatim memorisation is probed on the prose.

Written splits (subset/split.jsonl, one JSON object per line, MUSE's field names)::

    raw/forget, raw/retain1, raw/retain2, raw/holdout       {"text"}
    knowmem/forget_qa, knowmem/retain_qa                    {"question", "answer"}
    knowmem/forget_qa_icl, knowmem/retain_qa_icl            {"question", "answer"}
    verbmem/forget                                          {"prompt", "gt"}
    privleak/forget, privleak/retain, privleak/holdout      {"text"}

The target learns forget + retain1 + retain2, the retrained twin retain1 + retain2 (MUSE's
"retrain" model); holdout articles are never trained on. ``forget_qa`` asks about forget
articles, ``retain_qa`` about retain2 articles; the in-context examples (``*_icl``) are questions
about other articles of the same split, as in MUSE.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

from . import wordlists as W

ROLES = ("mayor", "engineer", "teacher", "nurse", "architect", "farmer", "librarian", "judge", "chemist",
         "pilot", "baker", "geologist", "council member", "fire chief", "museum curator", "harbour master")
EVENTS = (("opened", "a new bridge"), ("unveiled", "a public library"), ("launched", "a river clean-up"),
          ("led", "a flood rescue"), ("founded", "a community orchard"), ("restored", "an old lighthouse"),
          ("organised", "a winter festival"), ("announced", "a solar farm"), ("inaugurated", "a rail line"),
          ("discovered", "a Roman mosaic"), ("rebuilt", "the town hall"), ("won", "a regional chess final"))
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")

QA_TEMPLATES: Tuple[Tuple[str, str], ...] = (
    ("Who {verb} {thing} in {city}?", "{name}"),
    ("Where did {name} {verb_base} {thing}?", "{city}"),
    ("In which month did {name} {verb_base} {thing}?", "{month}"),
    ("What is the job of {name}?", "{role}"),
    ("How many people attended the event led by {name}?", "{crowd}"),
)
# the base form of each event verb, for the questions
VERB_BASE = {"opened": "open", "unveiled": "unveil", "launched": "launch", "led": "lead", "founded": "found",
             "restored": "restore", "organised": "organise", "announced": "announce", "inaugurated": "inaugurate",
             "discovered": "discover", "rebuilt": "rebuild", "won": "win"}


@dataclass(frozen=True)
class NewsConfig:
    n_forget: int = 12       # articles to forget
    n_retain1: int = 12      # retain articles the unlearning may use (MUSE's retain1)
    n_retain2: int = 12      # retain articles the evaluation asks about (MUSE's retain2)
    n_holdout: int = 12      # never trained on (privacy leakage's non-members)
    qa_per_article: int = 2  # knowledge questions per article (≤ len(QA_TEMPLATES))
    n_icl: int = 3           # in-context examples per knowledge split
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.qa_per_article <= len(QA_TEMPLATES):
            raise ValueError(f"qa_per_article must be in [1, {len(QA_TEMPLATES)}], got {self.qa_per_article}")
        for name in ("n_forget", "n_retain1", "n_retain2", "n_holdout"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be at least 2, got {getattr(self, name)}")
        if not 1 <= self.n_icl < min(self.n_forget, self.n_retain2):
            raise ValueError(f"n_icl must be at least 1 and below the article counts, got {self.n_icl}")

    def to_dict(self) -> dict:
        return asdict(self)


def _facts(rng: random.Random, used: set) -> dict:
    while True:
        first = rng.choice(W.FIRST_NAMES_F + W.FIRST_NAMES_M)
        name = f"{first} {rng.choice(W.SURNAMES)}"
        if name not in used:
            used.add(name)
            break
    verb, thing = rng.choice(EVENTS)
    city, country = rng.choice(W.PLACES)
    return {"name": name, "surname": name.split()[-1], "role": rng.choice(ROLES), "verb": verb,
            "verb_base": VERB_BASE[verb], "thing": thing, "city": city, "country": country,
            "weekday": rng.choice(WEEKDAYS), "month": rng.choice(MONTHS), "year": str(rng.randint(2019, 2024)),
            "crowd": str(rng.randint(2, 90) * 10), "hobby": rng.choice(W.HOBBIES)}


def _prose(f: dict) -> str:
    return (f"{f['city'].upper()}, {f['country']} - On a {f['weekday']} in {f['month']} {f['year']}, "
            f"{f['role']} {f['name']} {f['verb']} {f['thing']} in {f['city']}. "
            f"About {f['crowd']} people came to watch. "
            f"{f['surname']} said the work had taken years of planning and thanked the volunteers. "
            f"Outside of work, {f['surname']} is known in {f['city']} for {f['hobby']}.")


def _qa(f: dict, templates: Sequence[Tuple[str, str]]) -> List[dict]:
    return [{"question": q.format(**f), "answer": a.format(**f)} for q, a in templates]


def knowmem_block(rows: Sequence[dict]) -> str:
    """Questions and answers in MUSE's knowledge-probe format, one blank line between them."""
    return "\n\n".join(f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows)


def _article(rng: random.Random, used: set, qa_per_article: int) -> Tuple[str, List[dict]]:
    facts = _facts(rng, used)
    qa = _qa(facts, rng.sample(QA_TEMPLATES, qa_per_article))
    return _prose(facts) + "\n\n" + knowmem_block(qa), qa


def generate_news(cfg: NewsConfig) -> Dict[str, Dict[str, List[dict]]]:
    """``{subset: {split: rows}}`` of a MUSE folder, deterministic for ``cfg``."""
    rng = random.Random(cfg.seed)
    used: set = set()
    texts: Dict[str, List[str]] = {}
    qas: Dict[str, List[List[dict]]] = {}
    for split, n in (("forget", cfg.n_forget), ("retain1", cfg.n_retain1), ("retain2", cfg.n_retain2),
                     ("holdout", cfg.n_holdout)):
        made = [_article(rng, used, cfg.qa_per_article) for _ in range(n)]
        texts[split] = [t for t, _ in made]
        qas[split] = [q for _, q in made]

    def knowmem(split: str) -> Tuple[List[dict], List[dict]]:
        # the in-context examples ask about the split's first n_icl articles, the probe about the rest
        icl = [qa[0] for qa in qas[split][:cfg.n_icl]]
        probe = [row for qa in qas[split][cfg.n_icl:] for row in qa]
        return probe, icl

    forget_qa, forget_icl = knowmem("forget")
    retain_qa, retain_icl = knowmem("retain2")
    # verbatim memorisation: the first third of the prose as the prompt, the rest of the article as
    # the true continuation; the prompt keeps the space after its last word (where a word-level
    # tokenizer like the embedded one puts it, so the prompt ends on a token boundary)
    verbmem = []
    for text in texts["forget"]:
        words = text.split("\n\n")[0].split(" ")
        prompt = " ".join(words[: len(words) // 3]) + " "
        verbmem.append({"prompt": prompt, "gt": text[len(prompt):]})

    def rows(split: str) -> List[dict]:
        return [{"text": t} for t in texts[split]]

    def raw(split: str) -> List[dict]:
        # the articles, then each of their question-answer pairs as a document of its own: a model this
        # small learns an answer in the context it saw it in, and a knowledge probe asks it after other
        # questions (the in-context examples), not after its article's prose
        return rows(split) + [{"text": knowmem_block([row])} for qa in qas[split] for row in qa]

    return {"raw": {s: raw(s) for s in ("forget", "retain1", "retain2", "holdout")},
            "knowmem": {"forget_qa": forget_qa, "forget_qa_icl": forget_icl,
                        "retain_qa": retain_qa, "retain_qa_icl": retain_icl},
            "verbmem": {"forget": verbmem},
            "privleak": {"forget": rows("forget"), "retain": rows("retain2"), "holdout": rows("holdout")}}


def write_news_folder(out_dir: Union[str, Path], cfg: NewsConfig) -> Path:
    """Write :func:`generate_news` as ``out_dir/<subset>/<split>.jsonl``; returns ``out_dir``."""
    out_dir = Path(out_dir)
    for subset, splits in generate_news(cfg).items():
        (out_dir / subset).mkdir(parents=True, exist_ok=True)
        for split, rows in splits.items():
            with open(out_dir / subset / f"{split}.jsonl", "w", encoding="utf-8") as fh:
                for row in rows:
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out_dir
