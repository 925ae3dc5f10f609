"""Per-sample PG-effects (ghost dot products) against a naive loop of per-sample backward passes."""
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.model_families import flat_grads, logits_of, qa_batch, tiny_model
from torch import nn

import fastgeffect.losses as L
from fastgeffect.geffect import GEffect, per_sample_geffects
from fastgeffect.geffect.per_sample import bias_contrib, embedding_contrib, linear_weight_contrib


def per_sample_ga_terms(model, batch):
    """ℓ_i: sample i's share of the GA token mean (so Σ_i ℓ_i is the batch GA loss)."""
    lp = L.token_logprobs(logits_of(model, batch), batch["labels"])
    mask = L.valid_mask(batch["labels"])
    return (lp * mask).sum(1) / mask.sum()


def naive_pg(model, risk_fn, terms_fn):
    """One backward per sample, dotted with the full flat risk gradient in float64."""
    params = [p for p in model.parameters() if p.requires_grad]
    g_r = flat_grads(risk_fn(), params)
    terms = terms_fn()
    out = []
    for i in range(terms.shape[0]):
        g_i = flat_grads(terms[i], params)
        out.append(sum(float((a * b).sum()) for a, b in zip(g_i, g_r)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("check", [True, False])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi", "gpt_neox"])
def test_matches_naive_loop_float64(arch, check):
    # llama: RMSNorm (forward-mode path), untied; gpt2: tied wte/lm_head, Conv1D with biases, LayerNorm,
    # position embeddings broadcast over the batch; phi / gpt_neox: biases, LayerNorm, Linear heads
    model = tiny_model(arch, layers=2, dtype=torch.float64)
    forget, retain = qa_batch(0, b=4), qa_batch(1, b=3)
    risk = lambda: L.nll(logits_of(model, retain), retain["labels"])  # noqa: E731
    terms = lambda: per_sample_ga_terms(model, forget)  # noqa: E731
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="PG-effects")  # no fallback on supported families
        res = per_sample_geffects(model, risk, terms, check=check, return_details=True)
    assert res.fallback == []
    ref = naive_pg(model, risk, terms)
    torch.testing.assert_close(res.values, ref, rtol=1e-9, atol=1e-12)
    assert abs(float(res.values.sum()) - res.batch) <= 1e-9 * float(res.values.abs().sum())
    assert ((res.groups.sum(0) - res.values).abs() <= 1e-12 * res.groups.abs().sum(0)).all()


def test_ga_same_batch_sums_to_minus_norm2_fp32():
    model = tiny_model("llama", layers=3)
    forget = qa_batch(2, b=5)
    ge = GEffect(model)
    risk = lambda: L.nll(logits_of(model, forget), forget["labels"])  # noqa: E731
    res = ge.per_sample(risk, lambda: per_sample_ga_terms(model, forget), return_details=True)
    assert res.groups.shape == (5, 5) and res.group_names == ge.group_names
    g = flat_grads(risk(), ge.grouping.params)
    norm2 = sum(float((x * x).sum()) for x in g)
    assert float(res.values.sum()) == pytest.approx(-norm2, rel=1e-5)
    ref = naive_pg(model, risk, lambda: per_sample_ga_terms(model, forget))
    torch.testing.assert_close(res.values, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


def test_pgrad_untouched():
    model = tiny_model("gpt2", layers=2, dtype=torch.float64)
    batch = qa_batch(3)
    model.zero_grad(set_to_none=True)
    L.ga(logits_of(model, batch), batch["labels"]).backward()
    before = [(p.grad, p.grad.clone()) for p in model.parameters()]
    GEffect(model).per_sample(lambda: L.nll(logits_of(model, batch), batch["labels"]),
                              lambda: per_sample_ga_terms(model, batch))
    for p, (g, gc) in zip(model.parameters(), before):
        assert p.grad is g and torch.equal(g, gc)


def test_peft_lora_matches_naive():
    peft = pytest.importorskip("peft")
    base = tiny_model("llama", layers=2, dtype=torch.float64)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "lm_head"],
                                                      lora_dropout=0.0, init_lora_weights=False))
    batch, retain = qa_batch(4), qa_batch(5)
    risk = lambda: L.nll(logits_of(model, retain), retain["labels"])  # noqa: E731
    terms = lambda: per_sample_ga_terms(model, batch)  # noqa: E731
    res = per_sample_geffects(model, risk, terms, return_details=True)
    assert res.fallback == []
    torch.testing.assert_close(res.values, naive_pg(model, risk, terms), rtol=1e-9, atol=1e-12)


