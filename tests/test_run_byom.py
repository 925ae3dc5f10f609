"""The driver on a model folder of the user's (here: the tiny embedded target saved as a plain HF
folder, with its retain twin): Forget Quality only against the model's own twin, ``--retain-model``,
``--authors`` with ``--model`` (checked against the fine-tune's manifest), ``--lora`` unlearning."""
import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.geffect_logs import assert_same_geffects
from helpers.tiny_models import qa_batch, tiny_llama
from transformers import AutoModelForCausalLM

from fastgeffect.data.tofu import load_tofu_split
from fastgeffect.driver import targets
from fastgeffect.driver.evaluation import published_log
from fastgeffect.driver.lora import add_lora, merged, reference_of
from fastgeffect.driver.presets import PRESETS, is_published_checkpoint
from fastgeffect.embedded import build_embedded
from fastgeffect.geffect import build_grouping, read_geffect_log
from fastgeffect.run import main

peft = pytest.importorskip("peft")
SHARED_TOFU = Path(__file__).resolve().parents[1] / ".." / "shared" / "tofu"
PUBLISHED_PHI_LOG = "phi_retain90_wd0.01_eval_log_forget.json"  # forget10's retain split


@pytest.fixture(scope="module")
def byom(module_embedded_cache, tmp_path_factory):
    """Plain model folders (weights + tokenizer) of the tiny target and its retain twin, their data."""
    emb = build_embedded(size="tiny")
    root = tmp_path_factory.mktemp("byom")
    for name, load in (("target", emb.load_target), ("retain", emb.load_retain)):
        load().save_pretrained(root / name)
        emb.tokenizer.save_pretrained(root / name)
    return argparse.Namespace(root=root, target=root / "target", retain=root / "retain", data=emb.data_dir,
                              max_length=emb.max_length)


def run(byom, out, *extra):
    return main(["--model", str(byom.target), "--data-dir", str(byom.data), "--max-length", str(byom.max_length),
                 "--out", str(out), "--no-progress", "--epochs", "1", "--batch-size", "4", "--eval-size", "4", *extra])


def test_lora_run_with_the_retain_twin_then_no_forget_quality_from_another_models_log(byom, tmp_path):
    out = tmp_path / "lora"
    assert run(byom, out, "--lora", "4", "--retain-model", str(byom.retain), "--method", "tnpo") == 0
    records = read_geffect_log(out / "geffect.jsonl")
    assert [r["step"] for r in records if r["risk"] == "unlearn"] == [0, 1]  # 5 forget rows, batches of 4
    for r in records:  # only adapters train, and they sit in the blocks: nothing in embed / lm
        assert r["groups"]["embed"] == 0.0 and r["groups"]["lm"] == 0.0
        assert all(r["groups"][g] != 0.0 for g in ("shallow", "middle", "deep"))
    before = json.loads((out / "metrics_before.json").read_text())
    assert 0.0 < before["Forget Quality"] <= 1.0
    twin_log = out / "retain_model" / "eval_log_forget.json"
    fingerprint = json.loads((out / "retain_model" / "eval_log_forget.json.fingerprint.json").read_text())
    assert fingerprint["inputs"]["model"]["path"] == str(byom.retain.resolve())
    summary = (out / "summary.md").read_text()
    assert "G-effects are over the adapter parameters" in summary
    assert f"Forget Quality against the retain twin {byom.retain}" in summary
    assert (out / "plots" / "geffect.png").exists()

    # the twin's log as if it were TOFU's published Phi-1.5 log: valid for these rows, but of another model
    data = tmp_path / "data"
    shutil.copytree(byom.data, data)
    (data / "retain_model_logs").mkdir()
    shutil.copyfile(twin_log, data / "retain_model_logs" / PUBLISHED_PHI_LOG)
    out = tmp_path / "phi"
    assert main(["--model", str(byom.target), "--preset", "phi", "--data-dir", str(data), "--max-length",
                 str(byom.max_length), "--out", str(out), "--no-progress", "--epochs", "1", "--eval-size", "4",
                 "--geffect-every", "0", "--pg-steps", "", "--no-uwc"]) == 0
    for name in ("metrics_before.json", "metrics_after.json"):
        assert "Forget Quality" not in json.loads((out / name).read_text())
    summary = (out / "summary.md").read_text()
    assert f"Forget Quality is unavailable: --model {byom.target} is not locuslab/tofu_ft_phi-1.5" in summary
    assert json.loads((out / "config.json").read_text())["forget_quality"].startswith("Forget Quality is unavailable")


