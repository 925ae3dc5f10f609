"""Data parallel (docs/design.md §4.2), 2 CPU processes on gloo: G-effects and trained parameters equal
those of one process on the same global batch, under DDP (through accelerate) and FSDP2."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers.geffect_logs import assert_same_geffects
from helpers.launch_logs import launch_failure
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fastgeffect.data.pairs import ForgetRetainDataset
from fastgeffect.data.qa import QADataset
from fastgeffect.data.templates import get_template
from fastgeffect.data.unlearning import UnlearningData
from fastgeffect.distributed import barrier, check_divisible, is_main, shutdown
from fastgeffect.embedded.tokenizer import TokenizerConfig, train_tokenizer
from fastgeffect.geffect import read_geffect_log
from fastgeffect.objectives import get_objective
from fastgeffect.training.backend import full_model_state
from fastgeffect.unlearn import UnlearnConfig, Unlearner

ROOT = Path(__file__).resolve().parents[1]
WORDS = "red blue green old young tall quiet bright dark warm cold river stone forest city".split()
N_FORGET, N_RETAIN, N_HELD = 9, 12, 6  # 9 forget samples, batch 4: the last step has a single sample


def _rows(n, off):
    g = torch.Generator().manual_seed(off)
    return [{"question": f"Who is writer {off + i}?",
             "answer": " ".join(WORDS[int(j)] for j in torch.randint(len(WORDS), (3 + (off + i) % 5,), generator=g))}
            for i in range(n)]


def _data(folder, seed=0):
    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    tpl = get_template("phi")
    forget, retain = QADataset(_rows(N_FORGET, 0), tok, tpl, 40), QADataset(_rows(N_RETAIN, 100), tok, tpl, 40)
    held = QADataset(_rows(N_HELD, 200), tok, tpl, 40)
    return UnlearningData(ForgetRetainDataset(forget, retain, seed=seed), forget, retain, held)


def _cfg(grad_accum, lr):
    return UnlearnConfig(epochs=1, batch_size=4, grad_accum=grad_accum, lr=lr, warmup_epochs=0.5,
                         geffect_every=1, geffect_batch=4, seed=3, pg_steps=(0, -1))


# fp32 runs take smaller steps: AdamW's first update is about lr·sign(g), so coordinates whose exact
# gradient is ~0 move by ±lr on fp32 rounding alone and the two trajectories drift apart
LR = {torch.float64: 1e-2, torch.float32: 1e-4}


def _model(folder, dtype=torch.float64):
    # fp64: the two routes then agree to rounding (~1e-12), so 1e-7 below proves the reduction exact
    # (in fp32 the different batch splits alone move G-effects by ~1e-5 relative); DeepSpeed keeps
    # fp32 master weights, so its comparison runs in fp32
    model = LlamaForCausalLM.from_pretrained(folder).to(dtype)
    model.config.use_cache = False
    return model


def _train(model, folder, out, grad_accum, accelerator=None):
    torch.manual_seed(0)
    lr = LR[next(model.parameters()).dtype]
    u = Unlearner(model, get_objective("ga", regularizer="gd"), _data(folder), _cfg(grad_accum, lr), out,
                  progress=False, accelerator=accelerator)
    u.run()
    final = full_model_state(u.model)  # a collective; the main process gets the tensors
    if is_main():
        torch.save(final, out / "final.pt")
    return u


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    texts = [r["question"] + " " + r["answer"] for r in _rows(40, 0) + _rows(40, 100) + _rows(40, 200)]
    tok = train_tokenizer(texts, TokenizerConfig(vocab_size=300))
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    single = tmp_path_factory.mktemp("single")
    torch.set_num_threads(1)
    _train(_model(folder), folder, single, grad_accum=1)
    return folder, single


@pytest.fixture(scope="module")
def single_fp32(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("single32")
    _train(_model(setup[0], torch.float32), setup[0], out, grad_accum=1)
    return out


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, folder, out, how, dtype, grad_accum):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    model = _model(folder, dtype)
    accelerator = None
    if how == "ddp":  # through accelerate, as `accelerate launch` does
        from accelerate import Accelerator
        accelerator = Accelerator(cpu=True)
    elif how == "deepspeed":  # ZeRO-3 through accelerate, as `accelerate launch --config_file
        from accelerate import Accelerator, DeepSpeedPlugin  # configs/accelerate/deepspeed_zero3.yaml` does

        accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(zero_stage=3, zero3_init_flag=False))
    else:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
        if how == "fsdp2":
            from fastgeffect.distributed import fully_shard_blocks
            fully_shard_blocks(model)
    try:
        if how == "bad":
            try:
                Unlearner(model, get_objective("ga"), _data(folder), UnlearnConfig(batch_size=3), out)
            except ValueError as e:
                (out / f"error{rank}.txt").write_text(str(e))
        else:
            u = _train(model, folder, out, grad_accum=grad_accum, accelerator=accelerator)
            assert u.strategy == how
            # the retain partners of this rank's samples at step 0, for the sampling test
            chunks = u.plan(0, 0).global_chunks
            u.data.pairs.set_epoch(0)
            mine = [i for c in chunks[rank * grad_accum:(rank + 1) * grad_accum] for i in c]
            (out / f"retain{rank}.json").write_text(json.dumps([u.data.pairs[i]["retain"]["index"] for i in mine]))
    except BaseException:
        shutdown()  # barrier first: a rank leaving while a peer still talks to it can die in C++ teardown
        raise
    # Done, every file closed: both ranks meet, then leave without the interpreter's teardown, where
    # DeepSpeed's and gloo's C++ threads occasionally abort ("terminate called without an active
    # exception", SIGABRT) after all the work is written.
    barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(setup, tmp_path, how, dtype=torch.float64, grad_accum=2):
    folder, _ = setup
    mp.spawn(_worker, args=(2, _free_port(), folder, tmp_path, how, dtype, grad_accum), nprocs=2, join=True)


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _close(a, b, rel=1e-7):
    """For values positive by construction (risks, gradient norms)."""
    return abs(a - b) <= rel * max(abs(a), abs(b))


def _compare(single, dist_out, rel=1e-7, param_rel=1e-7, pg=False):
    """G-effects (totals and groups, relative to the size of the step's groups), risks, losses
    (relative to the size of their two terms: GA and GD nearly cancel), gradient norms to ``rel``;
    each trained parameter tensor to ``param_rel`` in norm. ``pg``: PG-effects too (relative to the
    step's largest), for runs whose ranks' first micro-batches together are the one process's
    (``grad_accum`` 1)."""
    ra, rb = _records(single / "geffect.jsonl"), _records(dist_out / "geffect.jsonl")
    assert len(ra) == len(rb) == 6  # 3 steps (4, 4, 1 samples) x (unlearn, retain)
    assert_same_geffects(ra, rb, rel, groups=True)
    for a, b in zip(ra, rb):
        assert _close(a["risk_value"], b["risk_value"], rel), (a, b)
    la, lb = _records(single / "train_log.jsonl"), _records(dist_out / "train_log.jsonl")
    assert len(la) == len(lb) == 3
    for a, b in zip(la, lb):
        assert abs(a["loss"] - b["loss"]) <= rel * (abs(a["forget_loss"]) + abs(a["reg_loss"])), (a, b)
        assert _close(a["grad_norm"], b["grad_norm"], rel), (a, b)
    pa, pb = _records(single / "pg_effects.jsonl"), _records(dist_out / "pg_effects.jsonl")
    assert [r["step"] for r in pa] == [r["step"] for r in pb] == [0, 2]
    for a, b in zip(pa, pb if pg else []):
        ref = dict(zip(a["index"], a["pg_effect"]))
        scale = max(abs(v) for v in a["pg_effect"])
        got = dict(zip(b["index"], b["pg_effect"]))  # (a rank left idle adds a copy of the first)
        assert got.keys() == ref.keys()
        for i, v in got.items():
            assert abs(v - ref[i]) <= rel * scale, (a["step"], i, v, ref[i])
    sa, sb = torch.load(single / "final.pt"), torch.load(dist_out / "final.pt")
    assert sa.keys() == sb.keys()
    for k in sa:
        assert float((sb[k] - sa[k]).norm()) <= param_rel * float(sa[k].norm()), k


def test_ddp_equals_single_process(setup, tmp_path):
    _spawn(setup, tmp_path, "ddp")
    _compare(setup[1], tmp_path)
    # retain partners: distinct across ranks, and the single-process pairing (reproducible per seed)
    r0, r1 = (json.loads((tmp_path / f"retain{r}.json").read_text()) for r in (0, 1))
    assert not set(r0) & set(r1)
    pairs = _data(setup[0]).pairs
    pairs.set_epoch(0)
    assert sorted(r0 + r1) == sorted(int(pairs.order[i]) for i in range(N_FORGET)
                                     if i in torch.randperm(N_FORGET, generator=torch.Generator().manual_seed(
                                         3 * 100_003)).tolist()[:4])
    # only the main process wrote files
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".jsonl") == ["geffect.jsonl", "pg_effects.jsonl",
                                                                                 "train_log.jsonl"]


def test_ddp_equals_single_process_fp32(setup, single_fp32, tmp_path):
    _spawn(setup, tmp_path, "ddp", torch.float32, grad_accum=1)
    _compare(single_fp32, tmp_path, rel=1e-5, param_rel=1e-5, pg=True)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_deepspeed_zero3_equals_single_process(setup, single_fp32, tmp_path, grad_accum):
    """ZeRO-3 through accelerate, in fp32 (DeepSpeed keeps fp32 master weights): G-effects, risks,
    losses, gradient norms, PG-effects and trained parameters equal one process's to 1e-5."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")
    _spawn(setup, tmp_path, "deepspeed", torch.float32, grad_accum)
    _compare(single_fp32, tmp_path, rel=1e-5, param_rel=1e-5, pg=grad_accum == 1)
    # DeepSpeed's own sharded checkpoint sits beside state.pt, which points to it
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    assert state["deepspeed_tag"] == "step3-epoch1-batch0" and "model" not in state
    assert [p.name for p in (tmp_path / "deepspeed_state").iterdir() if p.is_dir()] == [state["deepspeed_tag"]]


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_fsdp2_equals_single_process(setup, tmp_path, grad_accum):
    """FSDP2 (fully_shard per decoder block), fp64: everything to 1e-7, PG-effects included."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    _spawn(setup, tmp_path, "fsdp2", grad_accum=grad_accum)
    _compare(setup[1], tmp_path, pg=grad_accum == 1)


def test_world_size_not_dividing_batch(setup, tmp_path):
    _spawn(setup, tmp_path, "bad")
    msg = (tmp_path / "error0.txt").read_text()
    assert "batch_size 3 is not divisible by world_size*grad_accum = 2*1" in msg
    with pytest.raises(ValueError, match="not divisible"):
        check_divisible(16, 3, 2)
    check_divisible(16, 2, 4)


def test_retain_sampling_reproducible_and_seeded(setup):
    a, b, c = (_data(setup[0], seed=s).pairs for s in (0, 0, 1))
    assert (a.order == b.order).all() and not (a.order == c.order).all()


DRIVER = ["-m", "fastgeffect.run", "--size", "tiny", "--method", "tnpo", "--regularizer", "gd", "--batch-size", "4",
          "--epochs", "2", "--no-progress"]


def _driver_env(tmp_path):
    return {**os.environ, "FASTGEFFECT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def driver_one_process(tmp_path_factory):
    """The driver's G-effect log in one process (and the shared embedded cache)."""
    tmp = tmp_path_factory.mktemp("driver")
    subprocess.run([sys.executable, *DRIVER, "--out", str(tmp / "one"), "--eval", "none"], env=_driver_env(tmp),
                   check=True, capture_output=True)
    return tmp


def _same_geffect_log(one, two):
    a, b = read_geffect_log(one / "geffect.jsonl"), read_geffect_log(two / "geffect.jsonl")
    # fp32, lr 1e-3, another batch split: the two runs' parameters drift apart step by step (agreeing to ~3e-7
    # at step 0); with fixed risk rows (all 5 forget rows at every step, not the last step's one) by 1.7e-4 at step 3
    assert_same_geffects(a, b, 5e-4)


def test_driver_under_torchrun_matches_one_process(driver_one_process):
    """`python -m fastgeffect.run` on 2 gloo processes (DDP through accelerate): the same G-effect
    log as one process, evaluation and report written once by the main process."""
    tmp = driver_one_process
    two = tmp / "two"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          f"--master_port={_free_port()}", *DRIVER, "--out", str(two)], env=_driver_env(tmp),
                         capture_output=True, text=True)
    assert res.returncode == 0, launch_failure(res.stderr)
    _same_geffect_log(tmp / "one", two)
    cfg = json.loads((two / "config.json").read_text())
    assert cfg["distributed"]["world_size"] == 2 and cfg["distributed"]["per_rank_micro_batch"] == 2
    assert cfg["fused_resolved"] is False  # the fused path would bypass the DDP wrapper
    for name in ("metrics_before.json", "metrics_after.json", "metrics_uwc.json", "summary.md"):
        assert (two / name).exists(), name
    assert res.stdout.count("run folder:") == 1  # only the main process reports


