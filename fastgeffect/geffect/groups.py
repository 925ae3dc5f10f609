"""Parameter groups for G-effects, derived from module structure (docs/design.md §4).

The decoder blocks are found generically as the largest ``nn.ModuleList`` of same-class modules
(``model.layers``, ``transformer.h``, ``gpt_neox.layers``, ...); the input and output embeddings
come from ``get_input_embeddings()`` / ``get_output_embeddings()``. Other parameters that act
before the first block (position embeddings) join ``embed``, those acting after it (final norm)
join ``deep`` / ``final_norm``; "before/after" is read from a 2-token trace forward (registration
order when the model cannot be traced: OPT, for one, registers its final norm before its blocks).
Only trainable parameters (``requires_grad``) count; a tied embedding / LM head tensor is counted
once, in ``embed``, and the grouping says ``tied=True``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ..model_structure import find_block_list

GROUPINGS = ("paper", "blocks", "params")
PAPER_GROUPS = ("embed", "shallow", "middle", "deep", "lm")

GroupSpec = Union[str, Mapping[str, Iterable], Callable[[nn.Module], Mapping[str, Iterable]]]


@dataclass(frozen=True)
class Grouping:
    """Trainable parameters (each once, in model order) and the group id of each."""
    names: List[str]
    params: List[nn.Parameter]
    param_names: List[str]
    group_ids: List[int]
    tied: bool = False
    notes: List[str] = field(default_factory=list)

    def members(self, group: str) -> List[str]:
        gid = self.names.index(group)
        return [n for n, g in zip(self.param_names, self.group_ids) if g == gid]


def trainable_named_parameters(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """(name, param) for every distinct trainable parameter; raises when there is none."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    out = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not out:
        raise ValueError("the model has no trainable parameters (every parameter has requires_grad=False); "
                         "a G-effect needs at least one")
    return out


def _module_params(getter) -> List[nn.Parameter]:
    try:
        mod = getter()
    except (AttributeError, NotImplementedError):
        return []
    return list(mod.parameters()) if isinstance(mod, nn.Module) else []


def embeddings_tied(model: nn.Module) -> bool:
    """Whether the input embedding and the output embedding (LM head) share a parameter."""
    embed = {id(p) for p in _module_params(getattr(model, "get_input_embeddings", lambda: None))}
    head = {id(p) for p in _module_params(getattr(model, "get_output_embeddings", lambda: None))}
    return bool(embed & head)


def _tied_note(tied: bool, where: str) -> List[str]:
    return [f"input embedding and LM head share their weight: counted once, in {where}"] if tied else []


def _first_calls(model: nn.Module) -> Optional[Dict[int, int]]:
    """id(module) -> rank of its first forward call in a 2-token no-grad trace of ``model``
    (RNG state preserved); None when the model cannot be called as ``model(input_ids=...)``."""
    order: Dict[int, int] = {}

    def pre(mod, args):
        order.setdefault(id(mod), len(order))

    handles = [m.register_forward_pre_hook(pre) for m in model.modules()]
    try:
        weight = model.get_input_embeddings().weight
        ids = torch.zeros(1, 2, dtype=torch.long, device=weight.device)
        devices = [weight.device] if weight.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            model(input_ids=ids)
    except Exception:
        return None
    finally:
        for h in handles:
            h.remove()
    return order


def _before_blocks(model: nn.Module, blocks: nn.ModuleList, outside: List[nn.Parameter]) -> Dict[int, bool]:
    """For parameters outside the blocks and embeddings: do they act before the first block
    (position embeddings, an embedding norm) or after it (final norm)? Decided by the order of
    forward calls in a tiny trace, falling back to registration order."""
    # no trace of FSDP2-sharded models: their forward swaps parameter objects (and is a collective)
    sharded = any(type(p).__name__ == "DTensor" for p in model.parameters())
    calls = None if sharded else _first_calls(model)
    owners: Dict[int, List[nn.Module]] = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            owners.setdefault(id(p), []).append(mod)
    reg = {id(p): i for i, (_, p) in enumerate(model.named_parameters())}
    first_block_reg = min(reg[id(p)] for p in blocks.parameters())
    first_block_call = calls.get(id(blocks[0])) if calls else None
    out = {}
    for p in outside:
        ranks = [calls[id(m)] for m in owners.get(id(p), []) if calls and id(m) in calls]
        if ranks and first_block_call is not None:
            out[id(p)] = min(ranks) < first_block_call
        else:
            out[id(p)] = reg[id(p)] < first_block_reg
    return out


