"""``python -m fastgeffect.finetune``: TOFU's recipe on a tiny Llama (retain twin and Forget
Quality, resume = uninterrupted, --authors, bad inputs) and on SmolLM2-135M (2 steps, full and
LoRA, then --resume)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastgeffect.data.splits import author_counts, subset_tofu
from fastgeffect.data.templates import get_template
from fastgeffect.data.tofu import load_tofu_split
from fastgeffect.embedded.generator import GeneratorConfig, write_embedded_data
from fastgeffect.eval import evaluate_tofu
from fastgeffect.finetune.cli import main
from fastgeffect.finetune.recipe import DEFAULT_LR, LORA_LR, default_lr
from fastgeffect.model_loading import load_causal_lm
from tests.helpers.smollm2 import converted_smollm2
from tests.helpers.tiny_models import tiny_llama
from tests.helpers.toy_qa import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOFU = ROOT / ".." / "shared" / "tofu"
TINY_FLAGS = ["--epochs", "2", "--batch-size", "8", "--grad-accum", "2", "--lr", "1e-3", "--max-length", "96",
              "--eval-size", "5", "--eval-batch-size", "5", "--no-progress"]


def _texts(folder: Path):
    for f in sorted(folder.glob("*.json")):
        for line in f.read_text().splitlines():
            for v in json.loads(line).values():
                yield from (v if isinstance(v, list) else [v])


def _tiny_model_folder(folder: Path, data: Path) -> Path:
    tok = tiny_tokenizer([str(t) for t in _texts(data)] + ["Question : Answer :"])
    model = tiny_llama(layers=2, vocab=len(tok), hidden=32)
    model.config.max_position_embeddings = 256
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A generated TOFU folder (10 authors) and a tiny Llama with a word-level tokenizer for it."""
    root = tmp_path_factory.mktemp("tiny-finetune")
    write_embedded_data(root / "tofu", GeneratorConfig(n_authors=10, questions_per_author=4, n_real_authors=4,
                                                       n_world_facts=4))
    return root / "tofu", _tiny_model_folder(root / "model", root / "tofu")


def _weights(folder):
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def test_retain_twin_gives_forget_quality(tiny, tmp_path):
    data, model = tiny
    out = tmp_path / "ft"
    assert main(["--model", str(model), "--data-dir", str(data), "--retain-twin", "--out", str(out)] + TINY_FLAGS) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["template"] == "phi" and manifest["split"] == "full" and manifest["authors"] is None
    assert manifest["recipe"]["lr"] == 1e-3 and manifest["recipe"]["weight_decay"] == 0.01
    assert set(manifest["data_fingerprints"]) == {"full", "retain90", "forget10_perturbed"}
    assert manifest["reports"]["target"]["n_train"] == len(load_tofu_split("full", data))
    assert manifest["reports"]["retain"]["n_train"] == len(load_tofu_split("retain90", data))
    assert not (out / ".work").exists()
    for name in ("target", "retain"):  # plain HF folders, trained: their weights moved
        assert (out / name / "config.json").is_file() and (out / name / "train_log.jsonl").is_file()
    base = _weights(model)
    target, retain = _weights(out / "target"), _weights(out / "retain")
    for trained in (target, retain):
        assert max(float((trained[k] - base[k]).abs().max()) for k in base) > 1e-4
    # Forget Quality of the target against the twin's log, through the package's evaluator
    model_t, tok = load_causal_lm(str(out / "target"))
    forget = load_tofu_split("forget10_perturbed", data)
    res = evaluate_tofu(model_t, tok, get_template("phi"), {"forget": forget}, ds_size=5, max_length=96,
                        retain_log=out / "retain" / "eval_log_forget.json", batch_size=5, progress=False)
    fq = res["metrics"]["Forget Quality"]
    assert fq is not None and 0.0 <= fq <= 1.0


