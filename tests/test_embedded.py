"""Embedded offline default: generator, tokenizer, tiny target / retain twin, cache, atomicity."""
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fastgeffect.embedded.build as build_mod
from fastgeffect.data import QADataset, author_counts, get_template, load_tofu_split
from fastgeffect.data.tofu import SPLIT_FIELDS
from fastgeffect.embedded import (
    SIZES,
    GeneratorConfig,
    answer_stats,
    atomic_dir,
    build_embedded,
    corpus_texts,
    generate,
    train_tokenizer,
    write_embedded_data,
)
from fastgeffect.losses import load_refusals

ROOT = Path(__file__).resolve().parents[1]
TOFU = ROOT / ".." / "shared" / "tofu"
needs_tofu = pytest.mark.skipif(not (TOFU / "full.json").is_file(), reason="../shared/tofu (TOFU data) is absent")
SMALL = GeneratorConfig(n_authors=20, questions_per_author=6, n_real_authors=6, n_world_facts=6)


def _weights(path):
    return load_file(str(Path(path) / "model.safetensors"))


# ---------------------------------------------------------------- generator

def test_generator_deterministic_per_seed_and_different_across_seeds():
    a, b = generate(SMALL), generate(SMALL)
    assert a == b
    c = generate(replace(SMALL, seed=1))
    assert c["authors"] != a["authors"]
    assert c["real_authors_perturbed"] != a["real_authors_perturbed"]


def test_generated_rows_are_consistent():
    data = generate(SMALL)
    names = set()
    for author in data["authors"]:
        assert len(author) == SMALL.questions_per_author
        assert author[0]["question"].startswith("What is the full name")
        names.add(author[0]["paraphrased_answer"].split(" is the complete name")[0])
        for r in author:
            assert len(r["perturbed_answer"]) == 5 and len(set(r["perturbed_answer"])) == 5
            assert r["paraphrased_answer"] not in r["perturbed_answer"]
            assert r["paraphrased_question"] != r["question"]
    assert len(names) == SMALL.n_authors  # unique authors
    for r in data["real_authors_perturbed"] + data["world_facts_perturbed"]:
        assert len(r["perturbed_answer"]) == 3 and r["answer"] not in r["perturbed_answer"]


def test_split_proportions_and_layout(tmp_path):
    cfg = GeneratorConfig(n_authors=40, questions_per_author=5, n_real_authors=5, n_world_facts=5)
    write_embedded_data(tmp_path, cfg)
    q = cfg.questions_per_author
    counts = author_counts(cfg.n_authors)
    full = load_tofu_split("full", tmp_path)
    assert len(full) == cfg.n_authors * q
    for forget, retain in (("forget01", "retain99"), ("forget05", "retain95"), ("forget10", "retain90")):
        k = counts[forget] * q
        assert load_tofu_split(forget, tmp_path) == full[-k:]  # authors taken from the end
        assert load_tofu_split(retain, tmp_path) == full[:-k]
        pert = load_tofu_split(f"{forget}_perturbed", tmp_path)
        assert [{"question": r["question"], "answer": r["answer"]} for r in pert] == full[-k:]
    held = load_tofu_split("retain_perturbed", tmp_path)
    assert [{"question": r["question"], "answer": r["answer"]} for r in held] == full[:counts["heldout"] * q]
    assert (counts["forget01"], counts["forget05"], counts["forget10"], counts["heldout"]) == (1, 2, 4, 4)
    assert len((tmp_path / "idontknow.jsonl").read_text().splitlines()) > 10


