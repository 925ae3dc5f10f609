"""The second-order term ½ΔθᵀHΔθ of a risk's change under the optimiser's real step (issue 28, item 3):
one Hessian-vector product against torch.autograd.functional.hvp on a tiny Llama, the real step, the
logged value of a run against a recomputation, a quadratic risk predicted exactly, and the refusals."""
from __future__ import annotations

import json
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from helpers.model_families import qa_batch
from helpers.toy_qa import tiny_llama, toy_qa_records, toy_tokenizer_for
from torch.func import functional_call
from transformers import GPT2Config, GPT2LMHeadModel

import fastgeffect.losses as L
from fastgeffect.data.pairs import ForgetRetainDataset
from fastgeffect.data.qa import QADataset
from fastgeffect.data.templates import get_template
from fastgeffect.data.unlearning import UnlearningData
from fastgeffect.distributed import barrier
from fastgeffect.driver.config import RunConfig, usage_error
from fastgeffect.geffect import GEffect, read_geffect_log
from fastgeffect.geffect.risk import nll_risk_on
from fastgeffect.geffect.second_order import (
    hvp_term,
    math_attention,
    optimizer_step,
    second_order_error,
    second_order_terms,
    with_second_order,
)
from fastgeffect.objectives import get_objective
from fastgeffect.unlearn import UnlearnConfig, Unlearner

VOCAB = 64


def nll_of(model, batch):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return L.nll(out.logits, batch["labels"])


def warmed_llama(lr=1e-2, warm_steps=2, max_grad_norm=1.0):
    """A float64 tiny Llama and its AdamW a few GA steps in, the next objective gradient in p.grad."""
    model = tiny_llama(VOCAB, hidden_size=16, layers=2, heads=2, seed=1).double()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    for s in range(warm_steps + 1):
        opt.zero_grad(set_to_none=True)
        batch = qa_batch(10 + s, vocab=VOCAB)
        L.ga(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
             batch["labels"]).backward()
        if s < warm_steps:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
    return model, params, opt


def test_predicted_step_is_the_real_step():
    model, params, opt = warmed_llama()
    step = optimizer_step(opt, params, 1.0)
    before = [p.detach().clone() for p in params]
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    for s, p, b in zip(step, params, before):
        real = p.detach() - b
        assert torch.allclose(s, real, rtol=0, atol=1e-12 * float(real.abs().max())), s.shape


def test_hvp_term_matches_autograd_functional_hvp():
    model, params, opt = warmed_llama()
    step = optimizer_step(opt, params, 1.0)
    batch = qa_batch(1, vocab=VOCAB)
    with math_attention():
        ours = float(hvp_term(nll_of(model, batch), params, step))

    # the reference: torch's own hvp of R as a function of the parameters, with eager attention
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    model.config._attn_implementation = "eager"

    def risk(*flat):
        return nll_of(lambda **kw: functional_call(model, dict(zip(names, flat)), args=(), kwargs=kw), batch)

    _, hv = torch.autograd.functional.hvp(risk, tuple(p.detach() for p in params), tuple(step))
    parts = [h * s for h, s in zip(hv, step)]
    ref = 0.5 * math.fsum(float(x.sum()) for x in parts)
    scale = 0.5 * sum(float(x.abs().sum()) for x in parts)
    assert scale > 0 and abs(ours) > 1e-3 * scale  # a term that is not vanishing
    # Llama computes its RMSNorm and rotary tables in float32 even in a float64 model, and the two
    # attention paths (math SDPA, eager) round differently there: agreement to float32's precision
    assert abs(ours - ref) <= 1e-6 * scale, (ours, ref)
    assert all(p.grad is not None for p in params)  # the objective gradient is read, not consumed


def test_the_fused_attention_kernel_has_no_double_backward():
    """Why the term runs on the math SDPA backend: without it the flash kernel refuses."""
    model, params, opt = warmed_llama()
    step = optimizer_step(opt, params, 1.0)
    with pytest.raises(RuntimeError, match="not implemented"):
        hvp_term(nll_of(model, qa_batch(1, vocab=VOCAB)), params, step)


