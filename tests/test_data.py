"""Data pipeline: loader, encoding/collation, retain pool, seeded pairing, TOFU folder layout."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fastgeffect.data import (
    IGNORE_INDEX,
    ForgetRetainDataset,
    QADataset,
    author_counts,
    collate_pairs,
    collate_qa,
    get_template,
    load_tofu_split,
    load_unlearning_data,
    retain_order,
    retain_pool,
    subset_tofu,
)
from fastgeffect.data.tofu import SPLIT_FIELDS
from fastgeffect.embedded import GeneratorConfig, corpus_texts, train_tokenizer, write_embedded_data
from fastgeffect.losses import load_refusals

TOFU = Path(__file__).resolve().parents[1] / ".." / "shared" / "tofu"
needs_tofu = pytest.mark.skipif(not (TOFU / "full.json").is_file(), reason="../shared/tofu (TOFU data) is absent")
PHI = get_template("phi")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    write_embedded_data(d, GeneratorConfig(n_authors=20, questions_per_author=4, n_real_authors=5, n_world_facts=5))
    return d


@pytest.fixture(scope="module")
def tok(folder):
    return train_tokenizer(corpus_texts(folder))


def test_encoding_masks_question_and_padding_and_appends_eos(folder, tok):
    rows = load_tofu_split("forget10", folder)
    ds = QADataset(rows, tok, PHI, 64)
    eos = tok.eos_token_id
    for i, row in enumerate(rows):
        item = ds[i]
        assert item["index"] == i
        ids = tok(PHI.full(row["question"], row["answer"]))["input_ids"]
        n_prompt = len(tok(PHI.prompt(row["question"]))["input_ids"])
        n = len(ids)
        assert item["input_ids"][:n].tolist() == ids
        assert (item["input_ids"][n:] == eos).all()
        assert item["attention_mask"].tolist() == [1] * n + [0] * (64 - n)
        labels = item["labels"].tolist()
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt          # question masked
        assert labels[n_prompt:n] == ids[n_prompt:]                     # answer kept
        assert labels[n] == eos and set(labels[n + 1:]) <= {IGNORE_INDEX}  # EOS appended, padding masked
        # the answer tokens decode back to the answer
        assert tok.decode(ids[n_prompt:]).strip() == (PHI.answer_start + row["answer"]).strip()


def test_collate_trims_to_longest_and_keeps_every_label(folder, tok):
    ds = QADataset(load_tofu_split("full", folder), tok, PHI, 64)
    items = [ds[i] for i in (3, 0, 7, 11)]
    batch = collate_qa(items)
    lengths = [int(it["attention_mask"].sum()) for it in items]
    assert batch["input_ids"].shape == (4, max(lengths) + 1)  # + the label EOS of the longest item
    for b, it in enumerate(items):
        L = batch["labels"].shape[1]
        assert torch.equal(batch["labels"][b], it["labels"][:L])
        assert (it["labels"][L:] == IGNORE_INDEX).all()  # nothing valid was cut
        assert torch.equal(batch["input_ids"][b], it["input_ids"][:L])
    assert batch["index"].tolist() == [3, 0, 7, 11]
    with pytest.raises(ValueError, match="empty"):
        collate_qa([])


def test_qadataset_rejects_bad_rows(tok):
    with pytest.raises(ValueError, match="at least one"):
        QADataset([], tok, PHI, 32)
    with pytest.raises(ValueError, match="'answer'"):
        QADataset([{"question": "Who?"}], tok, PHI, 32)
    with pytest.raises(ValueError, match="2 answers"):
        QADataset([{"question": "Who?"}], tok, PHI, 32, answers=["a", "b"])
    with pytest.raises(ValueError, match="no answer token"):
        QADataset([{"question": "Who is it " * 20, "answer": "me"}], tok, PHI, 16)
    with pytest.raises(ValueError, match=r"the 'answer' field of rows \[1\] is not a string \(row 1: None\)"):
        QADataset([{"question": "Who?", "answer": "me"}, {"question": "Who?", "answer": None}], tok, PHI, 32)
    with pytest.raises(ValueError, match=r"the answers given of rows \[0\] is not a string"):
        QADataset([{"question": "Who?"}], tok, PHI, 32, answers=[3])


def test_retain_pool_excludes_heldout_rows(folder):
    retain = load_tofu_split("retain90", folder)
    held = load_tofu_split("retain_perturbed", folder)
    pool = retain_pool(retain, held)
    held_keys = {(r["question"], r["answer"]) for r in held}
    assert len(pool) == len(retain) - len(held)
    assert all((retain[i]["question"], retain[i]["answer"]) not in held_keys for i in pool)
    with pytest.raises(ValueError, match="empty"):
        retain_pool(held, held)


def test_retain_order_seeded_per_epoch_and_rank():
    a = retain_order(50, 17, seed=3, epoch=1, rank=0)
    assert np.array_equal(a, retain_order(50, 17, seed=3, epoch=1, rank=0))
    assert not np.array_equal(a, retain_order(50, 17, seed=3, epoch=1, rank=1))
    assert not np.array_equal(a, retain_order(50, 17, seed=3, epoch=2, rank=0))
    assert not np.array_equal(a, retain_order(50, 17, seed=4, epoch=1, rank=0))
    # each pass over the pool is a permutation: no retain sample twice before all were used
    assert sorted(a[:17]) == list(range(17)) and sorted(a[17:34]) == list(range(17))
    assert a.min() >= 0 and a.max() < 17 and len(a) == 50
    with pytest.raises(ValueError, match="at least one"):
        retain_order(5, 0, seed=0)


def test_unlearning_data_pairs_and_batch_format(folder, tok):
    data = load_unlearning_data(folder, "forget10", tok, PHI, 64, seed=1, idk=True)
    retain_rows = load_tofu_split("retain90", folder)
    held = {(r["question"], r["answer"]) for r in load_tofu_split("retain_perturbed", folder)}
    assert len(data.forget) == len(load_tofu_split("forget10", folder)) == len(data.pairs)
    assert len(data.heldout) == len(held)
    # retain items carry their row number in retain90, and none is a held-out row
    assert all((retain_rows[i]["question"], retain_rows[i]["answer"]) not in held for i in data.retain.indices)
    refusals = set(load_refusals())
    assert set(data.refusals) <= refusals and len(data.refusals) == len(data.forget)
    again = load_unlearning_data(folder, "forget10", tok, PHI, 64, seed=1, idk=True)
    assert again.refusals == data.refusals  # drawn reproducibly

    loader = DataLoader(data.pairs, batch_size=4, collate_fn=collate_pairs)
    batch = next(iter(loader))
    assert set(batch) == {"forget", "retain", "forget_idk"}
    for part in batch.values():
        assert set(part) == {"input_ids", "attention_mask", "labels", "index"}
        assert part["input_ids"].shape == part["labels"].shape == part["attention_mask"].shape
        assert part["input_ids"].shape[0] == 4
    assert torch.equal(batch["forget"]["index"], batch["forget_idk"]["index"])
    # the idk item is the forget question with a refusal answer
    f0, i0 = data.forget[0], data.pairs.forget_idk[0]
    n_prompt = int((f0["labels"] == IGNORE_INDEX).long().cumprod(0).sum())
    assert torch.equal(f0["input_ids"][:n_prompt], i0["input_ids"][:n_prompt])
    assert tok.decode(i0["labels"][i0["labels"] != IGNORE_INDEX][:-1]).strip() == "Answer: " + data.refusals[0]

    first = [data.pairs[i]["retain"]["index"] for i in range(len(data.pairs))]
    data.pairs.set_epoch(1)
    second = [data.pairs[i]["retain"]["index"] for i in range(len(data.pairs))]
    assert first != second
    data.pairs.set_epoch(0)
    assert [data.pairs[i]["retain"]["index"] for i in range(len(data.pairs))] == first
    other_rank = ForgetRetainDataset(data.forget, data.retain, seed=1, rank=1)
    assert [other_rank[i]["retain"]["index"] for i in range(len(other_rank))] != first
    assert "forget_idk" not in other_rank[0]
    with pytest.raises(ValueError, match="unknown forget split"):
        load_unlearning_data(folder, "forget20", tok, PHI, 64)


def test_author_counts_follow_tofu_proportions():
    assert author_counts(200) == {"forget01": 2, "forget05": 10, "forget10": 20, "heldout": 20}
    assert author_counts(40) == {"forget01": 1, "forget05": 2, "forget10": 4, "heldout": 4}
    with pytest.raises(ValueError, match="too few"):
        author_counts(2)


@needs_tofu
def test_loader_reads_shared_tofu():
    sizes = {"full": 4000, "forget01": 40, "forget05": 200, "forget10": 400, "retain90": 3600, "retain95": 3800,
             "retain99": 3960, "retain_perturbed": 400, "forget10_perturbed": 400, "real_authors_perturbed": 100,
             "world_facts_perturbed": 117}
    for split, n in sizes.items():
        rows = load_tofu_split(split, TOFU)
        assert len(rows) == n
        assert all(f in rows[0] for f in SPLIT_FIELDS[split])
    full = load_tofu_split("full", TOFU)
    assert load_tofu_split("forget10", TOFU) == full[-400:]
    with pytest.raises(ValueError, match="unknown TOFU split"):
        load_tofu_split("forget07", TOFU)


@needs_tofu
def test_retain_pool_on_real_tofu_matches_question_and_answer():
    pool = retain_pool(load_tofu_split("retain90", TOFU), load_tofu_split("retain_perturbed", TOFU))
    # TOFU's held-out rows are the first 400 of full; row 440 repeats held-out row 100's question
    assert pool == list(range(400, 3600))


@needs_tofu
def test_subset_of_all_authors_is_tofu_itself(tmp_path):
    subset_tofu(TOFU, tmp_path, 200)
    for split in SPLIT_FIELDS:
        assert load_tofu_split(split, tmp_path) == load_tofu_split(split, TOFU), split
    assert (tmp_path / "idontknow.jsonl").read_bytes() == (TOFU / "idontknow.jsonl").read_bytes()


@needs_tofu
def test_subset_of_few_authors(tmp_path):
    written = subset_tofu(TOFU, tmp_path, 30)  # 3 held out, forget10/05/01 = the last 3/2/1 authors
    full = load_tofu_split("full", TOFU)
    sub = load_tofu_split("full", tmp_path)
    assert written["full"] == len(sub) == 600
    assert sub[:540] == full[:540] and sub[-60:] == full[-60:]
    for split, n in (("forget10", 60), ("forget05", 40), ("forget01", 20)):
        assert load_tofu_split(split, tmp_path) == full[-n:]
        assert load_tofu_split(f"{split}_perturbed", tmp_path) == load_tofu_split("forget10_perturbed", TOFU)[-n:]
    assert load_tofu_split("retain90", tmp_path) == sub[:-60]
    assert load_tofu_split("retain99", tmp_path) == sub[:-20]
    assert load_tofu_split("retain_perturbed", tmp_path) == load_tofu_split("retain_perturbed", TOFU)[:60]
    assert load_tofu_split("world_facts_perturbed", tmp_path) == load_tofu_split("world_facts_perturbed", TOFU)
    with pytest.raises(ValueError, match="--authors"):
        subset_tofu(TOFU, tmp_path, 201)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("row, problem", [
    ({"question": "Who?", "answer": None}, r"row 2 has 'answer' = None, expected a string \(question 'Who\?'\)"),
    ({"question": "Who?"}, "row 2 has no 'answer' field"),
    ({"question": "Who?", "answer": 3}, "row 2 has 'answer' = 3"),
    (["Who?", "me"], "row 2 is a list, not an object"),
])
def test_loader_names_the_bad_row(folder, tmp_path, row, problem):
    data = _copy(folder, tmp_path / "data")
    lines = (data / "forget10.json").read_text(encoding="utf-8").splitlines()
    lines[2] = json.dumps(row)
    (data / "forget10.json").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"TOFU split 'forget10' \({re.escape(str(data))}/forget10.json\): {problem}"):
        load_tofu_split("forget10", data)


def test_loader_checks_perturbed_answers_of_every_row(folder, tmp_path):
    data = _copy(folder, tmp_path / "data")
    rows = [json.loads(x) for x in (data / "forget10_perturbed.json").read_text().splitlines()]
    rows[3]["perturbed_answer"] = []
    (data / "forget10_perturbed.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"row 3 has 'perturbed_answer' = \[\], expected a non-empty list of strings"):
        load_tofu_split("forget10_perturbed", data)


def test_non_utf8_data_names_the_file(folder, tmp_path):
    data = _copy(folder, tmp_path / "data")
    (data / "retain90.json").write_bytes((data / "retain90.json").read_bytes().replace(b"a", b"\xe9", 1))
    with pytest.raises(ValueError, match=rf"{re.escape(str(data / 'retain90.json'))} is not UTF-8 text.*convert"):
        load_tofu_split("retain90", data)


def test_subset_of_a_truncated_perturbed_file_names_that_file(folder, tmp_path):
    """A forget10_perturbed.json cut short was reported as 'a forget01 row lacks ...'."""
    src = _copy(folder, tmp_path / "src")
    lines = (src / "forget10_perturbed.json").read_text().splitlines(keepends=True)
    (src / "forget10_perturbed.json").write_text("".join(lines[:-1]))  # the last author's last row is gone
    with pytest.raises(ValueError, match=rf"{re.escape(str(src / 'forget10_perturbed.json'))} has no row for row 79 "
                                         "of full.json .*truncated"):
        subset_tofu(src, tmp_path / "out", 10, questions_per_author=4)
    subset_tofu(folder, tmp_path / "ok", 10, questions_per_author=4)
    assert load_tofu_split("forget10", tmp_path / "ok") == load_tofu_split("full", folder)[-4:]
