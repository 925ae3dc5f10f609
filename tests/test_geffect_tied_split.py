"""The tied embedding's G-effect split by use (docs/design.md §4.4, geffect/tied_split.py):
the input-embedding part against the gradient of an untied copy's input embedding, in float64, for
G-effects and AdamW update effects, padding positions included; input + LM-head = the tied group."""
import copy
import os

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
    assert abs(res.tied_lm_head - want_head) <= 1e-10 * scale
    assert abs(want_in) > 1e-3 * scale and abs(want_head) > 1e-3 * scale  # both uses matter here
    assert res.to_dict()["tied_input"] == res.tied_input and res.to_dict()["tied_lm_head"] == res.tied_lm_head
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
    r_in, r_head = input_gradient(model)
    w = model.model.embed_tokens.weight
    before = w.detach().clone()
    opt.step()
    d = -(w.detach() - before) / 1e-2  # the step it really took, as a direction
    want, want_head = float((r_in * d).sum()), float((r_head * d).sum())
    scale = float((r_in * d).abs().sum() + (r_head * d).abs().sum())
    assert abs(res["risk"].update_tied_input - want) <= 1e-9 * scale
    assert abs(res["risk"].update_tied_lm_head - want_head) <= 1e-9 * scale
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
    assert res.tied_input == 0.0 and res.tied_lm_head == res.groups["embed"] != 0.0


@pytest.mark.parametrize("groups", ["blocks", "params"])
def test_split_does_not_depend_on_the_grouping(groups):
    model = tied_llama()
    nll(model, batch(2)).neg().backward()
    a = GEffect(model, "paper").measure({"risk": lambda: nll(model, RISK)})["risk"].tied_input
    b = GEffect(model, groups).measure({"risk": lambda: nll(model, RISK)})["risk"].tied_input
    assert a == pytest.approx(b, rel=1e-12, abs=1e-15)


def test_gpt2_splits_the_tied_weight_alone():
    """GPT-2's embed group also holds the position embedding: the split is the tied weight's own
    (input + LM head = its dot, not the group's), and the group total is unchanged by the split."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=37, n_embd=16, n_layer=3, n_head=2, n_positions=32)
    model = GPT2LMHeadModel(cfg).double().eval()  # eval: no dropout
    b = batch(5)
    loss = lambda m: L.nll(m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,  # noqa: E731
                           b["labels"])
    L.ga(model(input_ids=RISK["input_ids"]).logits, RISK["labels"]).backward()
    u = model.transformer.wte.weight.grad.clone()
    res = GEffect(model, "paper").measure({"risk": lambda: loss(model)})["risk"]
    model2 = copy.deepcopy(model)
    model2.zero_grad(set_to_none=True)
    loss(model2).backward()
    whole = float((model2.transformer.wte.weight.grad * u).sum())
    pos = model2.transformer.wpe.weight.grad
    scale = float((model2.transformer.wte.weight.grad * u).abs().sum())
    assert abs(res.tied_input + res.tied_lm_head - whole) <= 1e-10 * scale
    assert float(pos.abs().sum()) > 0  # the group holds more than the tied weight


def _share(model, rank, world):
    """This rank's share of the risk: its rows' token-summed NLL over the global token count."""
    out = model(input_ids=RISK["input_ids"][rank::world], attention_mask=RISK["attention_mask"][rank::world])
    logits, labels = out.logits[:, :-1], RISK["labels"][rank::world, 1:]
    total = int((RISK["labels"][:, 1:] != -100).sum())
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100, reduction="sum") / total


def _ddp_worker(rank, world, port, out):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = tied_llama()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        nll(ddp, batch(2)).neg().backward()  # the same batch on every rank: the averaged gradient is its own
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        res = GEffect(ddp, "paper").measure({"risk": lambda: _share(ddp, rank, world)}, optimizer=opt)["risk"]
        if rank == 0:
            torch.save(res.to_dict(), out)
    finally:
        dist.destroy_process_group()


def test_ddp_sums_the_split_over_ranks(tmp_path):
    """Two gloo ranks, each with half of the risk's rows: the split equals one process's on all rows."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, tmp_path / "ddp.pt"), nprocs=2, join=True)
    got = torch.load(tmp_path / "ddp.pt")
    model = tied_llama()
    nll(model, batch(2)).neg().backward()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    want = GEffect(model, "paper").measure({"risk": lambda: _share(model, 0, 1)}, optimizer=opt)["risk"].to_dict()
    for k in ("tied_input", "tied_lm_head", "update_tied_input", "update_tied_lm_head"):
        scale = abs(want["tied_input"]) + abs(want["tied_lm_head"]) if not k.startswith("update") else \
            abs(want["update_tied_input"]) + abs(want["update_tied_lm_head"])
        assert abs(got[k] - want[k]) <= 1e-9 * scale, (k, got[k], want[k])
    assert abs(got["groups"]["embed"] - want["groups"]["embed"]) <= 1e-9 * sum(map(abs, want["groups"].values()))


def test_report_shows_the_split_on_the_group_shares_scale():
    from fastgeffect.report import tied_shares
    from fastgeffect.report.tables import update_tables

    def rec(step, embed, tin, other):
        return {"step": step, "risk": "retain", "total": embed + other, "groups": {"embed": embed, "deep": other},
                "risk_value": 1.0, "tied": True, "tied_input": tin, "tied_lm_head": embed - tin}
    records = [rec(0, 2.0, 0.5, -1.0), rec(1, 1.0, -1.5, -2.0)]
    # Σ embed = 3, Σ deep = −3: scale 6; Σ input = −1, Σ LM head = 4
    assert tied_shares(records, "retain", "groups") == pytest.approx({"input": -1 / 6, "lm_head": 4 / 6})
    assert tied_shares(records, "retain", "update_groups") is None  # no update effects logged
    assert tied_shares(records, "unlearn", "groups") is None
    partial = [records[0], {k: v for k, v in records[1].items() if k != "tied_input"}]
    assert tied_shares(partial, "retain", "groups") is None  # a record without the split: no split shown
    table = update_tables(records)
    assert "| retain | raw G-effect | -0.1667 | 0.6667 |" in table
