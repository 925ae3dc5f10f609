"""Conflict-free updates, ``--geffect-guard gru|pcgrad`` (issue 28, item 5): the guard against GRU's and
PCGrad's formulas written out on flat float64 vectors (per group and whole-model, GRU's moving average
over steps), the gradient a guarded unlearning step hands the optimiser against one computed by hand,
accumulation against one big batch, a resume against an uninterrupted run, 2 gloo processes (DDP,
FSDP2) against one, and the refusals."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from helpers.toy_qa import tiny_llama, toy_qa_records, toy_tokenizer_for
from transformers import GPT2Config, GPT2LMHeadModel

from fastgeffect.data.pairs import ForgetRetainDataset
from fastgeffect.data.qa import QADataset
from fastgeffect.data.templates import get_template
from fastgeffect.data.unlearning import UnlearningData
from fastgeffect.distributed import barrier, is_main, shutdown
from fastgeffect.driver.config import RunConfig, usage_error
from fastgeffect.objectives import get_objective
from fastgeffect.training.backend import full_model_state
from fastgeffect.training.guard import GradientGuard, guard_gradients, projection_coefficients
from fastgeffect.training.reduce import global_counts, local_counts
from fastgeffect.unlearn import NonFiniteLoss, UnlearnConfig, Unlearner

GAMMA = 0.8  # GRU's gamma_gru


# ---- the formulas, written out on flat vectors ----------------------------------------------------
def project(u: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """GRU's / PCGrad's step on one flat vector: u − (⟨u, r⟩/‖r‖²) r where ⟨u, r⟩ < 0."""
    d = torch.dot(u, r)
    return u - d / torch.dot(r, r) * r if d < 0 else u


def reference(u: torch.Tensor, r: torch.Tensor, bounds, scope: str) -> torch.Tensor:
    """The formula over the whole flat vector, or on each slice ``bounds`` (a group) on its own."""
    if scope == "model":
        return project(u, r)
    return torch.cat([project(u[lo:hi], r[lo:hi]) for lo, hi in bounds])


def split(flat: torch.Tensor, sizes):
    return list(flat.split(sizes))


SIZES, GROUPS = [3, 5, 2, 4, 6], [0, 0, 1, 2, 2]  # 5 tensors in 3 groups
BOUNDS = [(0, 8), (8, 10), (10, 20)]


def vectors(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(20, generator=g, dtype=torch.float64), torch.randn(20, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("scope", ["model", "group"])
def test_guard_gradients_are_the_formula(scope):
    fired = 0
    for seed in range(20):
        u, r = vectors(seed)
        ours = torch.cat(guard_gradients(split(u, SIZES), split(r, SIZES), GROUPS, 3, scope))
        ref = reference(u, r, BOUNDS, scope)
        assert torch.allclose(ours, ref, rtol=0, atol=1e-14 * float(u.abs().max() + r.abs().max())), seed
        fired += not torch.equal(ref, u)
    assert 0 < fired < 20  # conflicting and agreeing draws both met
    # the projected part is orthogonal to r where it conflicted; no conflict, no change
    u, r = vectors(0)
    assert float(torch.cat(guard_gradients(split(-r, SIZES), split(r, SIZES), GROUPS, 3, scope)).abs().max()) < 1e-15
    assert torch.equal(torch.cat(guard_gradients(split(r, SIZES), split(r, SIZES), GROUPS, 3, scope)), r)


def test_coefficients_of_a_zero_direction_and_unknown_scope():
    assert projection_coefficients(torch.tensor([-1.0, 0.0]), torch.tensor([0.0, 0.0]), "group").tolist() == [0, 0]
    assert projection_coefficients(torch.tensor([-1.0, 0.0]), torch.tensor([0.0, 0.0]), "model").tolist() == [0, 0]
    assert projection_coefficients(torch.tensor([-1.0, 2.0]), torch.tensor([4.0, 1.0]), "group").tolist() == [-0.25, 0]
    assert projection_coefficients(torch.tensor([-1.0, 0.5]), torch.tensor([1.0, 1.0]), "model").tolist() == [-.25] * 2
    with pytest.raises(ValueError, match="unknown guard scope"):
        projection_coefficients(torch.zeros(1), torch.ones(1), "layer")


@pytest.mark.parametrize("method", ["gru", "pcgrad"])
@pytest.mark.parametrize("scope", ["model", "group"])
def test_gradient_guard_over_steps_is_the_formula(method, scope):
    """The loop's two passes on parameters: p.grad = g_r, then λ·g_r + g_u; the guarded result is
    project(g_u, r_t) + λ·g_r, r_t GRU's moving average (r_{-1} = 0) or PCGrad's g_r."""
    params = [torch.nn.Parameter(torch.zeros(n, dtype=torch.float64)) for n in SIZES]
    guard = GradientGuard(params, GROUPS, 3, method, scope, GAMMA)
    lam, r = 0.7, torch.zeros(20, dtype=torch.float64)
    projected = 0
    for step in range(4):
        g_u, g_r = vectors(100 + step)
        for p, x in zip(params, split(g_r, SIZES)):
            p.grad = x.clone()
        guard.after_retain(lam, step)
        for p, x in zip(params, split(g_u, SIZES)):
            p.grad += x
        log = guard.after_forget(lam)
        r = g_r if method == "pcgrad" else GAMMA * g_r + (1 - GAMMA) * r
        want = reference(g_u, r, BOUNDS, scope) + lam * g_r
        got = torch.cat([p.grad for p in params])
        assert torch.allclose(got, want, rtol=0, atol=1e-13 * float(g_u.abs().max() + g_r.abs().max())), step
        dots = [float(torch.dot(g_u[lo:hi], r[lo:hi])) for lo, hi in BOUNDS]
        assert log["guard_dot"] == pytest.approx(sum(dots), abs=1e-12)
        assert log["guard_projected"] == (sum(d < 0 for d in dots) if scope == "group" else 3 * (sum(dots) < 0))
        removed = want - (g_u + lam * g_r)
        assert log["guard_removed_norm"] == pytest.approx(float(removed.norm()), abs=1e-12)
        projected += log["guard_projected"]
    assert projected > 0
    with pytest.raises(RuntimeError, match="before after_retain"):
        guard.after_forget(lam)


# ---- the unlearning loop -----------------------------------------------------------------------
def tiny_data():
    template = get_template("phi")
    records = toy_qa_records(6)
    tok = toy_tokenizer_for(records, template)
    forget, retain = QADataset(records[:4], tok, template, 40), QADataset(records[4:10], tok, template, 40)
    held = QADataset(records[10:], tok, template, 40)
    return tok, UnlearningData(ForgetRetainDataset(forget, retain, seed=0), forget, retain, held)


def tiny_model(tok):
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=3, n_head=2, n_positions=64,
                                      attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).to(torch.float64)


def tiny_cfg(**changes):
    return UnlearnConfig(**{**dict(epochs=1, batch_size=2, lr=1e-2, warmup_epochs=0, geffect_batch=2,
                                   geffect_every=0, geffect_guard="gru"), **changes})


def tiny_unlearner(tmp_path, model=None, objective=None, **changes):
    tok, data = tiny_data()
    return Unlearner(tiny_model(tok) if model is None else model,
                     objective or get_objective("ga", regularizer="gd", lam=0.5), data, tiny_cfg(**changes), tmp_path,
                     progress=False)


def by_hand(unl, micro, weights):
    """The step's forget-term and regulariser gradients, each of the whole global batch, by autograd."""
    params = unl.guard.params
    counts = global_counts(local_counts(micro, weights), unl.device)
    obj, model = unl.objective, unl.model
    forget = sum(w * obj.forget_loss(model, m, counts)[0] for m, w in zip(micro, weights))
    reg = sum(w * obj(model, m, counts).reg_loss for m, w in zip(micro, weights))
    return torch.autograd.grad(forget, params), torch.autograd.grad(reg, params)


