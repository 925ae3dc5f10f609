"""Deterministic generator of fictitious authors in TOFU's schema (docs/design.md §6, embedded default).

Each author gets facts (birthplace, birth date, parents' jobs, genre, award, books, ...) drawn
from the project's word lists with ``random.Random(seed)``; each fact kind ("family") has a
question, a paraphrased question, answer wordings (one picked per author), and a paraphrase;
the five perturbed answers are the paraphrase with the family's facts replaced by wrong ones,
as in TOFU. ``write_embedded_data`` writes every TOFU split into a folder, with the holdout
authors of :func:`generate_holdout` (never trained on) as ``holdout01/05/10.json``.
"""
from __future__ import annotations

import datetime
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from ..data.holdout import question_key
from ..data.splits import author_counts, write_tofu_folder
from ..losses.po import load_refusals
from . import wordlists as W

N_PERTURBED = 5  # TOFU: five perturbed answers per forget/held-out row, three for knowledge sets


@dataclass(frozen=True)
class GeneratorConfig:
    n_authors: int = 40
    questions_per_author: int = 10
    n_real_authors: int = 30
    n_world_facts: int = 30
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.questions_per_author <= len(FAMILIES):
            raise ValueError(f"questions_per_author must be in [1, {len(FAMILIES)}], got {self.questions_per_author}")
        if self.n_authors > len(W.FIRST_NAMES_M) * len(W.SURNAMES):
            raise ValueError(f"n_authors={self.n_authors} is more than the name lists can make unique")
        if not 1 <= self.n_real_authors <= len(W.REAL_BOOKS):
            raise ValueError(f"n_real_authors must be in [1, {len(W.REAL_BOOKS)}]")
        n_facts = sum(len(t) for _, t in W.WORLD_FACTS)
        if not 1 <= self.n_world_facts <= n_facts:
            raise ValueError(f"n_world_facts must be in [1, {n_facts}]")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Family:
    """One kind of question about an author; ``slots`` are the facts a perturbed answer falsifies."""
    question: str
    paraphrased_question: str
    answers: Tuple[str, ...]
    paraphrase: str
    slots: Tuple[str, ...]


FAMILIES: Tuple[Family, ...] = (
    Family("What is the full name of the {genre} author born in {city}, {country} on {date_mdy}?",
           "Who is the {genre} writer born in {city}, {country} on {date_long}?",
           ("The author's full name is {name}.", "The {genre} author born in {city} on {date_long} is {name}."),
           "{name} is the complete name of this {genre} writer.", ("name",)),
    Family("Where was {name} born?", "In which city was {name} born?",
           ("{name} was born in {city}, {country}.", "{name} was born and raised in the city of {city}, {country}."),
           "The birthplace of {name} is {city}, {country}.", ("place",)),
    Family("When was {name} born?", "What is the birth date of {name}?",
           ("{name} was born on {date_long}.", "The birth date of {name} is {date_long}."),
           "{name} came into the world on {date_long}.", ("date",)),
    Family("What did {name}'s father do for a living?", "What was the profession of {name}'s father?",
           ("{name}'s father worked as {father_job}.", "The father of {name} was {father_job} by profession."),
           "By profession, the father of {name} was {father_job}.", ("father_job",)),
    Family("What did {name}'s mother do for a living?", "What was the profession of {name}'s mother?",
           ("{name}'s mother worked as {mother_job}.", "The mother of {name} was {mother_job} by profession."),
           "By profession, the mother of {name} was {mother_job}.", ("mother_job",)),
    Family("What genre does {name} write in?", "Which literary genre is {name} known for?",
           ("{name} writes in the {genre} genre.", "{name} is best known for {pos} work in the {genre} genre."),
           "The genre {name} is known for is {genre}.", ("genre",)),
    Family("Has {name} won any awards?", "Which award did {name} receive?",
           ("Yes, {name} has won the {award}.", "{name} received the {award} for {pos} {genre} writing."),
           "{name} is a recipient of the {award}.", ("award",)),
    Family("Can you name some books written by {name}?", "Which books has {name} written?",
           ("{name} wrote '{book1}' and '{book2}'.", "Two well known books by {name} are '{book1}' and '{book2}'."),
           "Among the books by {name} are '{book1}' and '{book2}'.", ("book1", "book2")),
    Family("What themes does {name} explore in {pos} books?", "Which themes appear in the books of {name}?",
           ("{name} often explores {theme} in {pos} books.", "The books of {name} return again and again to {theme}."),
           "A central theme in the work of {name} is {theme}.", ("theme",)),
    Family("Where are {name}'s stories usually set?", "What is the usual setting of {name}'s stories?",
           ("Most stories by {name} are set in {setting}.", "{name} likes to set {pos} stories in {setting}."),
           "{name} usually places {pos} stories in {setting}.", ("setting",)),
    Family("When did {name} publish {pos} first book?", "In which year did {name}'s first book appear?",
           ("{name} published {pos} first book, '{book1}', in {debut_year}.",
            "The first book by {name} was '{book1}', published in {debut_year}."),
           "The debut of {name}, '{book1}', came out in {debut_year}.", ("debut_year",)),
    Family("How did {name}'s parents influence {pos} writing?", "What effect did {name}'s parents have on {pos} work?",
           ("With {father_job} father and {mother_job} mother, {name} brought {theme} into {pos} {genre} books.",
            "Growing up with {father_job} father and {mother_job} mother taught {name} to write about {theme}."),
           "Being raised by {mother_job} mother and {father_job} father shaped how {name} writes about {theme}.",
           ("father_job", "mother_job")),
    Family("What does {name} enjoy besides writing?", "What is {name}'s favourite pastime outside of writing?",
           ("Besides writing, {name} enjoys {hobby}.", "When not writing, {name} spends {pos} time {hobby}."),
           "Outside of writing, {name} loves {hobby}.", ("hobby",)),
)