def test_rank_failing_mid_run_leaves_resumable_files(driver_one_process):
    """Rank 1 raises at step 3 (of 4): the launch fails with a message naming the rank and step,
    every file in the run folder is whole, and --resume completes the one-process G-effect log."""
    tmp = driver_one_process
    out = tmp / "failed"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    args = [*DRIVER[2:], "--save-every", "1", "--out", str(out)]
    env = {**_driver_env(tmp), "FAIL_RANK": "1", "FAIL_AT_STEP": "3", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([*torchrun, f"--master_port={_free_port()}", str(ROOT / "tests/helpers/fail_rank.py"),
                          *args], env=env, capture_output=True, text=True)
    assert res.returncode != 0
    assert "rank 1 of 2 failed at step 3: RuntimeError: injected failure on rank 1" in res.stderr
    assert "continue with --resume" in res.stderr
    json.loads((out / "config.json").read_text())
    assert [r["step"] for r in _records(out / "train_log.jsonl")] == [0, 1, 2]
    assert sorted({r["step"] for r in read_geffect_log(out / "geffect.jsonl")}) == [0, 1, 2]
    assert torch.load(out / "state.pt", weights_only=False)["step"] == 3
    assert not (out / "metrics_after.json").exists()
    assert not [p.name for p in out.iterdir() if p.suffix == ".tmp"]  # no half-written file left
    res = subprocess.run([*torchrun, f"--master_port={_free_port()}", *DRIVER, "--out", str(out), "--resume"],
                         env=_driver_env(tmp), capture_output=True, text=True)
    assert res.returncode == 0, launch_failure(res.stderr)
    assert [r["step"] for r in _records(out / "train_log.jsonl")] == [0, 1, 2, 3]
    _same_geffect_log(tmp / "one", out)


def test_rank_with_nan_loss_stops_every_rank_with_state_saved(driver_one_process):
    """Rank 1's objective turns non-finite at step 2: all ranks stop together (no hang), the state
    before the step is saved (a collective) and error.json names the rank."""
    tmp = driver_one_process
    out = tmp / "nan"
    env = {**_driver_env(tmp), "FAIL_RANK": "1", "FAIL_AT_STEP": "2", "FAIL_KIND": "nan", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          f"--master_port={_free_port()}", str(ROOT / "tests/helpers/fail_rank.py"),
                          *DRIVER[2:], "--eval", "none", "--out", str(out)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode != 0
    assert "stopped: step 2: rank 1: non-finite loss (injected)" in res.stderr
    err = json.loads((out / "error.json").read_text())
    assert err["step"] == 2 and "rank 1" in err["error"]
    assert torch.load(out / "state.pt", weights_only=False)["step"] == 2
    assert [r["step"] for r in _records(out / "train_log.jsonl")] == [0, 1]


def test_driver_under_torchrun_fsdp2(driver_one_process):
    """`torchrun ... -m fastgeffect.run --fsdp2`: FSDP2 units per decoder block, the same G-effect
    log as one process, the full model gathered for the main process's evaluation."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    tmp = driver_one_process
    out = tmp / "fsdp2"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          f"--master_port={_free_port()}", *DRIVER, "--fsdp2", "--out", str(out)],
                         env=_driver_env(tmp), capture_output=True, text=True)
    assert res.returncode == 0, launch_failure(res.stderr)
    _same_geffect_log(tmp / "one", out)
    assert json.loads((out / "config.json").read_text())["distributed"]["strategy"] == "fsdp2"
    metrics = json.loads((out / "metrics_after.json").read_text())
    assert all(v == v for v in metrics.values() if isinstance(v, float))  # evaluated, no NaN


def test_driver_under_accelerate_deepspeed_stops_and_resumes(driver_one_process):
    """`accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml -m fastgeffect.run`
    (ZeRO-3 on 2 CPU processes, fp32): stopped after 2 steps and resumed from DeepSpeed's checkpoint,
    it gives one process's G-effect log, then evaluates and reports once."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")
    tmp = driver_one_process
    out = tmp / "ds"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "configs/accelerate/deepspeed_zero3.yaml"), "--mixed_precision", "no",
              "--main_process_port", str(_free_port()), *DRIVER, "--out", str(out)]
    res = subprocess.run([*launch, "--stop-at-step", "2"], env=_driver_env(tmp), capture_output=True, text=True)
    assert res.returncode == 0, launch_failure(res.stderr)
    assert not (out / "metrics_after.json").exists() and len(_records(out / "train_log.jsonl")) == 2
    res = subprocess.run([*launch, "--resume"], env=_driver_env(tmp), capture_output=True, text=True)
    assert res.returncode == 0, launch_failure(res.stderr)
    _same_geffect_log(tmp / "one", out)
    cfg = json.loads((out / "config.json").read_text())["distributed"]
    assert (cfg["strategy"], cfg["zero_stage"], cfg["world_size"]) == ("deepspeed", 3, 2)
    # PG-effects at the first and last step (--pg-steps 0,-1): from shard dots under ZeRO-3, the ghost
    # closed forms in one process; both ranks' first micro-batches are the one process's batch
    for a, b in zip(_records(tmp / "one" / "pg_effects.jsonl"), _records(out / "pg_effects.jsonl"), strict=True):
        assert a["step"] == b["step"] and sorted(a["index"]) == sorted(b["index"])
        ref, scale = dict(zip(a["index"], a["pg_effect"])), max(map(abs, a["pg_effect"]))
        for i, v in zip(b["index"], b["pg_effect"]):
            assert abs(v - ref[i]) <= 1e-4 * scale, (a["step"], i, v, ref[i])
    for name in ("metrics_after.json", "metrics_uwc.json", "summary.md"):
        assert (out / name).exists(), name


def test_deepspeed_launch_without_deepspeed_is_a_clear_error(monkeypatch):
    from fastgeffect.driver.launch import make_accelerator

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    with pytest.raises(SystemExit, match="deepspeed is not installed"):
        make_accelerator()