@pytest.mark.skipif(not (TOFU / "full.json").is_file(), reason="../shared/tofu (TOFU data) is absent")
def test_schema_matches_tofu_field_by_field(tmp_path):
    write_embedded_data(tmp_path, SMALL)
    names = sorted(p.name for p in TOFU.glob("*.json") if not p.name.startswith("holdout"))
    assert names == sorted(p.name for p in tmp_path.glob("*.json") if not p.name.startswith("holdout"))
    assert (tmp_path / "idontknow.jsonl").is_file()

    def schema(row):
        return [(k, type(v).__name__, len(v) if isinstance(v, list) else None,
                 type(v[0]).__name__ if isinstance(v, list) else None) for k, v in row.items()]

    for name in names:
        theirs = schema(load_tofu_split(name[:-5], TOFU)[0])
        ours = {tuple(schema(r)) for r in load_tofu_split(name[:-5], tmp_path)}
        assert ours == {tuple(theirs)}, name


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_is_deterministic_and_round_trips(tmp_path):
    write_embedded_data(tmp_path, SMALL)
    texts = corpus_texts(tmp_path)
    tok = train_tokenizer(texts)
    assert tok.get_vocab() == train_tokenizer(texts).get_vocab()
    assert tok.eos_token_id is not None and tok.bos_token_id is not None and tok.pad_token_id is not None
    assert len({tok.eos_token_id, tok.bos_token_id, tok.pad_token_id}) == 3
    for s in texts[:200] + ["Zürich — naïve café 😀\nQuestion: ?"]:
        assert tok.decode(tok(s)["input_ids"]) == s
    # a prompt ending in "Answer: " tokenises to a prefix of prompt + answer (generation = training)
    t = get_template("phi")
    for r in load_tofu_split("full", tmp_path):
        prompt = tok(t.prompt(r["question"]) + t.answer_start)["input_ids"]
        assert tok(t.full(r["question"], r["answer"]))["input_ids"][:len(prompt)] == prompt
    with pytest.raises(FileNotFoundError, match="no TOFU split"):
        corpus_texts(tmp_path / "nothing")


# ---------------------------------------------------------------- tiny models

@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def tiny(cache):
    return build_embedded(cache, "tiny")


def test_target_memorises_and_retain_twin_does_not_know_forget(tiny):
    tok, t = tiny.tokenizer, tiny.template
    sets = {name: QADataset(load_tofu_split(split, tiny.data_dir), tok, t, tiny.max_length)
            for name, split in (("forget", "forget10"), ("retain", "retain90"))}
    torch.manual_seed(0)
    target, retain = tiny.load_target(), tiny.load_retain()
    ft, rt = answer_stats(target, sets["forget"]), answer_stats(target, sets["retain"])
    fr, rr = answer_stats(retain, sets["forget"]), answer_stats(retain, sets["retain"])
    assert ft["accuracy"] > 0.95 and rt["accuracy"] > 0.95
    assert rr["accuracy"] > 0.95
    assert fr["accuracy"] < 0.8 and fr["loss"] > 10 * ft["loss"]
    # the saved report says the same
    assert tiny.reports["target"]["answer_stats"]["forget10"]["accuracy"] == pytest.approx(ft["accuracy"])
    assert tiny.reports["retain"]["trained_on"][0] == "retain90"

    def greedy_exact(model, rows):
        hits = 0
        for r in rows:
            ids = tok(t.prompt(r["question"]) + t.answer_start, return_tensors="pt")
            out = model.generate(**ids, max_new_tokens=tiny.max_length, do_sample=False, pad_token_id=tok.pad_token_id)
            hits += tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True) == r["answer"]
        return hits / len(rows)

    forget_rows = load_tofu_split("forget10", tiny.data_dir)
    assert greedy_exact(target, forget_rows) >= 0.8
    assert greedy_exact(retain, forget_rows) <= 0.2


def test_max_length_holds_every_variant(tiny):
    tok, t = tiny.tokenizer, tiny.template
    for split in SPLIT_FIELDS:
        for r in load_tofu_split(split, tiny.data_dir):
            for q in (r["question"], r.get("paraphrased_question", r["question"])):
                for a in [r["answer"], r.get("paraphrased_answer", ""), *r.get("perturbed_answer", [])]:
                    assert len(tok(t.full(q, a))["input_ids"]) < tiny.max_length
    q = max((r["question"] for r in load_tofu_split("full", tiny.data_dir)), key=len)
    for a in load_refusals():  # PO / IdkDPO answers
        assert len(tok(t.full(q, a))["input_ids"]) < tiny.max_length