def test_tnpo_with_the_adapters_disabled_reference_is_ga_at_step_0(byom, tmp_path):
    """Fresh adapters (B = 0) leave the model equal to θ_o = the model with adapters disabled, so
    TNPO's weights 2σ(β(logp − logp_ref)) are all 1: its step-0 G-effects are GA's."""
    common = ("--lora", "4", "--eval", "none", "--pg-steps", "", "--lr", "1e-3")
    # recomputed activations (as on CUDA by default) change no number, and the frozen embeddings still let
    # gradients reach the adapters
    assert run(byom, tmp_path / "tnpo", "--method", "tnpo", "--gradient-checkpointing", *common) == 0
    assert run(byom, tmp_path / "ga", "--method", "ga", *common) == 0
    tnpo, ga = (read_geffect_log(tmp_path / d / "geffect.jsonl") for d in ("tnpo", "ga"))
    assert_same_geffects([r for r in ga if r["step"] == 0], [r for r in tnpo if r["step"] == 0], 1e-5, groups=True)
    assert tnpo[0]["weights"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert all(r["total"] != 0.0 for r in tnpo)
    # step 1 starts from weights the step moved: TNPO's weights leave 1 and the runs part
    step1 = [(a["total"], b["total"]) for a, b in zip(ga, tnpo) if a["step"] == 1 and a["risk"] == "unlearn"]
    assert step1 and all(abs(a - b) > 1e-6 * abs(a) for a, b in step1)


@pytest.mark.parametrize("method,reg", [("npo", "kl"), ("rmu", "rr"), ("dpo", "gd")])
def test_objectives_reading_the_reference_model_run_with_lora(byom, tmp_path, method, reg):
    """KL and RR run θ_o itself (here: the adapters disabled), DPO reads cached reference log-probs of
    refusals, RMU steers hidden states: all unlearn through adapters. At step 0 the adapters are still
    zero, so the KL / RR terms against θ_o are zero."""
    out = tmp_path / method
    layer = ("--rmu-layer", "1") if method == "rmu" else ()  # the phi preset's block 9: the tiny model has 3
    assert run(byom, out, "--lora", "4", "--method", method, "--regularizer", reg, *layer, "--eval", "none",
               "--pg-steps", "") == 0
    records = read_geffect_log(out / "geffect.jsonl")
    assert len(records) == 4 and all(r["groups"]["shallow"] != 0.0 for r in records)
    first = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])
    if reg in ("kl", "rr"):
        assert abs(first["reg_loss"]) <= 1e-6 * max(1.0, abs(first["forget_loss"]))


def test_lora_run_resumes_exactly_and_saves_a_plain_model(byom, tmp_path):
    common = ("--lora", "4", "--method", "wga", "--epochs", "2", "--batch-size", "2", "--eval", "none",
              "--pg-steps", "")  # (the later --epochs / --batch-size win over run()'s)
    full, part = tmp_path / "full", tmp_path / "part"
    assert run(byom, full, *common, "--save-model", "--checkpoint-epochs") == 0
    assert run(byom, part, *common, "--stop-at-step", "3") == 0
    state = torch.load(part / "state.pt", weights_only=False)  # adapters only: the base comes from --model
    assert state["model"] and all(".lora_" in name for name in state["model"])
    assert run(byom, part, *common, "--resume") == 0
    assert_same_geffects(read_geffect_log(full / "geffect.jsonl"), read_geffect_log(part / "geffect.jsonl"), 1e-6)
    for folder in (full / "model", full / "checkpoints" / "epoch-1"):  # adapters merged: plain HF folders
        saved = AutoModelForCausalLM.from_pretrained(folder)
        assert type(saved).__name__ == "LlamaForCausalLM"
        assert not any("lora" in n for n in saved.state_dict())


