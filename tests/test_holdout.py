"""Holdout rows (never-trained authors, the non-members of membership inference): generated with the
embedded data, cut from real TOFU's left-out authors, read back, and refused when they overlap."""
import hashlib
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from fastgeffect.data import HOLDOUT_OF, check_holdout, load_holdout, load_tofu_split
from fastgeffect.data.splits import add_holdout_files, add_subset_holdout, author_counts, subset_tofu
from fastgeffect.embedded import corpus_texts
from fastgeffect.embedded.build import SIZES, EmbeddedConfig, _add_holdout
from fastgeffect.embedded.generator import GeneratorConfig, generate, generate_holdout, write_embedded_data

SMALL = GeneratorConfig(n_authors=20, questions_per_author=6, n_real_authors=6, n_world_facts=6)
HOLDOUT_FILES = [f"{h}.json" for h in HOLDOUT_OF.values()]

# digests of every file write_embedded_data wrote before it wrote holdout files (recorded then):
# the trained data, hence the tokenizer and the cached models, are byte for byte the same
RECORDED = {("default", 0): "407f21ae7e95ee2ad578c69c94d7fccac050c9da3820cd07796a18537dccd58e",
            ("default", 1): "17b0cca656ce5a192ef3490f571b75e151e1bd4907128d850b0294809756243c",
            ("tiny", 0): "49a2f6a5a4f098fbc07502d1c7603992962241e3ff88cae38d218d81915f190d",
            ("tiny", 1): "161c1949fb5589a96d55f19675ccd06d7396a527c051493e2d29bd714d6d12f8"}


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.name not in HOLDOUT_FILES:
            h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _name(author):  # the name question's answer ends with the name
    return author[0]["paraphrased_answer"].split(" is the complete name")[0]


@pytest.mark.parametrize("size, seed", sorted(RECORDED))
def test_trained_data_unchanged_by_the_holdout_authors(tmp_path, size, seed):
    write_embedded_data(tmp_path, replace(SIZES[size].generator, seed=seed))
    assert _digest(tmp_path) == RECORDED[size, seed]
    assert all((tmp_path / f).is_file() for f in HOLDOUT_FILES)


def test_holdout_authors_are_new_authors_of_the_same_kind(tmp_path):
    data = generate(SMALL)
    holdout = generate_holdout(SMALL)
    counts = author_counts(SMALL.n_authors)
    assert len(holdout) == counts["forget10"] and all(len(a) == SMALL.questions_per_author for a in holdout)
    assert {_name(a) for a in holdout}.isdisjoint(_name(a) for a in data["authors"])
    assert len({_name(a) for a in holdout}) == len(holdout)
    def titles(authors):
        return {t for a in authors for r in a for t in re.findall(r"'(The [^']+)'", r["answer"])}
    assert titles(holdout) and titles(data["authors"]) and titles(holdout).isdisjoint(titles(data["authors"]))
    assert set(holdout[0][0]) == set(data["authors"][0][0])  # every field of a trained row
    assert generate_holdout(SMALL) == holdout  # deterministic
    assert generate_holdout(replace(SMALL, seed=1)) != holdout
    write_embedded_data(tmp_path, SMALL)
    full = load_tofu_split("full", tmp_path)
    for split, name in HOLDOUT_OF.items():
        rows = load_holdout(split, tmp_path)
        assert rows == [{"question": r["question"], "answer": r["answer"]}
                        for a in holdout[:counts[split]] for r in a], name  # nested, as the forget splits
        check_holdout(rows, load_tofu_split(f"{split}_perturbed", tmp_path), full)
    assert load_holdout("forget10_perturbed", tmp_path) == load_holdout("forget10", tmp_path)


def test_holdout_authors_use_the_trained_words_when_the_data_has_enough():
    def words(rows, fields):
        return {w for r in rows for f in fields for w in re.findall(r"\w+", " ".join(as_list(r[f])))}

    def as_list(v):
        return v if isinstance(v, list) else [v]

    trained = [r for a in generate(SMALL)["authors"] for r in a]
    holdout = [r for a in generate_holdout(SMALL) for r in a]
    assert words(holdout, ("question", "answer")) <= words(trained, trained[0].keys())
    # data too small for that: the authors are still drawn, new ones, and distinct
    few = GeneratorConfig(n_authors=3, questions_per_author=1, n_real_authors=1, n_world_facts=1)
    trained, holdout = generate(few)["authors"], generate_holdout(few)
    assert len(holdout) == 1 and _name(holdout[0]) not in {_name(a) for a in trained}
    assert not words([r for a in holdout for r in a], ("question", "answer")) <= \
        words([r for a in trained for r in a], trained[0][0].keys())


def test_tokenizer_corpus_never_sees_the_holdout(tmp_path):
    write_embedded_data(tmp_path, SMALL)
    with_holdout = corpus_texts(tmp_path)
    for f in HOLDOUT_FILES:
        (tmp_path / f).unlink()
    assert corpus_texts(tmp_path) == with_holdout