class Quadratic(torch.nn.Module):
    """R(θ) = ½‖Wx + b − y‖²: exactly quadratic in the parameters."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(5, 3).double()
        self.x, self.y = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)

    def risk(self, y=None):
        return 0.5 * ((self.lin(self.x) - (self.y if y is None else y)) ** 2).sum()


@pytest.mark.parametrize("opt_name", ["adamw", "sgd_momentum"])
def test_quadratic_risk_is_predicted_exactly(opt_name):
    model = Quadratic()
    params = list(model.parameters())
    opt = (torch.optim.AdamW(params, lr=0.05, weight_decay=0.1) if opt_name == "adamw"
           else torch.optim.SGD(params, lr=0.05, momentum=0.9))
    other = torch.randn(7, 3, dtype=torch.float64)
    for s in range(4):  # an objective that is not the risk, so that the step is not along ∇R
        opt.zero_grad(set_to_none=True)
        (model.risk(other) + 0.3 * model.risk()).backward()
        if s < 3:
            opt.step()
    risks = {"r": model.risk}
    res = GEffect(model, groups="params").measure(risks, optimizer=opt, max_grad_norm=0.5)
    second = second_order_terms(model, risks, opt, params, 0.5)["r"]
    before = float(model.risk().detach())
    torch.nn.utils.clip_grad_norm_(params, 0.5)
    opt.step()
    realised = float(model.risk().detach()) - before
    first = -0.05 * res["r"].update_total
    tol = 1e-12 * (abs(first) + abs(second) + abs(before))
    assert abs(second) > 1e6 * tol and abs(realised - first) > 1e6 * tol  # the first order alone misses
    assert abs(realised - (first + second)) <= tol, (realised, first, second)


def tiny_unlearner(tmp_path, lr, fused=False, **changes):
    """The unlearning loop on a float64 tiny GPT-2 and toy QA."""
    template = get_template("phi")
    records = toy_qa_records(6)
    tok = toy_tokenizer_for(records, template)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                       attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, bos_token_id=tok.bos_token_id,
                                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).to(torch.float64)
    forget, retain = QADataset(records[:4], tok, template, 40), QADataset(records[4:10], tok, template, 40)
    held = QADataset(records[10:], tok, template, 40)
    data = UnlearningData(ForgetRetainDataset(forget, retain, seed=0), forget, retain, held)
    cfg = UnlearnConfig(**{**dict(epochs=1, batch_size=2, lr=lr, warmup_epochs=0, geffect_batch=2), **changes})
    return Unlearner(model, get_objective("ga", regularizer="gd", fused=fused), data, cfg, tmp_path, progress=False)


def test_logged_second_order_is_the_real_steps(tmp_path):
    """Each logged term recomputed at the step's parameters with the step the optimiser really took."""
    unl = tiny_unlearner(tmp_path, 1e-3, second_order=True)
    params = [p for p in unl.model.parameters() if p.requires_grad]
    seen = {}
    measure, step = unl.second_order, unl.backend.clip_and_step

    def second_order(risks):
        seen[unl.step] = {"risks": risks, "theta": [p.detach().clone() for p in params]}
        return measure(risks)

    def clip_and_step(max_grad_norm):
        out = step(max_grad_norm)
        seen[unl.step]["delta"] = [p.detach() - b for p, b in zip(params, seen[unl.step]["theta"])]
        return out

    unl.second_order, unl.backend.clip_and_step = second_order, clip_and_step
    unl.run()
    records = read_geffect_log(tmp_path / "geffect.jsonl")
    assert len(records) == 4 and set(seen) == {0, 1}
    unl.model.eval()
    for r in records:
        s = seen[r["step"]]
        with torch.no_grad():
            for p, t in zip(params, s["theta"]):
                p.copy_(t)
        with math_attention():
            value = s["risks"][r["risk"]]()
        grads = torch.autograd.grad(value, params, create_graph=True)
        hv = torch.autograd.grad(sum((g * d).sum() for g, d in zip(grads, s["delta"])), params)
        parts = [h * d for h, d in zip(hv, s["delta"])]
        ref, scale = 0.5 * math.fsum(float(x.sum()) for x in parts), 0.5 * sum(float(x.abs().sum()) for x in parts)
        assert scale > 0 and abs(r["second_order"] - ref) <= 1e-8 * scale, (r["step"], r["risk"], ref)
        assert r["predicted_opt2"] == pytest.approx(r["predicted_opt"] + r["second_order"], rel=1e-12, abs=1e-300)
        # the second-order prediction is closer to the realised change than the first-order one
        assert abs(r["realised"] - r["predicted_opt2"]) < abs(r["realised"] - r["predicted_opt"]), r


def test_fused_objective_does_not_change_the_term(tmp_path):
    """The risk is never fused (it is the NLL of materialised logits): a run with the fused GA objective
    logs the same second-order terms as the unfused one."""
    for fused in (False, True):
        tiny_unlearner(tmp_path / str(fused), 1e-3, fused=fused, second_order=True).run()
    plain, fused = (read_geffect_log(tmp_path / str(f) / "geffect.jsonl") for f in (False, True))
    assert [(r["step"], r["risk"]) for r in plain] == [(r["step"], r["risk"]) for r in fused]
    for a, b in zip(plain, fused):
        assert abs(a["second_order"] - b["second_order"]) <= 1e-6 * abs(a["second_order"]), (a, b)