def test_adapter_groups_follow_the_block_they_adapt():
    model = add_lora(tiny_llama(layers=4), 2)
    blocks = build_grouping(model, "blocks")
    name = "base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight"
    assert name in blocks.members("block.3")
    for i in range(4):
        members = blocks.members(f"block.{i}")
        assert members and all(f".layers.{i}." in n and ".lora_" in n for n in members)
    assert blocks.members("embed") == blocks.members("lm") == blocks.members("final_norm") == []
    paper = build_grouping(model, "paper")  # 4 blocks: thirds of 2, 1, 1
    assert {n.split(".layers.")[1].split(".")[0] for n in paper.members("shallow")} == {"0", "1"}
    assert name in paper.members("deep")


def test_reference_is_the_model_with_adapters_disabled_and_merging_keeps_the_outputs():
    base = tiny_llama(layers=2)
    batch = qa_batch(0)
    with torch.no_grad():
        original = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model = add_lora(base, 2)
    assert reference_of(tiny_llama()) is None
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # trained adapters
        adapted = model(input_ids=batch["input_ids"]).logits
    assert (adapted - original).abs().max() > 1e-2
    ref = reference_of(model)
    torch.testing.assert_close(ref.logits(batch), original)
    plain = merged(model, in_place=False)
    assert not hasattr(plain, "disable_adapter")
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=batch["input_ids"]).logits, adapted, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(input_ids=batch["input_ids"]).logits, adapted)  # the copy was merged


def test_published_retain_log_only_for_its_checkpoint(tmp_path):
    phi = PRESETS["phi"]
    assert is_published_checkpoint("locuslab/tofu_ft_phi-1.5", phi)
    assert is_published_checkpoint("/hf/hub/models--locuslab--tofu_ft_phi-1.5/snapshots/abc123", phi)
    for other in ("microsoft/phi-1_5", "/models/tofu_ft_phi-1.5", "locuslab/tofu_ft_llama2-7b", None):
        assert not is_published_checkpoint(other, phi)
    assert not is_published_checkpoint("locuslab/tofu_ft_phi-1.5", PRESETS["llama"])
    (tmp_path / "retain_model_logs").mkdir()
    (tmp_path / "retain_model_logs" / PUBLISHED_PHI_LOG).write_text("{}")

    def args(model, authors=None):
        return argparse.Namespace(model=model, authors=authors, split="forget10")
    path, why = published_log(args("locuslab/tofu_ft_phi-1.5"), phi, str(tmp_path))
    assert path == tmp_path / "retain_model_logs" / PUBLISHED_PHI_LOG and "tofu_ft_phi-1.5" in why
    assert published_log(args("HuggingFaceTB/SmolLM2-135M"), phi, str(tmp_path))[0] is None
    path, why = published_log(args("locuslab/tofu_ft_phi-1.5", authors=10), phi, str(tmp_path))
    assert path is None and "--authors 10 subset" in why
    path, why = published_log(args("locuslab/tofu_ft_phi-1.5"), phi, str(tmp_path / "elsewhere"))
    assert path is None and PUBLISHED_PHI_LOG in why


def test_a_twin_with_another_tokenizer_is_refused(monkeypatch):
    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

        def __len__(self):
            return len(self.vocab)
    monkeypatch.setattr(targets, "load_model", lambda spec, dtype: ("twin", Tok({"a": 0, "b": 1})))
    assert targets.load_twin("twin", torch.float32, Tok({"a": 0, "b": 1})) == "twin"
    with pytest.raises(SystemExit, match="--retain-model other has another tokenizer than --model"):
        targets.load_twin("other", torch.float32, Tok({"a": 0, "c": 1}))