@pytest.mark.parametrize("method,scope,lora", [("gru", "model", False), ("gru", "group", False),
                                               ("pcgrad", "model", False), ("gru", "group", True)])
def test_guarded_step_hands_the_optimiser_the_formula(tmp_path, method, scope, lora):
    """At every step, the gradient clipped and stepped on is project(g_u, r_t) + λ·g_r, each of g_u,
    g_r recomputed by autograd at the step's parameters (r_t over the steps as GRU defines it); with
    LoRA over the adapters alone, the base weights untouched."""
    model = None
    if lora:
        pytest.importorskip("peft", reason="LoRA needs peft (the peft extra)")
        from fastgeffect.driver.lora import add_lora
        tok = tiny_data()[0]
        model = add_lora(tiny_llama(len(tok), hidden_size=16, layers=3, heads=2, tokenizer=tok).double(), 2)
        base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    unl = tiny_unlearner(tmp_path, model=model, geffect_guard=method, guard_scope=scope, epochs=2)
    seen, state = [], {"r": None}
    train_step, clip_and_step = unl.train_step, unl.backend.clip_and_step

    def recording_train_step(micro, plan):
        seen.append({"micro": micro, "weights": plan.weights})
        return train_step(micro, plan)

    def checking_clip_and_step(max_grad_norm):
        g_u, g_r = by_hand(unl, seen[-1]["micro"], seen[-1]["weights"])
        flat_u, flat_r = torch.cat([g.reshape(-1) for g in g_u]), torch.cat([g.reshape(-1) for g in g_r])
        r = flat_r if method == "pcgrad" else GAMMA * flat_r + (1 - GAMMA) * (0 if state["r"] is None else state["r"])
        state["r"] = r
        sizes = [p.numel() for p in unl.guard.params]
        ids = unl.guard.group_ids
        bounds = [(lo, lo + n) for lo, n in zip([0] + list(torch.tensor(sizes).cumsum(0)[:-1].tolist()), sizes)]
        if scope == "model":
            want = project(flat_u, r)
        else:  # per group: the group's elements gathered, projected, scattered back
            want = flat_u.clone()
            for g in set(ids):
                idx = torch.cat([torch.arange(lo, hi) for (lo, hi), i in zip(bounds, ids) if i == g])
                want[idx] = project(flat_u[idx], r[idx])
        want = want + 0.5 * flat_r
        got = torch.cat([p.grad.reshape(-1) for p in unl.guard.params])
        assert torch.allclose(got, want, rtol=0, atol=1e-10 * float(flat_u.abs().max() + flat_r.abs().max()))
        seen[-1]["fired"] = not torch.equal(project(flat_u, r), flat_u)
        return clip_and_step(max_grad_norm)

    unl.train_step, unl.backend.clip_and_step = recording_train_step, checking_clip_and_step
    unl.run()
    assert len(seen) == 4 and any(s["fired"] for s in seen)  # the guard had conflicts to take out
    rows = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert all({"guard_projected", "guard_dot", "guard_removed_norm", "reg_loss", "forget_loss"} <= set(r)
               for r in rows)
    assert any(r["guard_projected"] > 0 for r in rows)
    for r in rows:  # the objective's logs as the plain step writes them
        assert r["loss"] == pytest.approx(r["forget_loss"] + 0.5 * r["reg_loss"], rel=1e-12)
    if lora:
        assert {id(p) for p in unl.guard.params} == {id(p) for p in model.parameters() if p.requires_grad}
        assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
        assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if not p.requires_grad)