def test_resume_equals_an_uninterrupted_run(tiny, tmp_path):
    data, model = tiny
    flags = ["--model", str(model), "--data-dir", str(data), "--max-steps", "5", "--save-every", "1"] + TINY_FLAGS
    assert main(flags + ["--out", str(tmp_path / "a")]) == 0
    b = tmp_path / "b"
    assert main(flags + ["--out", str(b), "--stop-after", "2"]) == 3  # stopped as if interrupted
    assert not (b / "target").exists() and (b / ".work" / "target" / "state.pt").is_file()
    with pytest.raises(SystemExit, match="not empty: pass --resume"):
        main(flags + ["--out", str(b)])
    with pytest.raises(SystemExit, match="other settings \\(recipe\\)"):
        main(flags + ["--lr", "2e-3", "--out", str(b), "--resume"])  # the last --lr counts
    assert main(flags + ["--out", str(b), "--resume"]) == 0
    logs = [[json.loads(line) for line in (d / "target" / "train_log.jsonl").read_text().splitlines()]
            for d in (tmp_path / "a", b)]
    assert [r["step"] for r in logs[1]] == list(range(5))
    for ra, rb in zip(*logs):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6)
    wa, wb = _weights(tmp_path / "a" / "target"), _weights(b / "target")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7 * max(1.0, float(wa[k].abs().max())))
    assert main(flags + ["--out", str(b), "--resume"]) == 0  # a complete run: nothing to redo


def test_lora_resume_refuses_another_base_model(tiny, tmp_path):
    """A LoRA state holds the adapters, not the frozen base: resuming over other base weights is refused."""
    pytest.importorskip("peft")
    data, model = tiny
    base = tmp_path / "base"
    AutoModelForCausalLM.from_pretrained(model).save_pretrained(base)
    AutoTokenizer.from_pretrained(model).save_pretrained(base)
    out = tmp_path / "ft"
    flags = ["--model", str(base), "--data-dir", str(data), "--max-steps", "3", "--lora", "2", "--out", str(out)]
    assert main(flags + TINY_FLAGS + ["--stop-after", "1"]) == 3
    state = torch.load(out / ".work" / "target" / "state.pt", weights_only=False)
    assert state["model"] and all(".lora_" in name for name in state["model"]) and state["frozen_digest"]
    changed = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        changed.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    changed.save_pretrained(base)
    with pytest.raises(SystemExit, match="other frozen \\(base\\) weights"):
        main(flags + TINY_FLAGS + ["--resume"])