def test_bad_input_is_named(byom, tmp_path, capsys):
    for argv, message in (
            (["--retain-model", str(byom.retain)], "--retain-model needs --model"),
            (["--model", str(byom.target), "--retain-model", str(byom.retain), "--retain-log", "x.json"],
             "--retain-model and --retain-log both give"),
            (["--lora", "0"], "--lora must be an integer >= 1"),
            (["--model", str(byom.target), "--lora", "4", "--fsdp2"], "--lora with --fsdp2 is not supported"),
            (["--model", str(byom.target), "--retain-model", " "], "--retain-model is empty")):
        with pytest.raises(SystemExit):
            main([*argv, "--out", str(tmp_path / "x")])
        assert message in capsys.readouterr().err
    (tmp_path / "no-model").mkdir()
    model, data = ["--model", str(byom.target)], ["--data-dir", str(byom.data)]
    for argv, message in (
            ([*model, *data, "--retain-model", str(tmp_path / "missing")], "--retain-model .*missing: no such folder"),
            ([*model, *data, "--retain-model", str(tmp_path / "no-model")],
             "--retain-model .*no-model is a folder without config.json"),
            ([*model, "--authors", "4"], "--authors needs --data-dir")):
        with pytest.raises(SystemExit, match=message):
            main([*argv, "--out", str(tmp_path / "y")])
    assert not (tmp_path / "y").exists()  # refused before the folder is claimed