def final_params(unl):
    return {k: v.detach().clone() for k, v in unl.model.state_dict().items()}


def assert_same_params(a, b, rel=1e-9):
    assert a.keys() == b.keys()
    for k in a:
        assert float((a[k] - b[k]).norm()) <= rel * float(a[k].norm()) + 1e-300, k


def test_accumulation_equals_one_big_batch(tmp_path):
    one = tiny_unlearner(tmp_path / "one", epochs=2, batch_size=4)
    one.run()
    acc = tiny_unlearner(tmp_path / "acc", epochs=2, batch_size=4, grad_accum=2)
    acc.run()
    assert_same_params(final_params(one), final_params(acc))
    la, lb = ([json.loads(x) for x in (p / "train_log.jsonl").read_text().splitlines()] for p in
              (tmp_path / "one", tmp_path / "acc"))
    assert [r["guard_projected"] for r in la] == [r["guard_projected"] for r in lb]
    for a, b in zip(la, lb):
        assert abs(a["guard_dot"] - b["guard_dot"]) <= 1e-9 * abs(a["guard_dot"])


def test_resume_continues_gru_average(tmp_path):
    whole = tiny_unlearner(tmp_path / "whole", epochs=2)
    whole.run()
    first = tiny_unlearner(tmp_path / "parts", epochs=2, stop_at_step=2)
    assert first.run()["completed"] is False
    second = tiny_unlearner(tmp_path / "parts", epochs=2)
    assert second.resume() and second.guard.direction is not None
    second.run()
    assert_same_params(final_params(whole), final_params(second), rel=1e-12)


