"""The tied embedding's G-effect split by use (docs/design.md §4.4, geffect/tied_split.py):
the input-embedding part against the gradient of an untied copy's input embedding, in float64, for
G-effects and AdamW update effects, padding positions included; input + LM-head = the tied group."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fastgeffect.losses as L
from fastgeffect.geffect import GEffect

PAD = 0


def tied_llama(tied=True, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=37, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied,
                      pad_token_id=PAD)
    return LlamaForCausalLM(cfg).double()


def batch(seed, rows=3, length=9):
    """Odd sizes; the last two positions of row 0 and the last of row 2 are padding (id PAD), and
    row 1 holds PAD at an attended position (nn.Embedding gives its row no gradient: the split
    must leave that position out although ∂R/∂e_t is not 0 there)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 37, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    for r, n in ((0, 2), (2, 1)):
        ids[r, -n:], mask[r, -n:] = PAD, 0
    ids[1, 3] = PAD
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def nll(model, b):
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    return L.nll(out.logits, b["labels"])


RISK = batch(1)


def input_gradient(model):
    """∇R through the input embedding alone: an untied copy's input-embedding gradient."""
    untied = copy.deepcopy(model)
    untied.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    untied.zero_grad(set_to_none=True)
    nll(untied, RISK).backward()
    return untied.model.embed_tokens.weight.grad, untied.lm_head.weight.grad


def test_tied_split_equals_the_untied_copys_input_gradient():
    model = tied_llama()
    assert model.model.embed_tokens.padding_idx == PAD
    nll(model, batch(2)).neg().backward()  # GA's gradient in p.grad
    u = model.model.embed_tokens.weight.grad.clone()
    res = GEffect(model, "paper").measure({"risk": lambda: nll(model, RISK)})["risk"]
    r_in, r_head = input_gradient(model)
    want_in, want_head = float((r_in * u).sum()), float((r_head * u).sum())
    scale = float((r_in * u).abs().sum() + (r_head * u).abs().sum())
    assert res.tied and res.tied_input is not None
    assert abs(res.tied_input - want_in) <= 1e-10 * scale
    # the embed group holds the tied weight alone: its G-effect is the two uses together
    assert abs(res.groups["embed"] - (want_in + want_head)) <= 1e-10 * scale
    assert abs((res.groups["embed"] - res.tied_input) - want_head) <= 1e-10 * scale
    assert abs(want_in) > 1e-3 * scale and abs(want_head) > 1e-3 * scale  # both uses matter here
    assert res.to_dict()["tied_input"] == res.tied_input
    assert torch.equal(model.model.embed_tokens.weight.grad, u)  # the objective gradient is put back


def test_tied_split_of_the_update_effect_equals_the_real_adamw_step():
    model = tied_llama(seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for s in range(2):  # moments that are not the gradient's
        opt.zero_grad(set_to_none=True)
        nll(model, batch(10 + s)).neg().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    nll(model, batch(3)).neg().backward()
    ge = GEffect(model, "paper", chunk_numel=40)  # row blocks of 2: the direction is gathered block by block
    res = ge.measure({"risk": lambda: nll(model, RISK), "other": lambda: nll(model, batch(4))}, optimizer=opt)
    r_in, _ = input_gradient(model)
    w = model.model.embed_tokens.weight
    before = w.detach().clone()
    opt.step()
    d = -(w.detach() - before) / 1e-2  # the step it really took, as a direction
    want = float((r_in * d).sum())
    scale = float((r_in * d).abs().sum())
    assert abs(res["risk"].update_tied_input - want) <= 1e-9 * scale
    assert res["other"].tied_input is not None and res["other"].update_tied_input is not None
    assert res["risk"].tied_input != res["other"].tied_input  # each risk its own rows


def test_no_split_without_a_tied_weight():
    model = tied_llama(tied=False)
    nll(model, batch(2)).neg().backward()
    res = GEffect(model, "paper").measure({"risk": lambda: nll(model, RISK)})["risk"]
    assert not res.tied and res.tied_input is None and "tied_input" not in res.to_dict()


def test_a_risk_through_inputs_embeds_has_no_input_part():
    """No lookup of the embedding: nothing flows through the input use, all through the head."""
    model = tied_llama()
    nll(model, batch(2)).neg().backward()
    embeds = model.model.embed_tokens(RISK["input_ids"]).detach()

    def risk():
        out = model(inputs_embeds=embeds, attention_mask=RISK["attention_mask"])
        return L.nll(out.logits, RISK["labels"])
    res = GEffect(model, "paper").measure({"risk": risk})["risk"]
    assert res.tied_input == 0.0 and res.groups["embed"] != 0.0


@pytest.mark.parametrize("groups", ["blocks", "params"])
def test_split_does_not_depend_on_the_grouping(groups):
    model = tied_llama()
    nll(model, batch(2)).neg().backward()
    a = GEffect(model, "paper").measure({"risk": lambda: nll(model, RISK)})["risk"].tied_input
    b = GEffect(model, groups).measure({"risk": lambda: nll(model, RISK)})["risk"].tied_input
    assert a == pytest.approx(b, rel=1e-12, abs=1e-15)