@pytest.mark.skipif(not (SHARED_TOFU / "full.json").exists(), reason="../shared/tofu is not present")
def test_authors_with_model_and_its_manifest(byom, tmp_path):
    ft = tmp_path / "ft"
    shutil.copytree(byom.target, ft / "target")

    def on(data):
        return ["--model", str(ft / "target"), "--data-dir", str(data), "--max-length", "64", "--eval", "none",
                "--epochs", "1", "--pg-steps", "", "--no-progress"]
    common = on(SHARED_TOFU)
    # as finetune --out ft --authors 4 writes it (with the subset in ft/data)
    (ft / "manifest.json").write_text(json.dumps({"model": "tiny", "authors": 4, "data": str(ft / "data")}))
    with pytest.raises(SystemExit, match=r"fine-tuned on --authors 4 \(.*manifest.json\), but this run has "
                                         "--authors 5: pass --authors 4 with the TOFU folder, or --data-dir "
                                         ".*ft/data without --authors"):
        main([*common, "--authors", "5", "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match=r"but this run has no --authors \(all of TOFU\)"):
        main([*common, "--out", str(tmp_path / "b")])
    other = tmp_path / "other-ft"  # a twin from another fine-tune
    shutil.copytree(byom.retain, other / "retain")
    (other / "manifest.json").write_text(json.dumps({"authors": 3}))
    with pytest.raises(SystemExit, match=r"--retain-model .*retain was fine-tuned on --authors 3"):
        main([*common, "--retain-model", str(other / "retain"), "--authors", "4", "--out", str(tmp_path / "b")])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    out = tmp_path / "c"
    assert main([*common, "--authors", "4", "--lora", "2", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    data_dir = Path(cfg["setup"]["data_dir"])
    assert len(load_tofu_split("full", data_dir)) == 4 * 20
    assert load_tofu_split("forget10", data_dir) == load_tofu_split("full", SHARED_TOFU)[-20:]  # TOFU's last author
    assert len(read_geffect_log(out / "geffect.jsonl")) == 4  # 20 forget rows: two steps of 16
    # the fine-tune's own subset folder is that subset: no --authors needed with it
    shutil.copytree(data_dir, ft / "data")
    assert main([*on(ft / "data"), "--geffect-every", "0", "--out", str(tmp_path / "d")]) == 0
    (ft / "manifest.json").write_text(json.dumps({"authors": None}))  # fine-tuned on all of TOFU
    with pytest.raises(SystemExit, match=r"fine-tuned on all of TOFU .* has --authors 4: leave --authors out"):
        main([*common, "--authors", "4", "--out", str(tmp_path / "e")])


def test_ps_protocol_defaults_to_clean_for_a_chat_model(byom, tmp_path):
    """The paper's PS prompt (### Question: … ### Answer:) is not the format a chat model was fine-tuned
    in: without --ps-protocol such a model gets the clean protocol, any other the preset's."""
    from transformers import AutoTokenizer

    def default(model, template=None, given=None):
        return targets.default_ps_protocol(argparse.Namespace(ps_protocol=given, model=model, template=template),
                                           PRESETS["phi"])

    assert default(str(byom.target)) == "paper"  # no chat template: TOFU's phi format
    assert default(None) == PRESETS["phi"].ps_protocol
    chat = tmp_path / "chat"
    shutil.copytree(byom.target, chat)
    tokenizer = AutoTokenizer.from_pretrained(chat)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tokenizer.save_pretrained(chat)
    assert default(str(chat)) == "clean"
    assert default(str(chat), template="phi") == "paper"  # --template phi: the paper's format fits
    assert default(str(chat), given="uwc-linear") == "uwc-linear"  # --ps-protocol always wins
    with pytest.raises(SystemExit, match="--model"):
        default(str(tmp_path / "missing"))


def test_resume_over_a_replaced_model_folder_is_refused_before_set_up(byom, tmp_path):
    # it used to go on with the new weights as θ_o (only "recomputing ref_logprobs" was printed)
    model = tmp_path / "model"
    shutil.copytree(byom.target, model)
    out = tmp_path / "run"
    flags = ["--model", str(model), "--data-dir", str(byom.data), "--max-length", str(byom.max_length),
             "--out", str(out), "--no-progress", "--epochs", "1", "--batch-size", "4", "--eval", "none"]
    assert main(flags + ["--stop-at-step", "1"]) == 0
    assert json.loads((out / "config.json").read_text())["sources"]["model"]["path"] == str(model.resolve())
    other = AutoModelForCausalLM.from_pretrained(byom.retain)  # another model's weights in the same folder
    other.save_pretrained(model)
    kept = {name: (out / name).read_bytes() for name in ("state.pt", "ref_logprobs_forget.pt", "config.json")}
    with pytest.raises(SystemExit, match="--resume: --model changed since .* the saved state was trained from the "
                                         "old weights"):
        main(flags + ["--resume"])
    assert {name: (out / name).read_bytes() for name in kept} == kept  # refused before anything was recomputed


def _fine_tune_folder(root: Path, **settings) -> Path:
    """DIR/target and DIR/retain with a fine-tune's manifest.json (as python -m fastgeffect.finetune writes)."""
    for name in ("target", "retain"):
        (root / name).mkdir(parents=True)
    manifest = {"authors": None, "split": "full", "forget_split": "forget10", "retain_twin": True,
                "model_fingerprint": "base", "template": "phi", "recipe": {"lr": 1e-5}, "dtype": "float32",
                "outputs": {"target": str((root / "target").resolve()), "retain": str((root / "retain").resolve())},
                **settings}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_a_retain_twin_that_does_not_match_is_refused(tmp_path):
    # only the author list used to be compared: these all computed a Forget Quality and exited 0
    from fastgeffect.driver.inputs import check_twin
    a = _fine_tune_folder(tmp_path / "a")
    check_twin(str(a / "target"), str(a / "retain"), "forget10")  # one fine-tune's target and twin
    with pytest.raises(SystemExit, match="is --model itself"):
        check_twin(str(a / "target"), str(a / "target"), "forget10")
    with pytest.raises(SystemExit, match="is not the retain twin its fine-tune made"):
        check_twin(None, str(a / "target"), "forget10")
    with pytest.raises(SystemExit, match="learnt the retain split of forget10, not of --split forget05"):
        check_twin(str(a / "target"), str(a / "retain"), "forget05")
    b = _fine_tune_folder(tmp_path / "b", recipe={"lr": 2e-5})
    with pytest.raises(SystemExit, match="was fine-tuned with other recipe than --model"):
        check_twin(str(a / "target"), str(b / "retain"), "forget10")
    c = _fine_tune_folder(tmp_path / "c", split="retain90")
    with pytest.raises(SystemExit, match="was fine-tuned on retain90, not on full TOFU"):
        check_twin(str(c / "target"), str(a / "retain"), "forget10")
    check_twin("org/name", str(a / "retain"), "forget10")  # a hub target: only the twin's own manifest tells