def test_no_guard_is_todays_step(tmp_path):
    """--geffect-guard none: the single-pass step and no guard fields."""
    unl = tiny_unlearner(tmp_path, geffect_guard="none")
    assert unl.guard is None
    unl.run()
    rows = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert rows and not any("guard_projected" in r for r in rows)


def test_only_trainable_parameters(tmp_path):
    """Frozen parameters (LoRA's base weights) are neither guarded nor moved."""
    tok, _ = tiny_data()
    model = tiny_model(tok)
    frozen = {n for n, p in model.named_parameters() if "wte" in n or ".0." in n}
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    unl = tiny_unlearner(tmp_path, model=model, guard_scope="group")
    assert {id(p) for p in unl.guard.params} == {id(p) for p in model.parameters() if p.requires_grad}
    unl.run()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n in frozen), n


def test_summary_notes_the_guard(tmp_path):
    from fastgeffect.geffect import read_geffect_log
    from fastgeffect.report.tables import guard_note

    tiny_unlearner(tmp_path, epochs=2, geffect_every=1, guard_scope="group").run()
    rows = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    fired = sum(r["guard_projected"] > 0 for r in rows)
    mean = sum(r["guard_projected"] for r in rows) / len(rows)
    assert fired > 0 and guard_note(read_geffect_log(tmp_path / "geffect.jsonl")) == (
        f"--geffect-guard projected the forget gradient away from the retain gradient at {fired} of {len(rows)} "
        f"measured steps ({mean:.2f} layer groups per step on average).\n")
    assert guard_note([{"step": 0, "risk": "unlearn", "total": 1.0}]) is None


def test_nonfinite_forget_term_stops_with_a_resumable_state(tmp_path):
    """A NaN forget term at step 1 stops the run after the retain pass took g_r,1 into r: the saved r
    says so, and re-doing step 1 from that state (the NaN gone) equals the uninterrupted run."""
    whole = tiny_unlearner(tmp_path / "whole", epochs=2)
    whole.run()
    unl = tiny_unlearner(tmp_path / "nan", epochs=2)
    real = unl.objective.forget_loss

    def forget_loss(model, batches, num_items=None, **kw):
        loss, details = real(model, batches, num_items, **kw)
        return (loss * float("nan") if unl.step == 1 else loss), details

    unl.objective.forget_loss = forget_loss
    with pytest.raises(NonFiniteLoss, match="non-finite ga forget term loss"):
        unl.run()
    state = torch.load(tmp_path / "nan" / "state.pt", weights_only=False)
    assert state["step"] == 1 and state["guard"]["through"] == 1
    again = tiny_unlearner(tmp_path / "nan", epochs=2)
    assert again.resume()
    again.run()
    assert_same_params(final_params(whole), final_params(again), rel=1e-12)


