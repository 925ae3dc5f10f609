"""The offline MUSE-style generator: deterministic, its splits disjoint, every probe answerable from
the article it asks about (tests of the folder's loading and of the models are in test_muse_run.py)."""
import json
from dataclasses import replace

import pytest

from fastgeffect.embedded.news_generator import EVENTS, NewsConfig, generate_news, knowmem_block, write_news_folder


def _person(text: str) -> str:
    """The person an article is about: the two words before its event verb."""
    words = text.split(". ")[0].split(" ")
    at = next(i for i, w in enumerate(words) if w in {verb for verb, _ in EVENTS})
    return " ".join(words[at - 2:at])


def test_same_config_same_folder_bytes_another_seed_another_folder(tmp_path):
    cfg = NewsConfig(n_forget=5, n_retain1=4, n_retain2=5, n_holdout=4, n_icl=2)
    a, b = write_news_folder(tmp_path / "a", cfg), write_news_folder(tmp_path / "b", cfg)
    files = sorted(p.relative_to(a) for p in a.rglob("*.jsonl"))
    assert [str(f) for f in files] == sorted(
        ["raw/forget.jsonl", "raw/retain1.jsonl", "raw/retain2.jsonl", "raw/holdout.jsonl",
         "knowmem/forget_qa.jsonl", "knowmem/forget_qa_icl.jsonl", "knowmem/retain_qa.jsonl",
         "knowmem/retain_qa_icl.jsonl", "verbmem/forget.jsonl", "privleak/forget.jsonl", "privleak/retain.jsonl",
         "privleak/holdout.jsonl"])
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    c = write_news_folder(tmp_path / "c", replace(cfg, seed=1))
    assert (c / "raw/forget.jsonl").read_bytes() != (a / "raw/forget.jsonl").read_bytes()
    for f in files:  # JSON lines, one object per line
        assert all(isinstance(json.loads(line), dict) for line in (a / f).read_text().splitlines())


def _articles(rows):
    return [r["text"] for r in rows if not r["text"].startswith("Question: ")]


def test_every_person_is_in_one_article_and_holdout_people_are_never_trained_on():
    news = generate_news(NewsConfig())
    raw = news["raw"]
    texts = [t for s in ("forget", "retain1", "retain2", "holdout") for t in _articles(raw[s])]
    people = [_person(t) for t in texts]
    assert len(set(people)) == len(people) == len(texts)
    assert all(sum(p in t for t in texts) == 1 for p in people)
    for split in ("forget", "retain1", "retain2", "holdout"):
        assert len(_articles(raw[split])) == getattr(NewsConfig(), f"n_{split}")
    assert [r["text"] for r in news["privleak"]["forget"]] == _articles(raw["forget"])
    assert [r["text"] for r in news["privleak"]["holdout"]] == _articles(raw["holdout"])
    assert [r["text"] for r in news["privleak"]["retain"]] == _articles(raw["retain2"])


def test_each_question_answer_pair_is_also_a_document_of_its_split():
    cfg = NewsConfig()
    news = generate_news(cfg)
    for split in ("forget", "retain1", "retain2", "holdout"):
        articles = _articles(news["raw"][split])
        qa_docs = [r["text"] for r in news["raw"][split] if r["text"].startswith("Question: ")]
        assert len(qa_docs) == cfg.qa_per_article * len(articles)
        for doc in qa_docs:  # one pair, and its article holds it
            assert doc.count("Question: ") == 1 and sum(doc in a for a in articles) == 1


def test_each_probe_is_answered_by_its_split_and_the_in_context_examples_are_not_probed():
    cfg = NewsConfig()
    news = generate_news(cfg)
    for split, raw_split in (("forget", "forget"), ("retain", "retain2")):
        probe, icl = news["knowmem"][f"{split}_qa"], news["knowmem"][f"{split}_qa_icl"]
        assert len(icl) == cfg.n_icl
        assert len(probe) == (len(_articles(news["raw"][raw_split])) - cfg.n_icl) * cfg.qa_per_article
        texts = _articles(news["raw"][raw_split])
        for row in probe + icl:  # the article's question section holds the pair, in the probe's format
            block = knowmem_block([row])
            assert sum(block in t for t in texts) == 1, row
        icl_articles = {i for i, t in enumerate(texts) for row in icl if knowmem_block([row]) in t}
        probe_articles = {i for i, t in enumerate(texts) for row in probe if knowmem_block([row]) in t}
        assert icl_articles == set(range(cfg.n_icl)) and not icl_articles & probe_articles


def test_verbatim_probes_split_each_forget_article_without_losing_a_character():
    news = generate_news(NewsConfig())
    for row, article in zip(news["verbmem"]["forget"], _articles(news["raw"]["forget"])):
        assert row["prompt"] + row["gt"] == article
        prose = article.split("\n\n")[0]
        assert prose.startswith(row["prompt"]) and row["prompt"].endswith(" ") and len(row["prompt"]) < len(prose) / 2


@pytest.mark.parametrize("bad", [{"qa_per_article": 0}, {"qa_per_article": 99}, {"n_forget": 1},
                                 {"n_icl": 0}, {"n_icl": 12}])
def test_impossible_configs_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        NewsConfig(**bad)