def test_without_the_flag_nothing_is_added(tmp_path):
    tiny_unlearner(tmp_path, 1e-3, epochs=1).run()
    records = read_geffect_log(tmp_path / "geffect.jsonl")
    assert records and all("predicted_opt" in r and "second_order" not in r and "predicted_opt2" not in r
                           for r in records)


def test_with_second_order_keeps_undefined_values_null():
    out = with_second_order({"a": {"predicted_opt": 1.0}, "b": {"predicted_opt": None}, "c": {"predicted_opt": 2.0}},
                            {"a": 0.5, "b": 0.25, "c": float("nan")})
    assert out == {"a": {"predicted_opt": 1.0, "second_order": 0.5, "predicted_opt2": 1.5},
                   "b": {"predicted_opt": None, "second_order": 0.25, "predicted_opt2": None},
                   "c": {"predicted_opt": 2.0, "second_order": None, "predicted_opt2": None}}


def test_refusals(tmp_path, monkeypatch):
    for changes in ({"update_effects": False}, {"geffect_every": 0}):
        with pytest.raises(ValueError, match="second_order needs the G-effects"):
            UnlearnConfig(second_order=True, **changes).check()
    for changes in ({"update_effects": "off"}, {"geffect_every": 0}):
        assert "--second-order needs the G-effects" in usage_error(RunConfig(second_order=True, **changes))
    assert usage_error(RunConfig(second_order=True)) is None
    assert second_order_error(True, "none") is None and second_order_error(True, "replicated") is None
    assert "needs the update effects" in second_order_error(False, "none")
    assert "needs G-effects" in second_order_error(True, None)
    for mode in ("sharded", "zero3"):
        assert "sharded parameters" in second_order_error(True, mode)
    # the loop refuses a sharded model before any step, and so does the measurement itself
    monkeypatch.setattr("fastgeffect.distributed.reduction_mode", lambda model: "sharded")
    with pytest.raises(ValueError, match="sharded parameters"):
        tiny_unlearner(tmp_path / "loop", 1e-3, second_order=True)
    model = Quadratic()
    model.risk().backward()
    with pytest.raises(NotImplementedError, match="sharded parameters"):
        second_order_terms(model, {"r": model.risk}, torch.optim.AdamW(model.parameters()), list(model.parameters()))
    assert not (tmp_path / "loop").exists() or not any((tmp_path / "loop").iterdir())


def test_the_driver_refuses_sharding_before_the_folder(tmp_path, monkeypatch):
    import fastgeffect.driver.study as study
    from fastgeffect.driver.presets import resolve_preset

    cfg = RunConfig(second_order=True, size="tiny", out=str(tmp_path / "run"))
    for strategy in ("fsdp", "fsdp2", "deepspeed"):
        monkeypatch.setattr(study, "launch_strategy", lambda accelerator, fsdp2, s=strategy: s)
        with pytest.raises(SystemExit, match="--second-order is not available with sharded parameters"):
            study.checked_settings(cfg, resolve_preset(cfg.preset, cfg.model), None)
    assert not (tmp_path / "run").exists()


def _ddp_setup():
    """A float64 tiny GPT-2 with a fixed 'objective gradient' in p.grad, its AdamW, and 5 risk rows
    (an odd count: the two ranks' shares differ)."""
    template = get_template("phi")
    records = toy_qa_records(6)
    tok = toy_tokenizer_for(records, template)
    items = [QADataset(records, tok, template, 40)[i] for i in range(5)]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=2, n_head=2, n_positions=64,
                                       attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)).to(torch.float64).eval()
    params = list(model.parameters())
    g = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    return model, params, items, torch.optim.AdamW(params, lr=1e-2)


def _ddp_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    model, params, items, opt = _ddp_setup()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    risks = {"r": nll_risk_on(ddp, items, torch.device("cpu"), rank=rank, world=world)}
    (out / f"rank{rank}.json").write_text(json.dumps(second_order_terms(ddp, risks, opt, params, 1.0)))
    barrier()
    os._exit(0)  # as tests/test_distributed.py: no gloo teardown


def test_ddp_shares_sum_to_the_one_process_term(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, tmp_path), nprocs=2, join=True)
    model, params, items, opt = _ddp_setup()
    one = second_order_terms(model, {"r": nll_risk_on(model, items, torch.device("cpu"))}, opt, params, 1.0)["r"]
    assert one != 0
    for rank in range(2):
        assert abs(json.loads((tmp_path / f"rank{rank}.json").read_text())["r"] - one) <= 1e-10 * abs(one)
