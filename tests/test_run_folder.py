"""The run folder and the checks before it is claimed: locking, the marker --overwrite requires, resume
refusals, flag and input validation that writes nothing, the default folder name, and the state
write's failure message. No training here (tests/test_run.py runs the driver end to end)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastgeffect.driver.cli import build_parser, default_out, parse_args
from fastgeffect.driver.run_folder import LOCK, MARKER, RunFolder
from fastgeffect.run import main
from fastgeffect.training.backend import PlainBackend, StateNotSaved, write_atomic
from fastgeffect.unlearn import UnlearnConfig

ROOT = Path(__file__).resolve().parents[1]
HOLD_LOCK = ("import sys\nfrom fastgeffect.driver.run_folder import RunFolder\nf = RunFolder(sys.argv[1])\n"
             "f.prepare(resume=False, overwrite=False, settings={}, resume_keys=())\nprint('locked', flush=True)\n"
             "sys.stdin.read()\n")


def run(out, *extra):
    return main(["--size", "tiny", "--eval", "none", "--no-progress", "--out", str(out), *extra])


def claim(path, **kw):
    folder = RunFolder(path)
    folder.prepare(**{"resume": False, "overwrite": False, "settings": {}, "resume_keys": (), **kw})
    return folder


def test_a_second_run_into_a_locked_folder_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=rf"{out} is in use by another run \(pid {holder.pid}, lock"):
            run(out)
        with pytest.raises(SystemExit, match="in use by another run"):
            claim(out, overwrite=True)  # not even --overwrite takes a held folder
        assert sorted(p.name for p in out.iterdir()) == sorted([LOCK, MARKER])  # nothing written by the refused runs
    finally:
        holder.kill()
        holder.wait()
    claim(out).release()  # the kernel dropped the dead holder's lock: its lock file is no obstacle


def test_the_lock_is_held_until_released(tmp_path):
    first = claim(tmp_path / "run")
    with pytest.raises(SystemExit, match="in use by another run"):
        claim(tmp_path / "run")  # another open file, even in the same process
    first.release()
    claim(tmp_path / "run").release()


def test_overwrite_deletes_only_fastgeffect_runs(tmp_path):
    model = tmp_path / "hf-model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(b"weights")
    for extra in (("--overwrite",), ("--resume",), ()):
        with pytest.raises(SystemExit, match=rf"{model} has a config.json but is not a fastgeffect run folder"):
            run(model, *extra)
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]  # untouched
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("x")
    with pytest.raises(SystemExit, match=rf"{other} is not empty \(todo.txt\) and not a fastgeffect run folder"):
        run(other, "--overwrite")
    assert [p.name for p in other.iterdir()] == ["todo.txt"]


def test_resume_of_a_missing_folder_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="does not exist, there is no run to continue"):
        run(tmp_path / "missing", "--resume")
    assert not (tmp_path / "missing").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="has no config.json"):
        run(tmp_path / "empty", "--resume")
    assert list((tmp_path / "empty").iterdir()) == []  # left as found: no lock file


def test_resume_of_a_torn_config_is_named(tmp_path):
    claim(tmp_path / "run").release()
    (tmp_path / "run" / "config.json").write_text('{"method": ')
    with pytest.raises(SystemExit, match=r"config.json is not valid JSON .*--overwrite"):
        claim(tmp_path / "run", resume=True, resume_keys=("method",))


def test_overwrite_keeps_the_lock_and_restores_the_marker(tmp_path):
    folder = claim(tmp_path / "run")
    folder.write_config({"method": "ga"})
    (folder / "geffect.jsonl").write_text("{}\n")
    folder.prepare(resume=False, overwrite=True, settings={}, resume_keys=())
    assert sorted(p.name for p in folder.path.iterdir()) == sorted([LOCK, MARKER])
    folder.release()


def test_config_is_completed_once(tmp_path):
    folder = claim(tmp_path / "run")
    folder.write_config({"method": "ga"})
    folder.complete_config({"max_length": 64, "dtype": "float32"})
    folder.complete_config({"max_length": 128})  # a resumed run keeps the first run's
    assert json.loads(folder.config_path.read_text()) == {"method": "ga", "max_length": 64, "dtype": "float32"}
    with pytest.raises(SystemExit, match=r"other resolved settings \{'dtype': \('float32', 'bfloat16'\)\}"):
        folder.complete_config({"dtype": "bfloat16"}, must_agree=("dtype",))  # resumed on other hardware
    folder.write_error("boom", None, folder / "state.pt")
    folder.clear_error()
    assert not (folder / "error.json").exists()
    folder.release()


BAD_FLAGS = [
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--lr", "-1e-3"], "--lr must be a finite number > 0, got -0.001"),
    (["--lr", "0"], "--lr must be"),
    (["--beta", "0"], "--beta must be a finite number > 0"),
    (["--alpha", "nan"], "--alpha must be"),
    (["--delta", "inf"], "--delta must be a finite number"),
    (["--lam", "-1"], "--lam must be"),
    (["--weight-decay", "-0.1"], "--weight-decay must be"),
    (["--warmup-epochs", "-inf"], "--warmup-epochs must be"),
    (["--max-grad-norm", "-1"], "--max-grad-norm must be a finite number >= 0 (0: no clipping)"),
    (["--seed", "-1"], "--seed must be an integer in [0, 2^32), got -1"),
    (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    (["--batch-size", "-4"], "--batch-size must be an integer >= 1, got -4"),
    (["--grad-accum", "3"], "--batch-size 16 is not divisible by --grad-accum 3"),
    (["--geffect-batch", "0"], "--geffect-batch must be"),
    (["--eval-size", "-1"], "--eval-size must be an integer >= 1, got -1"),
    (["--eval-size", "0"], "--eval-size must be an integer >= 1, got 0"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be"),
    (["--pg-steps", "a"], "--pg-steps must be comma-separated integers"),
    (["--pg-steps", "0,-2"], "--pg-steps: steps are >= 0, or -1"),
    (["--stop-at-step", "-1"], "--stop-at-step must be"),
    (["--model", ""], "--model is empty"),
    (["--out", " "], "--out is empty"),
    (["--device", "tpu"], "--device 'tpu'"),
    (["--device", "cuda:99"], "--device cuda:99"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flag_values_are_usage_errors_that_write_nothing(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        run(out, *flags)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(tmp_path / "run", "--device", "cuda")
    assert "--device cuda: CUDA is not available here" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_max_grad_norm_zero_is_accepted():
    assert parse_args(["--max-grad-norm", "0"]).max_grad_norm == 0.0
    with pytest.raises(ValueError, match="max_grad_norm must be a finite number >= 0"):
        UnlearnConfig(max_grad_norm=-1.0).check()
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        UnlearnConfig(lr=float("nan")).check()


def test_max_grad_norm_zero_does_not_clip():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    backend = PlainBackend(lin, torch.optim.SGD(lin.parameters(), lr=0.0), list(lin.parameters()))
    (lin(torch.randn(8, 4)) * 100).sum().backward()
    grads = [p.grad.clone() for p in lin.parameters()]
    norm = backend.clip_and_step(0.0)
    assert norm == pytest.approx(float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))))
    assert norm > 1.0
    for p, g in zip(lin.parameters(), grads):
        assert torch.equal(p.grad, g)  # no clipping (a threshold of 0 used to zero the gradient)


def test_bad_inputs_are_named_before_the_folder_is_claimed(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"--model \./no/such/model: no such folder"):
        main(["--model", "./no/such/model", "--out", str(out)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="is a folder without config.json, not a Hugging Face model folder"):
        main(["--model", str(tmp_path / "empty"), "--out", str(out)])
    with pytest.raises(SystemExit, match=r"--retain-log .*missing.json: no such file"):
        run(out, "--retain-log", str(tmp_path / "missing.json"))
    (tmp_path / "torn.json").write_text('{"avg_gt_loss": ')
    with pytest.raises(SystemExit, match=r"--retain-log .*torn.json is not a TOFU forget log"):
        run(out, "--retain-log", str(tmp_path / "torn.json"))
    (tmp_path / "other.json").write_text('{"avg_gt_loss": {"0": 1.0}}')
    with pytest.raises(SystemExit, match=r"other.json has no avg_paraphrased_loss, average_perturb_loss"):
        run(out, "--retain-log", str(tmp_path / "other.json"))
    assert not out.exists()


def test_default_out_names_every_setting_that_differs():
    ap = build_parser()
    defaults = ap.parse_args([])

    def out(*flags):
        return default_out(ap.parse_args(list(flags)), defaults)
    assert out() == Path("runs/tnpo-none-forget10-seed0")
    assert out("--method", "npo", "--seed", "3") == Path("runs/npo-none-forget10-seed3")
    a, b = out("--method", "wga", "--alpha", "1"), out("--method", "wga", "--alpha", "2")
    assert a != b and a.name.startswith("wga-none-forget10-seed0-") and len(a.name.split("-")[-1]) == 8
    assert out("--max-grad-norm", "0") != out() and out("--eval-size", "3") != out()
    # what may change on resume does not move the folder
    assert out("--stop-at-step", "2", "--no-progress", "--save-every", "1", "--save-model") == out()
    assert out("--resume") == out()


def test_a_failed_state_write_names_the_path_and_the_resume_hint(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    write_atomic(path, {"step": 1})

    def full_disk(obj, f, *a, **k):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(StateNotSaved, match=rf"could not write the resumable state {path} .*enforce fail.*"
                                            rf"--resume --out {tmp_path}"):
        write_atomic(path, {"step": 2})
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"step": 1}  # the previous state is intact
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # the temporary is removed


def _half_frozen(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
    model[0].requires_grad_(False)  # the "base": frozen, as under LoRA
    params = [p for p in model.parameters() if p.requires_grad]
    return model, PlainBackend(model, torch.optim.AdamW(params, lr=0.1), params)


def test_state_leaves_out_frozen_weights_and_refuses_other_ones(tmp_path):
    model, backend = _half_frozen(0)
    model(torch.randn(4, 3)).square().sum().backward()
    backend.clip_and_step(1.0)
    path = tmp_path / "state.pt"
    backend.save(path, {"step": 1})
    saved = torch.load(path, weights_only=False)
    assert sorted(saved["model"]) == ["1.bias", "1.weight"] and "frozen_digest" in saved

    same, same_backend = _half_frozen(0)  # the same base, other trainable weights: restored exactly
    same[1].weight.data.zero_()
    assert same_backend.load(path)["step"] == 1
    for a, b in zip(model.state_dict().values(), same.state_dict().values()):
        assert torch.equal(a, b)
    assert same_backend.optimizer.state_dict()["state"].keys() == backend.optimizer.state_dict()["state"].keys()

    other, other_backend = _half_frozen(0)
    with torch.no_grad():
        other[0].weight[0, 0] += 1e-6  # one base weight differs: never resumed silently
    with pytest.raises(RuntimeError, match="saved over other frozen \\(base\\) weights"):
        other_backend.load(path)