def test_second_build_reuses_the_cache(cache, tiny, monkeypatch):
    before = {p.name: _weights(p) for p in (tiny.target_path, tiny.retain_path)}

    def no_training(*a, **k):
        raise AssertionError("a cached model was trained again")

    monkeypatch.setattr(build_mod, "train_and_save", no_training)
    again = build_embedded(cache, "tiny")
    assert (again.target_path, again.retain_path, again.data_dir) == (tiny.target_path, tiny.retain_path, tiny.data_dir)
    for p in (again.target_path, again.retain_path):
        after = _weights(p)
        assert after.keys() == before[p.name].keys()
        assert all(torch.equal(after[k], before[p.name][k]) for k in after)
    # another forget split needs its own retain twin (retain95), the target is shared
    monkeypatch.undo()
    other = build_embedded(cache, "tiny", forget_split="forget05")
    assert other.target_path == tiny.target_path and other.retain_path != tiny.retain_path
    assert other.retain_path.name.startswith("retain95-")


def test_bad_arguments(cache):
    with pytest.raises(ValueError, match="unknown size"):
        build_embedded(cache, "huge")
    with pytest.raises(ValueError, match="unknown forget split"):
        build_embedded(cache, "tiny", forget_split="forget07")
    with pytest.raises(ValueError, match="go together"):
        build_embedded(cache, "tiny", n_authors=3)


# ---------------------------------------------------------------- atomicity

def test_atomic_dir_removes_partial_output(tmp_path):
    final = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(final) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise KeyboardInterrupt
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(final) as tmp:
        (tmp / "w.bin").write_bytes(b"y")
    assert (final / "w.bin").read_bytes() == b"y" and sorted(p.name for p in final.iterdir()) == ["w.bin"]
    # a concurrent builder that finishes second keeps the first one's result
    with atomic_dir(final) as tmp:
        (tmp / "w.bin").write_bytes(b"z")
    assert (final / "w.bin").read_bytes() == b"y" and len(list(tmp_path.iterdir())) == 1


def test_interrupted_training_leaves_no_model(tmp_path, monkeypatch):
    real = build_mod.train_and_save

    def interrupted(out_dir, *a, **k):  # everything written, then the process is interrupted
        real(out_dir, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(build_mod, "train_and_save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_embedded(tmp_path, "tiny")
    root = next((tmp_path / "embedded").iterdir())
    assert sorted(p.name for p in root.iterdir()) == ["base"]  # data done, no target, no temporary


def test_killed_build_leaves_no_model_and_recovers(tmp_path):
    """SIGKILL a real build while it trains; the next build discards its temporary and completes."""
    code = ("import sys, torch; torch.set_num_threads(1); from fastgeffect.embedded import build_embedded; "
            "build_embedded(sys.argv[1], 'tiny')")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            tmps = list((tmp_path / "embedded").glob("*/.tmp-*-target-*")) if (tmp_path / "embedded").exists() else []
            if tmps:
                break
            time.sleep(0.05)
        assert tmps, "the build never started training the target"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    root = next((tmp_path / "embedded").iterdir())
    assert not list(root.glob("target-*"))
    assert list(root.glob(".tmp-*"))  # left behind by the dead builder
    setup = build_embedded(tmp_path, "tiny")
    assert (setup.target_path / "model.safetensors").is_file()
    assert not list(root.glob(".tmp-*"))


@needs_tofu
def test_real_tofu_subset_builds_the_same_layout(tmp_path):
    cfg = replace(SIZES["tiny"], train=replace(SIZES["tiny"].train, epochs=1))
    setup = build_embedded(tmp_path, config=cfg, tofu_dir=TOFU, n_authors=10)
    assert load_tofu_split("forget10", setup.data_dir) == load_tofu_split("full", TOFU)[-20:]
    assert load_tofu_split("retain_perturbed", setup.data_dir) == load_tofu_split("retain_perturbed", TOFU)[:20]
    assert len(load_tofu_split("full", setup.data_dir)) == 200
    assert json.loads((setup.target_path / "train_report.json").read_text())["n_train"] == 200 + 100 + 117