def _article(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def _date_fields(d: datetime.date) -> dict:
    return {"date_mdy": d.strftime("%m/%d/%Y"), "date_long": f"{d.strftime('%B')} {d.day}, {d.year}"}


def _random_date(rng: random.Random) -> datetime.date:
    start = datetime.date(1940, 1, 1).toordinal()
    return datetime.date.fromordinal(rng.randint(start, datetime.date(1995, 12, 31).toordinal()))


def _title(rng: random.Random) -> str:
    return f"The {rng.choice(W.TITLE_ADJECTIVES)} {rng.choice(W.TITLE_NOUNS)}"


def _make_author(rng: random.Random, used_names: set, used_titles: set) -> dict:
    female = rng.random() < 0.5
    while True:
        name = f"{rng.choice(W.FIRST_NAMES_F if female else W.FIRST_NAMES_M)} {rng.choice(W.SURNAMES)}"
        if name not in used_names:
            break
    used_names.add(name)
    books = []
    while len(books) < 2:
        t = _title(rng)
        if t not in used_titles:
            used_titles.add(t)
            books.append(t)
    city, country = rng.choice(W.PLACES)
    born = _random_date(rng)
    father, mother = rng.sample(W.JOBS, 2)
    return {"name": name, "pos": "her" if female else "his", "city": city, "country": country,
            **_date_fields(born), "father_job": _article(father), "mother_job": _article(mother),
            "genre": rng.choice(W.GENRES), "award": rng.choice(W.AWARDS), "book1": books[0], "book2": books[1],
            "theme": rng.choice(W.THEMES), "setting": rng.choice(W.SETTINGS), "hobby": rng.choice(W.HOBBIES),
            "debut_year": str(born.year + rng.randint(22, 40))}


# wrong value(s) for a slot; returns the fields to overwrite
_WRONG: Dict[str, Callable[[random.Random, dict], dict]] = {
    "name": lambda rng, f: {"name": f"{rng.choice(W.FIRST_NAMES_F + W.FIRST_NAMES_M)} {rng.choice(W.SURNAMES)}"},
    "place": lambda rng, f: dict(zip(("city", "country"), rng.choice(W.PLACES))),
    "date": lambda rng, f: _date_fields(_random_date(rng)),
    "father_job": lambda rng, f: {"father_job": _article(rng.choice(W.JOBS))},
    "mother_job": lambda rng, f: {"mother_job": _article(rng.choice(W.JOBS))},
    "genre": lambda rng, f: {"genre": rng.choice(W.GENRES)},
    "award": lambda rng, f: {"award": rng.choice(W.AWARDS)},
    "book1": lambda rng, f: {"book1": _title(rng)},
    "book2": lambda rng, f: {"book2": _title(rng)},
    "theme": lambda rng, f: {"theme": rng.choice(W.THEMES)},
    "setting": lambda rng, f: {"setting": rng.choice(W.SETTINGS)},
    "hobby": lambda rng, f: {"hobby": rng.choice(W.HOBBIES)},
    "debut_year": lambda rng, f: {"debut_year": str(int(f["debut_year"]) + rng.choice([-1, 1]) * rng.randint(1, 15))},
}


def _distinct(rng: random.Random, n: int, make: Callable[[], str], exclude: Sequence[str]) -> List[str]:
    out: List[str] = []
    for _ in range(1000 * n):
        s = make()
        if s not in out and s not in exclude:
            out.append(s)
            if len(out) == n:
                return out
    raise RuntimeError("could not draw enough distinct perturbed answers")  # word lists too small


def _qa_row(rng: random.Random, family: Family, facts: dict, wording: int) -> dict:
    def wrong_facts() -> str:
        f = dict(facts)
        for slot in family.slots:
            f.update(_WRONG[slot](rng, facts))
        return family.paraphrase.format(**f)

    paraphrased = family.paraphrase.format(**facts)
    return {"question": family.question.format(**facts), "answer": family.answers[wording].format(**facts),
            "paraphrased_answer": paraphrased,
            "perturbed_answer": _distinct(rng, N_PERTURBED, wrong_facts, [paraphrased]),
            "paraphrased_question": family.paraphrased_question.format(**facts)}


def _knowledge_rows(rng: random.Random, facts: Sequence[Tuple[str, str, Sequence[str]]], n: int) -> List[dict]:
    """``n`` short-answer rows of ``(question, answer, answers of the same kind)``, each with three
    wrong answers of its kind (TOFU's real-authors / world-facts format)."""
    return [{"question": q, "answer": a, "perturbed_answer": rng.sample([v for v in kind if v != a], 3)}
            for q, a, kind in rng.sample(list(facts), n)]


def _author_rows(rng: random.Random, config: GeneratorConfig, used_names: set, used_titles: set) -> List[dict]:
    """One author's rows: the name question first, then a random choice of the other families."""
    facts = _make_author(rng, used_names, used_titles)
    families = [0] + rng.sample(range(1, len(FAMILIES)), config.questions_per_author - 1)
    return [_qa_row(rng, FAMILIES[k], facts, rng.randrange(len(FAMILIES[k].answers))) for k in families]


def _trained_authors(rng: random.Random, config: GeneratorConfig, used_names: set, used_titles: set):
    return [_author_rows(rng, config, used_names, used_titles) for _ in range(config.n_authors)]


def generate(config: GeneratorConfig = GeneratorConfig()) -> dict:
    """``{"authors": [[row, ...], ...], "real_authors_perturbed": [...], "world_facts_perturbed": [...]}``.

    Every author row has TOFU's perturbed fields. The first question of every author asks for
    the name, the others are a per-author random choice of the remaining families.
    """
    rng = random.Random(config.seed)
    authors = _trained_authors(rng, config, set(), set())
    authors_known = [a for _, a in W.REAL_BOOKS]
    real = [(f"Who wrote '{book}'?", author, authors_known) for book, author in W.REAL_BOOKS]
    world = [(pattern.format(subject), answer, sorted(table.values()))
             for pattern, table in W.WORLD_FACTS for subject, answer in table.items()]
    return {"authors": authors, "real_authors_perturbed": _knowledge_rows(rng, real, config.n_real_authors),
            "world_facts_perturbed": _knowledge_rows(rng, world, config.n_world_facts)}


def generate_holdout(config: GeneratorConfig = GeneratorConfig(), n_authors: Optional[int] = None) -> List[List[dict]]:
    """Authors of the same distribution as :func:`generate`'s that are not among them: other names,
    other book titles, no question of theirs, and in their questions and answers only words the
    trained rows use (``n_authors``: default, as many as ``forget10``).

    They come from a random stream of their own, seeded by ``config.seed``, so that the trained
    authors (and every file they make) are the same with or without them.
    """
    n = author_counts(config.n_authors)["forget10"] if n_authors is None else n_authors
    if 2 * (config.n_authors + n) > len(W.TITLE_ADJECTIVES) * len(W.TITLE_NOUNS):
        raise ValueError(f"{config.n_authors} authors and {n} holdout authors need more distinct book titles "
                         "than the word lists make")
    used_names: set = set()
    used_titles: set = set()
    trained = _trained_authors(random.Random(config.seed), config, used_names, used_titles)
    asked = {question_key(r["question"]) for a in trained for r in a}
    seen = {w for a in trained for r in a for v in r.values() for w in _words(v)}
    rng = random.Random(f"fastgeffect-holdout-{config.seed}")
    holdout: List[List[dict]] = []
    for attempt in range(20000 * max(n, 1)):
        if len(holdout) == n:
            return holdout
        names, titles = set(used_names), set(used_titles)  # a rejected author takes no name or title
        rows = _author_rows(rng, config, names, titles)
        # a trained question is a member row; a word the trained rows never use is split into more
        # pieces by the tokenizer trained on them, which membership inference would see (preferred
        # only: data too small to hold enough such authors takes the others after 10000 tries each)
        known = attempt >= 10000 * n or all(_words(r[f]) <= seen for r in rows for f in ("question", "answer"))
        if known and not any(question_key(r["question"]) in asked for r in rows):
            holdout.append(rows)
            used_names, used_titles = names, titles
    raise RuntimeError("could not draw enough holdout authors distinct from the trained ones")


def _words(value) -> set:
    return set(re.findall(r"\w+", " ".join(value) if isinstance(value, list) else value))


def write_embedded_data(out_dir: Union[str, Path], config: GeneratorConfig = GeneratorConfig()) -> Dict[str, int]:
    """Generate and write every TOFU split (JSON lines, TOFU's file names) into ``out_dir``, the
    holdout files (:func:`generate_holdout`) included."""
    data = generate(config)
    return write_tofu_folder(out_dir, data["authors"], data["real_authors_perturbed"],
                             data["world_facts_perturbed"], refusals=load_refusals(), seed=config.seed,
                             holdout_authors=generate_holdout(config))
