"""The quantisation attack's RTN quantiser against a plain per-row / per-group loop, and the
quantised copy of a model (the original untouched, what is quantised and what is not)."""
import pytest
import torch

from fastgeffect.attacks.quantize import quantize_rtn, quantized_copy, quantized_linears
from tests.helpers.toy_qa import tiny_llama


def reference_rtn(w: torch.Tensor, bits: int, group_size=None) -> torch.Tensor:
    """One scale per row or per group of a row, written out: scale = max|w| / (2^(b-1) - 1),
    round, clamp to the signed b-bit range, dequantise; a zero group stays zero."""
    qmax = 2 ** (bits - 1) - 1
    w = w.float()
    out = torch.zeros_like(w)
    g = w.shape[1] if group_size is None else group_size
    for r in range(w.shape[0]):
        for lo in range(0, w.shape[1], g):
            part = w[r, lo: lo + g]
            scale = part.abs().max() / qmax
            if scale == 0:
                continue
            out[r, lo: lo + g] = torch.clamp(torch.round(part / scale), -qmax - 1, qmax) * scale
    return out


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", [None, 128, 5, 7, 1000])
@pytest.mark.parametrize("shape", [(3, 7), (9, 300), (4, 128), (1, 1)])
def test_rtn_matches_the_loop(bits, group_size, shape):
    torch.manual_seed(sum(shape) + bits)
    w = torch.randn(shape)
    got, want = quantize_rtn(w, bits, group_size), reference_rtn(w, bits, group_size)
    assert got.dtype == w.dtype and got.shape == w.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * float(w.abs().max()))


@pytest.mark.parametrize("bits", [8, 4])
def test_levels_and_error_bound(bits):
    """At most 2^b distinct values per row, each within half a step of the weight."""
    torch.manual_seed(1)
    w = torch.randn(6, 50)
    q = quantize_rtn(w, bits)
    step = w.abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1)
    assert all(len(torch.unique(row)) <= 2 ** bits for row in q)
    assert bool(((q - w).abs() <= step / 2 + 1e-6).all())
    assert float((q - w).abs().max()) > 0  # it does quantise


def test_last_group_shorter():
    """300 inputs in groups of 128: groups [0,128), [128,256), [256,300) each get their own scale."""
    w = torch.ones(1, 300) * 0.01
    w[0, 0] = 10.0  # a large weight in the first group only: the others keep their small values exactly
    q = quantize_rtn(w, 4, 128)
    torch.testing.assert_close(q[0, 128:], w[0, 128:], rtol=0, atol=1e-7)
    assert float(q[0, 1]) == 0.0  # 0.01 rounds to 0 under a scale of 10/7


def test_zero_rows_and_groups_stay_zero():
    w = torch.randn(4, 20)
    w[1] = 0
    w[2, 10:] = 0
    for g in (None, 10, 3):
        q = quantize_rtn(w, 4, g)
        assert torch.isfinite(q).all()
        assert bool((q[1] == 0).all()) and bool((q[2, 10:] == 0).all())


def test_dtype_kept_and_input_untouched():
    w = torch.randn(5, 9, dtype=torch.bfloat16)
    before = w.clone()
    q = quantize_rtn(w, 8, 4)
    assert q.dtype == torch.bfloat16
    assert torch.equal(w, before)


@pytest.mark.parametrize("kw, msg", [(dict(bits=3), "bits must be one of"), (dict(bits=True), "bits must be one of"),
                                     (dict(bits=8, group_size=0), "group_size"),
                                     (dict(bits=8, group_size=2.5), "group_size")])
def test_bad_arguments(kw, msg):
    with pytest.raises(ValueError, match=msg):
        quantize_rtn(torch.randn(2, 4), **kw)


def test_not_2d_refused():
    with pytest.raises(ValueError, match="2-D"):
        quantize_rtn(torch.randn(4), 8)


def _tied_llama():
    torch.manual_seed(0)
    m = tiny_llama(40, hidden_size=16)
    m.lm_head.weight = m.model.embed_tokens.weight  # tie, as SmolLM2 does
    return m


@pytest.mark.parametrize("include_lm_head", [True, False])
def test_quantized_copy(include_lm_head):
    model = _tied_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantized_copy(model, 4, 8, include_lm_head=include_lm_head)
    for k, v in model.state_dict().items():  # the original, bitwise
        assert torch.equal(v, before[k]), k
    assert model.lm_head.weight is model.model.embed_tokens.weight
    names = quantized_linears(model, include_lm_head)
    assert ("lm_head" in names) == include_lm_head and len(names) == 2 * 7 + include_lm_head
    qmods, mods = dict(q.named_modules()), dict(model.named_modules())
    for name in names:
        torch.testing.assert_close(qmods[name].weight, reference_rtn(mods[name].weight, 4, 8), rtol=0, atol=1e-6)
    # embeddings and norms keep full precision, even under a tied head
    assert torch.equal(q.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert torch.equal(q.model.norm.weight, model.model.norm.weight)
    if not include_lm_head:
        assert torch.equal(q.lm_head.weight, model.lm_head.weight)
    x = torch.tensor([[1, 2, 3]])
    assert torch.isfinite(q(input_ids=x).logits).all()