# ---- bad input ----------------------------------------------------------------------------------
def test_refusals(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="--geffect-guard gru needs a retain set"):
        tiny_unlearner(tmp_path / "none", objective=get_objective("ga", regularizer="none"))
    assert not (tmp_path / "none").exists()
    assert "--geffect-guard pcgrad needs a retain set" in usage_error(RunConfig(method="ga", regularizer="none",
                                                                                geffect_guard="pcgrad"))
    assert "needs a retain set" in usage_error(RunConfig(method="ga", geffect_guard="gru"))  # ga: none by default
    assert usage_error(RunConfig(method="ga", regularizer="gd", geffect_guard="gru")) is None
    assert usage_error(RunConfig(method="graddiff", geffect_guard="gru", guard_scope="group")) is None
    for gamma in (0, 1.5):
        assert "--gru-gamma" in usage_error(RunConfig(method="graddiff", geffect_guard="gru", gru_gamma=gamma))
    assert "--guard-scope" in usage_error(RunConfig(method="graddiff", geffect_guard="gru", guard_scope="layer"))
    with pytest.raises(ValueError, match="geffect_guard"):
        UnlearnConfig(geffect_guard="gradnorm").check()
    monkeypatch.setattr("fastgeffect.distributed.reduction_mode", lambda model: "zero3")
    with pytest.raises(ValueError, match="not supported under DeepSpeed ZeRO-3"):
        tiny_unlearner(tmp_path / "zero3")
    assert not (tmp_path / "zero3").exists()


def test_the_driver_refuses_before_the_folder(tmp_path):
    from fastgeffect.run import main
    out = tmp_path / "run"
    with pytest.raises(SystemExit):
        main(["--size", "tiny", "--method", "ga", "--regularizer", "none", "--geffect-guard", "gru", "--out", str(out)])
    assert not out.exists()


# ---- data parallel ------------------------------------------------------------------------------
def _worker(rank, world, port, out, how):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        tok, _ = tiny_data()
        model = tiny_model(tok)
        if how == "fsdp2":
            from fastgeffect.distributed import fully_shard_blocks
            fully_shard_blocks(model)
        else:
            model = torch.nn.parallel.DistributedDataParallel(model)
        unl = tiny_unlearner(out, model=model, epochs=2, batch_size=4, guard_scope="group", geffect_every=1)
        assert unl.strategy == how
        unl.run()
        final = full_model_state(unl.model)
        if is_main():
            torch.save(final, out / "final.pt")
    except BaseException:
        shutdown()
        raise
    barrier()
    os._exit(0)  # as tests/test_distributed.py: no gloo teardown


@pytest.mark.parametrize("how", ["ddp", "fsdp2"])
def test_two_processes_equal_one(tmp_path, how):
    if how == "fsdp2":
        pytest.importorskip("torch.distributed.fsdp", reason="no FSDP2")
    one = tiny_unlearner(tmp_path / "one", epochs=2, batch_size=4, guard_scope="group", geffect_every=1)
    one.run()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "two").mkdir()
    mp.spawn(_worker, args=(2, port, tmp_path / "two", how), nprocs=2, join=True)
    assert_same_params(final_params(one), torch.load(tmp_path / "two" / "final.pt"), rel=1e-9)
    la, lb = ([json.loads(x) for x in (tmp_path / p / "train_log.jsonl").read_text().splitlines()] for p in
              ("one", "two"))
    assert len(la) == len(lb) == 2 and any(r["guard_projected"] for r in la)
    for a, b in zip(la, lb):
        assert a["guard_projected"] == b["guard_projected"]
        assert abs(a["guard_dot"] - b["guard_dot"]) <= 1e-9 * abs(a["guard_dot"])