def test_a_cached_base_without_holdout_files_gets_the_fresh_bytes(tmp_path):
    fresh, old = tmp_path / "fresh", tmp_path / "old"
    write_embedded_data(fresh, SMALL)
    shutil.copytree(fresh, old)
    for f in HOLDOUT_FILES:
        (old / f).unlink()
    _add_holdout(old, EmbeddedConfig(generator=SMALL), None, None)
    for f in sorted(p.name for p in fresh.iterdir()):
        assert (old / f).read_bytes() == (fresh / f).read_bytes(), f
    assert add_holdout_files(old, generate_holdout(SMALL), SMALL.n_authors) == {
        HOLDOUT_OF[s]: author_counts(SMALL.n_authors)[s] * SMALL.questions_per_author for s in HOLDOUT_OF}


@pytest.fixture
def tofu_like(tmp_path):
    """A TOFU-shaped source of 40 generated authors of 4 questions (real TOFU's layout)."""
    src = tmp_path / "src"
    write_embedded_data(src, GeneratorConfig(n_authors=40, questions_per_author=4, n_real_authors=4,
                                             n_world_facts=4))
    for f in HOLDOUT_FILES:
        (src / f).unlink()
    return src


def test_subset_holdout_is_the_authors_left_out(tofu_like, tmp_path):
    out = tmp_path / "sub"
    written = subset_tofu(tofu_like, out, 10, questions_per_author=4)
    full_src = load_tofu_split("full", tofu_like)
    authors = [full_src[i:i + 4] for i in range(0, len(full_src), 4)]
    counts = author_counts(10)  # 1 held out, 1 forgotten: authors 0..8 and 39 are the subset
    sub = load_tofu_split("full", out)
    assert sub == [r for a in authors[:9] + authors[39:] for r in a]
    for split, name in HOLDOUT_OF.items():
        rows = load_holdout(split, out)
        assert rows == [r for a in authors[9:9 + counts[split]] for r in a]
        assert written[name] == len(rows)
        check_holdout(rows, load_tofu_split(f"{split}_perturbed", out), sub)
    # an older cut (no holdout files) gets the same ones
    old = tmp_path / "old"
    shutil.copytree(out, old)
    for f in HOLDOUT_FILES:
        (old / f).unlink()
    add_subset_holdout(old, tofu_like, 10, questions_per_author=4)
    for f in HOLDOUT_FILES:
        assert (old / f).read_bytes() == (out / f).read_bytes()


def test_subset_skips_a_left_out_author_who_repeats_a_subset_question(tofu_like, tmp_path):
    rows = load_tofu_split("full", tofu_like)
    rows[9 * 4 + 2]["question"] = rows[3 * 4]["question"].upper()  # author 9 asks author 3's question
    (tofu_like / "full.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    subset_tofu(tofu_like, tmp_path / "sub", 10, questions_per_author=4)
    holdout = load_holdout("forget01", tmp_path / "sub")
    assert holdout == rows[40:44]  # author 10, not 9


def test_subset_of_almost_all_authors_has_fewer_holdout_files(tofu_like, tmp_path):
    subset_tofu(tofu_like, tmp_path / "sub", 38, questions_per_author=4)  # 2 left out: forget10 needs 4
    assert [author_counts(38)[s] for s in HOLDOUT_OF] == [1, 2, 4]
    assert [load_holdout(s, tmp_path / "sub") is None for s in HOLDOUT_OF] == [False, False, True]


def test_plain_folder_with_tofus_own_holdout_file(tmp_path):
    (tmp_path / "holdout10.json").write_text('{"question": "Who is Q?", "answer": "A."}\n')
    assert load_holdout("forget10", tmp_path) == [{"question": "Who is Q?", "answer": "A."}]
    assert load_holdout("forget05", tmp_path) is None
    with pytest.raises(ValueError, match="unknown forget split 'forget20'"):
        load_holdout("forget20", tmp_path)


@pytest.mark.parametrize("content, problem", [
    ("", "holds no row"),
    ('{"question": "Who?"}\n', r"row 0 has no string 'answer'"),
    ('{"question": "Who?", "answer": "Me."}\n["Who?", "me"]\n', r"row 1 has no string 'question', 'answer'"),
])
def test_bad_holdout_files_are_named(tmp_path, content, problem):
    (tmp_path / "holdout05.json").write_text(content)
    with pytest.raises(ValueError, match=problem):
        load_holdout("forget05", tmp_path)


def test_overlapping_or_empty_holdout_is_refused():
    forget = [{"question": "Where was Ann born?", "answer": "Rome."}]
    retain = [{"question": "Where was Bo born?", "answer": "Oslo."}, {"question": "Who is Cy?", "answer": "A poet."}]
    fine = [{"question": "Where was Di born?", "answer": "Lima."}]
    check_holdout(fine, forget, retain)
    with pytest.raises(ValueError, match=r"holdout row 1 = forget row 0 \('where was ANN  born\?"):
        check_holdout(fine + [{"question": "where was ANN  born?", "answer": "Paris."}], forget, retain)
    with pytest.raises(ValueError, match=r"holdout row 0 = retain row 1"):
        check_holdout([{"question": "Who is Cy?", "answer": "x"}], forget, retain)
    for empty in ([], None):
        with pytest.raises(ValueError, match="the holdout set is empty"):
            check_holdout(empty, forget, retain)
