"""Groups from module structure: every trainable parameter exactly once, for every family, with
frozen parameters, PEFT LoRA, tied embeddings and custom groupings."""
import pytest
import torch
from helpers.model_families import ARCHS, tiny_model
from torch import nn

from fastgeffect.geffect import GEffect, build_grouping
from fastgeffect.geffect.groups import _thirds
from fastgeffect.model_structure import find_block_list

BLOCK_LISTS = {"llama": "model.layers", "gpt2": "transformer.h", "phi": "model.layers",
               "gpt_neox": "gpt_neox.layers", "qwen2": "model.layers", "opt": "model.decoder.layers"}


def assert_partition(model, grouping):
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(grouping.params) == len(trainable) == len({id(p) for p in grouping.params})
    assert {id(p) for p in grouping.params} == {id(p) for p in trainable}
    assert all(0 <= g < len(grouping.names) for g in grouping.group_ids)
    assert len(grouping.param_names) == len(grouping.params) == len(grouping.group_ids)


def block_index(name, prefix):
    rest = name[len(prefix) + 1:]
    return int(rest.split(".")[0])


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("layers", [1, 4, 5])
def test_paper_groups_every_family(arch, layers):
    model = tiny_model(arch, layers=layers)
    name, blocks = find_block_list(model)
    assert name == BLOCK_LISTS[arch] and len(blocks) == layers
    g = build_grouping(model, "paper")
    assert_partition(model, g)
    assert g.names == ["embed", "shallow", "middle", "deep", "lm"]
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    by_id = {id(p): g.names[i] for p, i in zip(g.params, g.group_ids)}
    assert by_id[id(emb)] == "embed"
    assert g.tied == (emb is head)
    if not g.tied:
        assert by_id[id(head)] == "lm"
    else:
        assert g.members("lm") == [] and any("share" in n for n in g.notes)
    head_params = {id(p) for p in model.get_output_embeddings().parameters()}
    third = _thirds(layers)
    for pname, p in model.named_parameters():
        if pname.startswith(name + "."):
            assert by_id[id(p)] == ["shallow", "middle", "deep"][third[block_index(pname, name)]], pname
        elif id(p) in head_params:
            assert by_id[id(p)] == ("embed" if p is emb else "lm"), pname
        elif id(p) != id(emb):
            # outside blocks: position embeddings before them -> embed, final norm after -> deep
            expected = "embed" if any(k in pname for k in ("wpe", "embed_positions", "project_in")) else "deep"
            assert by_id[id(p)] == expected, pname


def test_thirds_are_contiguous_and_balanced():
    assert _thirds(32) == [0] * 11 + [1] * 11 + [2] * 10
    assert _thirds(24) == [0] * 8 + [1] * 8 + [2] * 8
    assert _thirds(2) == [0, 1]
    for n in range(1, 40):
        t = _thirds(n)
        assert t == sorted(t) and len(t) == n and max(t.count(i) for i in range(3)) - min(
            t.count(i) for i in range(3)) <= 1


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_block_and_param_groups(arch):
    model = tiny_model(arch, layers=3)
    g = build_grouping(model, "blocks")
    assert_partition(model, g)
    assert g.names == ["embed", "block.0", "block.1", "block.2", "final_norm", "lm"]
    name, blocks = find_block_list(model)
    for i, block in enumerate(blocks):
        assert set(g.members(f"block.{i}")) == {f"{name}.{i}.{n}" for n, _ in block.named_parameters()}
    assert g.members("final_norm") and all("norm" in n or "ln_f" in n for n in g.members("final_norm"))
    gp = build_grouping(model, "params")
    assert_partition(model, gp)
    assert gp.names == gp.param_names and gp.group_ids == list(range(len(gp.params)))


def test_frozen_parameters_excluded():
    model = tiny_model("llama", layers=3)
    model.model.embed_tokens.requires_grad_(False)
    model.model.layers[0].requires_grad_(False)
    g = build_grouping(model, "paper")
    assert_partition(model, g)
    assert g.members("embed") == [] and all(not n.startswith("model.layers.0.") for n in g.param_names)
    assert len(g.members("shallow")) == 0  # block 0 is the whole shallow third of 3 blocks