class OddNet(nn.Module):
    """Parameters used in ways the closed forms cannot see: a Linear weight reused directly through
    F.linear, and a parameter owned by a module that also has children."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(11, 6, padding_idx=0)
        self.proj = nn.Linear(6, 6)
        self.scale = nn.Parameter(torch.randn(6))
        self.head = nn.Linear(6, 11, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        h = torch.tanh(self.proj(h)) * self.scale
        h = h + F.linear(h, self.proj.weight)  # second use, outside proj's forward
        return self.head(h)


def test_fallback_is_exact_and_reported():
    model = OddNet().double()
    ids = torch.tensor([[0, 3, 4, 5, 0], [2, 2, 7, 1, 9], [5, 6, 0, 0, 0]])
    target = torch.randint(0, 11, ids.shape, generator=torch.Generator().manual_seed(1))

    def terms():
        return F.cross_entropy(model(ids).transpose(1, 2), target, reduction="none").mean(1)

    risk = lambda: terms()[:2].sum() * 0.7  # noqa: E731
    with pytest.warns(UserWarning, match="exact per-sample fallback"):
        res = per_sample_geffects(model, risk, terms, return_details=True)
    assert set(res.fallback) == {"proj.weight", "scale"}
    torch.testing.assert_close(res.values, naive_pg(model, risk, terms), rtol=1e-9, atol=1e-12)


def test_closed_forms_against_per_sample_gradients():
    g = torch.Generator().manual_seed(0)
    B, T, n_in, n_out = 3, 5, 4, 7
    x = torch.randn(B, T, n_in, generator=g, dtype=torch.float64)
    dy = torch.randn(B, T, n_out, generator=g, dtype=torch.float64)
    G = torch.randn(n_out, n_in, generator=g, dtype=torch.float64)
    Gb = torch.randn(n_out, generator=g, dtype=torch.float64)
    per_sample_grad = torch.einsum("bto,bti->boi", dy, x)
    ref = (per_sample_grad * G).sum((1, 2))
    torch.testing.assert_close(linear_weight_contrib(x, dy, G, torch.float64), ref)
    torch.testing.assert_close(linear_weight_contrib(x, dy, G.t().contiguous(), torch.float64, True), ref)
    torch.testing.assert_close(linear_weight_contrib(x[..., :3], dy[..., :2], G[:2, :3], torch.float64),
                               (torch.einsum("bto,bti->boi", dy[..., :2], x[..., :3]) * G[:2, :3]).sum((1, 2)))
    torch.testing.assert_close(bias_contrib(dy, Gb, torch.float64), (dy.sum(1) * Gb).sum(1))
    ids = torch.tensor([[1, 0, 2, 1, 3], [0, 0, 3, 3, 2], [1, 2, 3, 0, 1]])
    E = torch.randn(4, n_out, generator=g, dtype=torch.float64)
    ref_e = torch.stack([sum(((E[ids[b, t]] * dy[b, t]).sum() for t in range(T) if ids[b, t] != 0),
                             torch.zeros((), dtype=torch.float64)) for b in range(B)])
    torch.testing.assert_close(embedding_contrib(ids, dy, E, 0, torch.float64), ref_e)


def test_bad_inputs():
    model = tiny_model("llama", layers=2)
    batch = qa_batch(6)
    risk = lambda: L.nll(logits_of(model, batch), batch["labels"])  # noqa: E731
    with pytest.raises(ValueError, match="1-D"):
        per_sample_geffects(model, risk, lambda: per_sample_ga_terms(model, batch).sum())
    with pytest.raises(ValueError, match="1-D"):
        per_sample_geffects(model, risk, lambda: [1.0, 2.0])
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        per_sample_geffects(model, risk, lambda: per_sample_ga_terms(model, batch) / 0.0)
    with pytest.raises(ValueError, match="no autograd graph"):
        per_sample_geffects(model, risk, lambda: per_sample_ga_terms(model, batch).detach())
    with pytest.raises(ValueError, match="scalar"):
        per_sample_geffects(model, lambda: per_sample_ga_terms(model, batch), lambda: per_sample_ga_terms(model, batch))
    with pytest.raises(FloatingPointError, match="not finite"):
        per_sample_geffects(model, lambda: risk() * float("nan"), lambda: per_sample_ga_terms(model, batch))
    assert all(p.grad is None for p in model.parameters())
    # hooks were removed: a plain forward/backward afterwards is unaffected
    L.nll(logits_of(model, batch), batch["labels"]).backward()
    assert all(p.grad is not None for p in model.parameters())


def nan_gradient(x):
    """0 per row with a NaN gradient: d sqrt(u)/du at u = 0 is inf, times the 0 of the chain rule."""
    return torch.sqrt(x - x.detach()).reshape(x.shape[0], -1).sum(1) * 0.0


@pytest.mark.parametrize("check", [True, False])
def test_non_finite_gradients_are_named(check):
    # finite risk and per-sample loss values with NaN gradients gave NaN PG-effects without an error
    model = tiny_model("llama", layers=3)
    batch = qa_batch(7)
    ge = GEffect(model)
    risk = lambda: L.nll(logits_of(model, batch), batch["labels"])  # noqa: E731
    terms = lambda: per_sample_ga_terms(model, batch)  # noqa: E731
    middle = dict(model.named_parameters())[ge.grouping.members("middle")[0]]
    with pytest.raises(FloatingPointError, match=r"the gradient of risk 'risk_fn' is non-finite in group\(s\) middle"):
        ge.per_sample(lambda: risk() + nan_gradient(middle[None]).sum(), terms, check=check)
    # the per-sample losses' gradients NaN through the model's output: every group, every sample
    with pytest.raises(FloatingPointError, match=r"in group\(s\) embed, shallow, middle, deep, lm for sample\(s\) "
                       r"\[0, 1, 2\]: the gradient of risk 'risk_fn' is finite there, so the per-sample losses' "
                       r"gradient is non-finite"):
        ge.per_sample(risk, lambda: terms() + nan_gradient(logits_of(model, batch)), check=check)
    # ... and through a parameter used outside its module: only the checked batch dot sees it
    # (check=False trusts the closed forms, which see the module's own use only)
    if check:
        with pytest.raises(FloatingPointError, match=r"group\(s\) middle for the batch's gradient: the gradient "
                           r"of risk 'risk_fn' is finite there"):
            ge.per_sample(risk, lambda: terms() + nan_gradient(middle[None].expand(3, *middle.shape)))
    assert all(p.grad is None for p in model.parameters())


SHARDED_NON_FINITE = textwrap.dedent("""
    import os, socket, sys
    import torch
    from helpers.model_families import logits_of, qa_batch, tiny_model
    import fastgeffect.losses as L
    from fastgeffect.distributed import fully_shard_blocks, shutdown
    from fastgeffect.geffect import GEffect

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    model = tiny_model("llama", layers=3)
    fully_shard_blocks(model)
    ge = GEffect(model)
    batch = qa_batch(5)
    risk = lambda: L.nll(logits_of(model, batch), batch["labels"])
    def terms():
        lp, m = L.token_logprobs(logits_of(model, batch), batch["labels"]), L.valid_mask(batch["labels"])
        return (lp * m).sum(1) / m.sum()
    def nan_gradient(x):
        return torch.sqrt(x - x.detach()).sum() * 0.0
    try:
        L.ga(logits_of(model, batch), batch["labels"]).backward()
        g = dict(model.named_parameters())[ge.grouping.members("deep")[0]].grad
        g.to_local().view(-1)[0] = float("nan")
        ddp_model = tiny_model("llama", layers=3)  # DDP: replicated parameters, each rank its own samples
        ddp = GEffect(torch.nn.parallel.DistributedDataParallel(ddp_model))
        ddp_terms = lambda: (L.token_logprobs(logits_of(ddp_model, batch), batch["labels"])
                             * L.valid_mask(batch["labels"])).sum(1)
        for fn in (lambda: ge.measure({"r": risk}),
                   lambda: ge.per_sample(lambda: risk() + nan_gradient(logits_of(model, batch)), terms),
                   lambda: ddp.per_sample(lambda: L.nll(logits_of(ddp_model, batch), batch["labels"]),
                                          lambda: ddp_terms() + nan_gradient(logits_of(ddp_model, batch)))):
            try:
                fn()
                print("no error")
            except FloatingPointError as e:
                print(e)
    finally:
        shutdown()
""")


def test_sharded_non_finite_gradients_are_named(tmp_path):
    # FSDP2 and DDP (one gloo process): the sharded and replicated paths refuse NaN gradients too
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(root / "tests")]), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", SHARDED_NON_FINITE], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    measure, pg, ddp = res.stdout.splitlines()[:3]
    assert "for risk 'r' in group(s) deep: the objective gradient (p.grad) is non-finite in group(s) deep" in measure
    assert ("in group(s) embed, shallow, middle, deep, lm for sample(s) [0, 1, 2]: the gradient of risk 'risk_fn' "
            "is non-finite in group(s) embed, shallow, middle, deep, lm") in pg
    assert "for sample(s) [0, 1, 2]: the gradient of risk 'risk_fn' is finite there, so the per-sample" in ddp