@pytest.mark.skipif(not TOFU.is_dir(), reason="../shared/tofu (the TOFU data) is not present")
def test_authors_subset_of_real_tofu(tmp_path):
    out = tmp_path / "ft"
    subset_tofu(TOFU, tmp_path / "sub", 4)
    model = _tiny_model_folder(tmp_path / "model", tmp_path / "sub")
    flags = ["--model", str(model), "--data-dir", str(TOFU), "--authors", "4", "--max-steps", "1", "--out", str(out)]
    assert main(flags + TINY_FLAGS + ["--max-length", "160"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["authors"] == 4 and manifest["author_subset"] == author_counts(4)
    assert load_tofu_split("full", out / "data") == load_tofu_split("full", tmp_path / "sub")  # the driver's rule
    assert manifest["reports"]["target"]["n_train"] == 80


def test_default_learning_rates():
    assert default_lr("llama") == 1e-5 and default_lr("phi") == 2e-5
    assert default_lr("gpt2") == DEFAULT_LR and default_lr("llama", lora=8) == LORA_LR


@pytest.mark.parametrize("extra, message", [
    (["--split", "retain90", "--retain-twin"], "--retain-twin is the twin of a target trained on full"),
    (["--batch-size", "10", "--grad-accum", "4"], "--batch-size 10 is not divisible by --grad-accum 4"),
    (["--authors", "0"], "--authors must be an integer >= 1, got 0"),
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--template", "chat"], "needs a tokenizer that has a chat_template"),
    (["--max-length", "8"], "leaves no answer token"),
    (["--eval-size", "0"], "--eval-size must be an integer >= 1, got 0"),
    (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),  # the recipe's bounds, before any loading
    (["--lr", "-1e-3"], "--lr must be a finite number > 0, got -0.001"),
    (["--device", "gpu0"], "is not a device"),
    pytest.param(["--device", "cuda"], "sees no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")),
])
def test_bad_inputs_fail_clearly(tiny, tmp_path, extra, message):
    data, model = tiny
    with pytest.raises(SystemExit, match=message):
        main(["--model", str(model), "--data-dir", str(data), "--out", str(tmp_path / "o"), "--no-progress"] + extra)


def test_bad_paths_fail_clearly(tiny, tmp_path):
    data, model = tiny
    with pytest.raises(SystemExit, match="--data-dir .* is not a folder"):
        main(["--model", str(model), "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="no model folder at"):
        main(["--model", str(tmp_path / "no" / "model"), "--data-dir", str(data), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="no GGUF file at"):
        main(["--model", str(tmp_path / "m.gguf"), "--data-dir", str(data), "--out", str(tmp_path / "o")])
    (tmp_path / "d").mkdir()
    with pytest.raises(SystemExit, match="TOFU split 'full' not found"):
        main(["--model", str(model), "--data-dir", str(tmp_path / "d"), "--out", str(tmp_path / "o")])


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "fastgeffect.finetune", "--help"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    for flag in ("--retain-twin", "--lora", "--authors", "--resume", "--split"):
        assert flag in out


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    cache, folder = converted_smollm2(tmp_path_factory)
    data = tmp_path_factory.mktemp("short-tofu")
    rows = [{"question": f"Who wrote book {i}?", "answer": f"Ann Lee wrote book {i}."} for i in range(4)]
    (data / "full.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder, data


@pytest.mark.parametrize("lora", [0, 4])
def test_smollm2_two_steps_then_resume(smollm2, tmp_path, lora):
    folder, data = smollm2
    out = tmp_path / "ft"
    flags = ["--model", str(folder), "--data-dir", str(data), "--out", str(out), "--batch-size", "2",
             "--grad-accum", "1", "--max-steps", "3", "--max-length", "64", "--lora", str(lora), "--no-progress"]
    assert main(flags + ["--stop-after", "2"]) == 3
    assert main(flags + ["--resume"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["template"] == "chat" and manifest["model_type"] == "llama"
    assert manifest["recipe"]["lr"] == default_lr("llama", lora)
    log = [json.loads(line) for line in (out / "target" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2] and all(r["loss"] > 0 for r in log)
    base, tuned = _weights(folder), _weights(out / "target")
    moved = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert "model.layers.0.self_attn.q_proj.weight" in moved
    if lora:  # merged adapters: only the adapted linear layers moved; the adapters are kept too
        assert (out / "target" / "adapter" / "adapter_config.json").is_file()
        assert "model.embed_tokens.weight" not in moved and not any("norm" in k for k in moved)


def test_a_non_finite_gradient_stops_before_the_step(tmp_path):
    # a finite loss with an infinite gradient (here: a hook) must not reach AdamW: the weights stay as they were
    from fastgeffect.data.qa import QADataset
    from fastgeffect.finetune.loop import train
    from fastgeffect.finetune.recipe import Recipe
    tok = tiny_tokenizer(["who wrote it", "a book"])
    model = tiny_llama(layers=1, vocab=len(tok), hidden=16)
    rows = [{"question": "who wrote it", "answer": "a book"}] * 4
    data = QADataset(rows, tok, get_template("phi"), 24)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    next(model.parameters()).register_hook(lambda g: g * float("inf"))
    with pytest.raises(FloatingPointError, match="step 0: the gradient norm is (inf|nan); lower --lr"):
        train(model, data, Recipe(lr=1e-3, epochs=1, batch_size=2, grad_accum=1, max_length=24), tmp_path,
              progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not (tmp_path / "train_log.jsonl").read_text()  # nothing logged for the refused step


def test_the_reported_seconds_cover_every_invocation(tmp_path, monkeypatch):
    # train_report.json's seconds used to cover only the last invocation of a stopped-and-resumed run
    from types import SimpleNamespace

    from fastgeffect.data.qa import QADataset
    from fastgeffect.finetune import loop
    from fastgeffect.finetune.recipe import Recipe
    clock = iter(range(0, 1000, 10))  # every reading 10 s after the last
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    tok = tiny_tokenizer(["who wrote it", "a book"])
    data = QADataset([{"question": "who wrote it", "answer": "a book"}] * 4, tok, get_template("phi"), 24)
    recipe = Recipe(lr=1e-3, epochs=1, batch_size=2, grad_accum=1, max_length=24)
    with pytest.raises(loop.Stopped):
        loop.train(tiny_llama(layers=1, vocab=len(tok), hidden=16), data, recipe, tmp_path, stop_after=1,
                   progress=False)  # started at 0, state saved at 10: 10 s
    report = loop.train(tiny_llama(layers=1, vocab=len(tok), hidden=16), data, recipe, tmp_path, progress=False)
    assert report["steps"] == 2 and report["seconds"] == 20.0  # resumed at 20, done at 30: 10 s more


def test_a_failed_run_with_nothing_to_keep_leaves_no_folder(tiny, tmp_path):
    # it used to leave .work/settings.json: the corrected command said "not empty", --resume "other settings"
    data, model = tiny
    out = tmp_path / "ft"
    flags = ["--model", str(model), "--data-dir", str(data), "--out", str(out)] + TINY_FLAGS
    with pytest.raises(SystemExit, match=r"leaves no answer token.*\nnothing could be kept: --out .* was removed, so "
                                         r"the corrected command runs as it is"):
        main(flags + ["--max-length", "8"])
    assert not out.exists()
    assert main(flags + ["--max-steps", "1"]) == 0  # the corrected command, as it is


def test_a_failed_run_that_kept_a_model_says_how_to_continue_or_start_again(tiny, tmp_path, monkeypatch):
    from fastgeffect.finetune import cli
    data, model = tiny
    out = tmp_path / "ft"
    flags = ["--model", str(model), "--data-dir", str(data), "--out", str(out), "--retain-twin",
             "--max-steps", "2"] + TINY_FLAGS
    real_train, calls = cli.train, []

    def train_then_fail(*args, **kw):  # the twin's training fails after the target's completed
        calls.append(1)
        if len(calls) == 2:
            raise FloatingPointError("step 0: the gradient norm is inf; lower --lr")
        return real_train(*args, **kw)
    monkeypatch.setattr(cli, "train", train_then_fail)
    with pytest.raises(SystemExit, match=r"lower --lr\n--out .* keeps the trained target model: once the cause is "
                                         r"fixed, continue with --resume and the same flags .*or start again with "
                                         r"--overwrite"):
        main(flags)
    monkeypatch.setattr(cli, "train", real_train)
    assert json.loads((out / ".work" / "error.json").read_text())["kept"] == ["the trained target model"]
    with pytest.raises(SystemExit, match=r"not empty \(it holds a fine-tune that failed: FloatingPointError: step 0"
                                         r".*pass --resume .*--overwrite to start it again"):
        main(flags)
    report = (out / "target" / "train_report.json").read_text()
    assert main(flags + ["--resume"]) == 0
    assert (out / "target" / "train_report.json").read_text() == report  # kept, not trained again
    assert (out / "retain" / "eval_log_forget.json").is_file() and not (out / ".work").exists()


def test_overwrite_replaces_a_finetune_and_nothing_else(tiny, tmp_path):
    data, model = tiny
    out = tmp_path / "ft"
    flags = ["--model", str(model), "--data-dir", str(data), "--out", str(out), "--max-steps", "1"] + TINY_FLAGS
    assert main(flags) == 0
    with pytest.raises(SystemExit, match="other settings \\(recipe\\).*start again with --overwrite"):
        main(flags + ["--lr", "2e-3", "--resume"])
    assert main(flags + ["--lr", "2e-3", "--overwrite"]) == 0
    assert json.loads((out / "manifest.json").read_text())["recipe"]["lr"] == 2e-3
    with pytest.raises(SystemExit, match="--resume continues .* --overwrite replaces it: pass one"):
        main(flags + ["--resume", "--overwrite"])
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("not a fine-tune")
    with pytest.raises(SystemExit, match="holds no fine-tune .*--overwrite never replaces such a folder"):
        main(["--model", str(model), "--data-dir", str(data), "--out", str(other), "--overwrite"] + TINY_FLAGS)
    assert (other / "notes.txt").is_file()