def _thirds(n: int) -> List[int]:
    """Block index -> 0/1/2 for three contiguous thirds, the first thirds taking the remainder."""
    sizes = [n // 3 + (1 if i < n % 3 else 0) for i in range(3)]
    return [third for third, size in enumerate(sizes) for _ in range(size)]


def _structural(model: nn.Module, per_block: bool) -> Grouping:
    named = trainable_named_parameters(model)
    blocks_name, blocks = find_block_list(model)
    block_of: Dict[int, int] = {}
    for i, block in enumerate(blocks):
        for p in block.parameters():
            block_of.setdefault(id(p), i)
    embed_ids = {id(p) for p in _module_params(getattr(model, "get_input_embeddings", lambda: None))}
    head_ids = {id(p) for p in _module_params(getattr(model, "get_output_embeddings", lambda: None))}
    tied = bool(embed_ids & head_ids)
    outside = [p for _, p in named if id(p) not in embed_ids | head_ids and id(p) not in block_of]
    before = _before_blocks(model, blocks, outside) if outside else {}

    n = len(blocks)
    if per_block:
        names = ["embed"] + [f"block.{i}" for i in range(n)] + ["final_norm", "lm"]
        post, lm = n + 1, n + 2
        block_gid = [1 + i for i in range(n)]
    else:
        names = list(PAPER_GROUPS)
        post, lm = 3, 4
        block_gid = [1 + t for t in _thirds(n)]

    params, pnames, gids = [], [], []
    for name, p in named:
        if id(p) in embed_ids:
            g = 0
        elif id(p) in head_ids:
            g = lm
        elif id(p) in block_of:
            g = block_gid[block_of[id(p)]]
        elif before[id(p)]:
            g = 0
        else:
            g = post
        params.append(p)
        pnames.append(name)
        gids.append(g)
    notes = [f"decoder blocks: {blocks_name} ({n})"] + _tied_note(tied, "'embed'")
    return Grouping(names, params, pnames, gids, tied, notes)


def _custom(model: nn.Module, spec: Mapping[str, Iterable]) -> Grouping:
    named = trainable_named_parameters(model)
    if not isinstance(spec, Mapping) or not spec:
        raise ValueError(f"a custom grouping must be a non-empty mapping group name -> parameters, got "
                         f"{type(spec).__name__}")
    by_name = dict(model.named_parameters(remove_duplicate=False))
    canonical = {id(p): n for n, p in named}
    group_of: Dict[int, str] = {}
    names = [str(g) for g in spec]
    for gname, members in spec.items():
        if isinstance(members, (str, nn.Parameter)):
            members = [members]
        for m in members:
            if isinstance(m, str):
                if m not in by_name:
                    raise ValueError(f"custom grouping: group {gname!r} names unknown parameter {m!r}")
                p = by_name[m]
            elif isinstance(m, torch.Tensor):
                p = m
            else:
                raise TypeError(f"custom grouping: group {gname!r} has a member of type {type(m).__name__}; "
                                "use parameter names or Parameter objects")
            if not p.requires_grad:
                continue  # frozen parameters do not count; listing them is harmless
            if id(p) not in canonical:
                raise ValueError(f"custom grouping: group {gname!r} has a tensor that is not a parameter of the model")
            prev = group_of.get(id(p))
            if prev is not None and prev != str(gname):
                raise ValueError(f"custom grouping double-counts parameter {canonical[id(p)]!r}: in groups "
                                 f"{prev!r} and {str(gname)!r}")
            group_of[id(p)] = str(gname)
    missing = [n for n, p in named if id(p) not in group_of]
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise ValueError(f"custom grouping misses {len(missing)} trainable parameter(s): {shown}")
    gid = {g: i for i, g in enumerate(names)}
    tied = embeddings_tied(model)
    return Grouping(names, [p for _, p in named], [n for n, _ in named],
                    [gid[group_of[id(p)]] for _, p in named], tied,
                    ["custom grouping"] + _tied_note(tied, "its group"))


def build_grouping(model: nn.Module, groups: GroupSpec = "paper") -> Grouping:
    """``"paper"`` (embed/shallow/middle/deep/lm), ``"blocks"`` (embed, block.i, final_norm, lm),
    ``"params"`` (one group per trainable tensor), a mapping group -> parameter names/objects, or a
    callable ``model -> mapping``. Every trainable parameter ends up in exactly one group."""
    if isinstance(groups, str):
        if groups == "paper":
            return _structural(model, per_block=False)
        if groups == "blocks":
            return _structural(model, per_block=True)
        if groups == "params":
            named = trainable_named_parameters(model)
            tied = embeddings_tied(model)
            return Grouping([n for n, _ in named], [p for _, p in named], [n for n, _ in named],
                            list(range(len(named))), tied,
                            ["one group per parameter tensor"] + _tied_note(tied, "the embedding's entry"))
        raise ValueError(f"unknown grouping {groups!r}; valid: {', '.join(GROUPINGS)}, a mapping or a callable")
    if callable(groups) and not isinstance(groups, Mapping):
        return _custom(model, groups(model))
    return _custom(model, groups)


__all__ = ["Grouping", "GroupSpec", "embeddings_tied", "GROUPINGS", "PAPER_GROUPS", "build_grouping",
           "trainable_named_parameters"]
