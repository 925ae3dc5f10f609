"""``python -m fastgeffect.attacks`` on a tiny model saved to disk (the run in a subprocess; the
refusals in process): the files, the refusal to overwrite, bad input refused before anything is written."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastgeffect.attacks.cli import main
from fastgeffect.data.templates import get_template
from tests.helpers.toy_qa import memorise, tiny_llama, toy_qa_records, toy_tokenizer_for

ROOT = Path(__file__).resolve().parents[1]
TPL = get_template("phi")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    base = tmp_path_factory.mktemp("attacks_cli")
    recs = toy_qa_records(4)
    tok = toy_tokenizer_for(recs, TPL)
    model = tiny_llama(len(tok), tokenizer=tok, seed=0)
    memorise(model, tok, TPL, recs, steps=60)
    for name, m in (("model", model), ("twin", tiny_llama(len(tok), tokenizer=tok, seed=1))):
        m.save_pretrained(base / name)
        tok.save_pretrained(base / name)
    data = base / "tofu"
    data.mkdir()
    (data / "forget05.json").write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n"
                                                for r in recs))
    return base, recs


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "fastgeffect.attacks", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_writes_both_attacks_and_refuses_to_overwrite(saved, capsys):
    base, recs = saved
    out = base / "out"
    common = ["--model", base / "model", "--data-dir", base / "tofu", "--split", "forget05", "--template", "phi",
              "--steps", "0,1,3", "--lr", "1e-2", "--seed", "2", "--bits", "8,4", "--max-length", "64", "--out", out]
    r = _cli(*common, "--retain-model", base / "twin")
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "attacks.json").read_text())
    assert res["forget_rows"] == len(recs)
    assert [p["step"] for p in res["relearn"]["target"]] == [0, 1, 3] and len(res["relearn"]["twin"]) == 3
    assert res["relearn"]["seed"] == 2 and res["relearn"]["lr"] == 1e-2
    assert [(q["bits"], q["granularity"]) for q in res["quantize"]["rows"]] == [
        (None, "none"), (8, "per_channel"), (8, "group128"), (4, "per_channel"), (4, "group128")]
    assert (out / "attacks_relearn.png").is_file()
    assert "relearn k" in r.stdout and "quantize" in r.stdout
    before = (out / "attacks.json").read_bytes()
    assert main([str(a) for a in common]) == 2  # in process: a second interpreter would cost seconds
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "attacks.json").read_bytes() == before


@pytest.mark.parametrize("extra, msg", [(["--attacks", "relearn,prune"], "unknown attack 'prune'"),
                                        (["--bits", "3"], "bits must be one of"),
                                        (["--steps", "4,2"], "strictly increasing")])
def test_cli_bad_input(saved, capsys, extra, msg):
    base, _ = saved
    out = base / "bad"
    args = ["--model", base / "model", "--data-dir", base / "tofu", "--template", "phi", "--out", out, *extra]
    assert main([str(a) for a in args]) == 2
    assert msg in capsys.readouterr().err
    assert not out.exists()


def test_cli_attacks_the_uwc_mixture(saved, capsys):
    """--uwc-original/--uwc-alpha attack (1 − α)·θ_o + α·θ_u: the quantisation rows equal those of the
    mixture built by hand and saved; α = 1 is --model itself; attacks.json names the mixture."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastgeffect.attacks import run_attacks

    base, recs = saved
    common = ["--data-dir", base / "tofu", "--split", "forget05", "--template", "phi", "--attacks", "quantize",
              "--bits", "4", "--max-length", "64"]
    alpha = 0.3
    out = base / "uwc"
    assert main([str(a) for a in ["--model", base / "model", "--uwc-original", base / "twin", "--uwc-alpha", alpha,
                                  "--out", out, *common]]) == 0
    res = json.loads((out / "attacks.json").read_text())
    assert res["model"] == {"uwc": {"original": str(base / "twin"), "alpha": alpha}}

    unlearned = AutoModelForCausalLM.from_pretrained(base / "model")
    original = AutoModelForCausalLM.from_pretrained(base / "twin")
    with torch.no_grad():
        for p, o in zip(unlearned.parameters(), original.parameters()):
            p.copy_(((1 - alpha) * o.double() + alpha * p.double()).float())
    tok = AutoTokenizer.from_pretrained(base / "model")
    ref = run_attacks(unlearned, tok, TPL, recs, out_dir=base / "uwc_ref", attacks="quantize", bits=4, max_length=64)
    for got, want in zip(res["quantize"]["rows"], ref["quantize"]["rows"]):
        for m in res["metrics"]:
            assert got[m] == pytest.approx(want[m], abs=1e-4 * max(1.0, abs(want[m])))

    plain, at_one = base / "plain", base / "alpha1"
    assert main([str(a) for a in ["--model", base / "model", "--out", plain, *common]]) == 0
    assert main([str(a) for a in ["--model", base / "model", "--uwc-original", base / "twin", "--uwc-alpha", 1.0,
                                  "--out", at_one, *common]]) == 0
    rows = lambda d: json.loads((d / "attacks.json").read_text())["quantize"]["rows"]  # noqa: E731
    assert rows(plain) == rows(at_one)
    # the mixture is not the unlearned model: at α = 0.3 some number moved
    assert rows(plain) != res["quantize"]["rows"]


@pytest.mark.parametrize("extra, msg", [(["--uwc-alpha", "0.5"], "go together"),
                                        (["--uwc-original", "X"], "go together"),
                                        (["--uwc-original", "X", "--uwc-alpha", "1.5"], "must be in [0, 1]"),
                                        (["--uwc-original", "X", "--uwc-alpha", "nan"], "must be in [0, 1]")])
def test_cli_bad_mixture(saved, capsys, extra, msg):
    base, _ = saved
    out = base / "bad_mix"
    args = ["--model", base / "model", "--data-dir", base / "tofu", "--template", "phi", "--out", out, *extra]
    assert main([str(a) for a in args]) == 2
    assert msg in capsys.readouterr().err
    assert not out.exists()