def test_peft_lora_only_adapters_count():
    peft = pytest.importorskip("peft")
    base = tiny_model("llama", layers=3)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                      lora_dropout=0.0))
    g = build_grouping(model, "paper")
    assert_partition(model, g)
    assert all("lora_" in n for n in g.param_names)
    assert g.members("embed") == [] and g.members("lm") == []
    assert len(g.members("shallow")) == len(g.members("middle")) == len(g.members("deep")) == 4
    assert GEffect(model).group_names == ["embed", "shallow", "middle", "deep", "lm"]


def test_custom_groupings():
    model = tiny_model("gpt2", layers=2)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    spec = {"attn": [n for n in names if ".attn." in n], "rest": [n for n in names if ".attn." not in n]}
    for groups in (spec, lambda m: spec):
        g = build_grouping(model, groups)
        assert_partition(model, g)
        assert g.names == ["attn", "rest"] and g.tied
    # Parameter objects and the tied alias name work too (counted once)
    spec2 = {"head": ["lm_head.weight", model.transformer.wte.weight],
             "other": [p for n, p in model.named_parameters() if n != "transformer.wte.weight"]}
    assert_partition(model, build_grouping(model, spec2))


def test_custom_grouping_errors():
    model = tiny_model("llama", layers=2)
    names = [n for n, _ in model.named_parameters()]
    with pytest.raises(ValueError, match="misses 1 trainable"):
        build_grouping(model, {"a": names[:-1]})
    with pytest.raises(ValueError, match="double-counts parameter 'model.norm.weight'"):
        build_grouping(model, {"a": names, "b": ["model.norm.weight"]})
    with pytest.raises(ValueError, match="unknown parameter 'nope'"):
        build_grouping(model, {"a": names + ["nope"]})
    with pytest.raises(ValueError, match="not a parameter of the model"):
        build_grouping(model, {"a": names + [nn.Parameter(torch.zeros(1))]})
    with pytest.raises(TypeError, match="member of type int"):
        build_grouping(model, {"a": names + [3]})
    with pytest.raises(ValueError, match="non-empty mapping"):
        build_grouping(model, lambda m: {})
    with pytest.raises(ValueError, match="unknown grouping 'thirds'"):
        build_grouping(model, "thirds")
    # frozen parameters may be listed, they simply do not count
    model.lm_head.requires_grad_(False)
    assert_partition(model, build_grouping(model, {"a": names}))


def test_no_block_list():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="cannot find the decoder blocks"):
        build_grouping(model, "paper")
    assert_partition(model, build_grouping(model, "params"))


def test_largest_repeated_module_list_wins():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList([nn.Linear(2, 2) for _ in range(4)])  # smaller inner list
            self.proj = nn.Linear(2, 50)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(5, 2)
            self.layers = nn.ModuleList([Block() for _ in range(3)])
            self.mixed = nn.ModuleList([nn.Linear(20, 20), nn.ReLU()])  # not same-class: ignored
            self.head = nn.Linear(2, 5)

    name, _ = find_block_list(Net())
    assert name == "layers"


def test_trace_keeps_rng_state():
    model = tiny_model("gpt2", layers=3).train()  # dropout active during the trace
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_grouping(model, "paper")
    assert torch.equal(torch.rand(3), expected)


def test_registration_order_when_untraceable():
    class Net(nn.Module):  # no get_input_embeddings / input_ids: cannot be traced
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(4))
            self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
            self.norm = nn.LayerNorm(4)

    g = build_grouping(Net(), "paper")
    by_name = dict(zip(g.param_names, (g.names[i] for i in g.group_ids)))
    assert by_name == {"pos": "embed", "layers.0.weight": "shallow", "layers.0.bias": "shallow",
                       "layers.1.weight": "middle", "layers.1.bias": "middle", "layers.2.weight": "deep",
                       "layers.2.bias": "deep", "norm.weight": "deep", "norm.bias": "deep"}
