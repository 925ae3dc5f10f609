"""``run_attacks``: the relearning and the quantisation attacks on one model, written to
``attacks.json`` (atomically, strict JSON) and ``attacks_relearn.png``.

attacks.json::

    {"forget_rows": N, "metrics": ["nll", "exact_memorization", "extraction_strength"(, "rougeL_recall")],
     "relearn": {"steps": [0, 1, 2, 4, 8, 16], "seed", "lr", "batch_size", "max_length",
                 "train_rows": [forget row numbers trained on], "eval_rows": [the others, measured],
                 "target": [{"step": k, "train_loss": float | null, <metric>: float, ...}, ...],
                 "twin":   [same, for the retain twin] | null,
                 "gap":    [{"step": k, <metric>: target − twin, ...}, ...] | null},
     "quantize": {"include_lm_head": bool, "layers": number of nn.Linear weights quantised,
                  "rows": [{"bits": null, "group_size": null, "granularity": "none", <metric>: ...},
                           {"bits": 8, "group_size": null, "granularity": "per_channel", ...},
                           {"bits": 8, "group_size": 128, "granularity": "group128", ...}, ...]}}

(a section only for an attack that ran; ``"model": {"uwc": {"original", "alpha"}}`` when the
attacked model is a UWC mixture, ``python -m fastgeffect.attacks --uwc-original``). Relearning
measures the evaluated half of the forget rows; quantisation measures all of them, the unquantised
model first.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

from .. import run_files as files
from ..data.templates import Template
from ..eval._common import check_records
from ..jsonfile import write_json
from .metrics import METRICS, ROUGE, forget_metrics
from .plot import plot_relearn
from .quantize import BITS, GROUP_SIZE, check_bits, check_group_size, quantized_copy, quantized_linears
from .relearn import BATCH_SIZE, LR, MAX_LENGTH, SEED, STEPS, check_steps, check_train_args, relearn_curve, split_forget

ATTACKS = ("relearn", "quantize")
GROUP_SIZES = (None, GROUP_SIZE)  # per output channel, then groups of 128 inputs
FILE = files.ATTACKS
PLOT = files.ATTACKS_PLOT


def check_attacks(attacks) -> tuple:
    names = (attacks,) if isinstance(attacks, str) else tuple(attacks)
    unknown = [a for a in names if a not in ATTACKS]
    if unknown or not names:
        raise ValueError(f"unknown attack {unknown[0]!r}; valid: {', '.join(ATTACKS)}" if unknown
                         else f"no attack named; valid: {', '.join(ATTACKS)}")
    return tuple(dict.fromkeys(names))


def _vocab(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def check_twin(model, twin) -> None:
    """The twin is scored with the target's tokenizer: it must have the target's vocabulary."""
    if twin is not None and _vocab(twin) != _vocab(model):
        raise ValueError(f"the retain twin has a vocabulary of {_vocab(twin)} tokens but the model {_vocab(model)}: "
                         "the twin must share the model's tokenizer")


def granularity(group_size: Optional[int]) -> str:
    return "per_channel" if group_size is None else f"group{group_size}"


def _as_tuple(values) -> tuple:
    return tuple(values) if isinstance(values, (list, tuple)) else (values,)


def check_attack_args(forget_records: Sequence[dict], *, attacks=ATTACKS, steps=STEPS, seed: int = SEED,
                      lr: float = LR, batch_size: int = BATCH_SIZE, bits=BITS, group_sizes=GROUP_SIZES) -> tuple:
    """:func:`run_attacks`' checks that need no model (a CLI runs them before loading one); the
    attack names, deduplicated."""
    names = check_attacks(attacks)
    check_records(forget_records, ("question", "answer"), "the attacks' forget rows")
    if "relearn" in names:
        check_steps(steps)
        check_train_args(lr, batch_size)
        split_forget(len(forget_records), seed)
    if "quantize" in names:
        bits, group_sizes = _as_tuple(bits), _as_tuple(group_sizes)
        if not bits or not group_sizes:
            raise ValueError("the quantisation attack needs at least one bit width and one granularity")
        for b in bits:
            check_bits(b)
        for g in group_sizes:
            check_group_size(g)
    return names


def run_attacks(model, tokenizer, template: Template, forget_records: Sequence[dict], *,
                out_dir: Union[str, Path], attacks=ATTACKS, twin=None, steps=STEPS, seed: int = SEED,
                lr: float = LR, batch_size: int = BATCH_SIZE, bits=BITS, group_sizes=GROUP_SIZES,
                include_lm_head: bool = True, rouge: bool = False, max_length: int = MAX_LENGTH,
                eval_batch_size: int = 32, model_info: Optional[dict] = None) -> dict:
    """Run ``attacks`` (``relearn``, ``quantize``) on ``model`` over ``forget_records`` (TOFU rows),
    the relearning one also on ``twin`` (the retain model: the control) when given; write
    ``out_dir/attacks.json`` (module docstring) and, after relearning, ``out_dir/attacks_relearn.png``.
    ``model_info`` (what the attacked model is, e.g. a UWC mixture) is recorded as ``"model"``.
    Returns what attacks.json holds. Every argument is checked before any model runs or any file is
    written; ``model`` and ``twin`` are never changed (the attacks work on copies)."""
    names = check_attack_args(forget_records, attacks=attacks, steps=steps, seed=seed, lr=lr, batch_size=batch_size,
                              bits=bits, group_sizes=group_sizes)
    check_twin(model, twin)
    bits, group_sizes = _as_tuple(bits), _as_tuple(group_sizes)

    def measure(m, rows):
        return forget_metrics(m, tokenizer, template, rows, rouge=rouge, max_length=max_length,
                              batch_size=eval_batch_size)

    out = {"forget_rows": len(forget_records), "metrics": list(METRICS) + ([ROUGE] if rouge else [])}
    if model_info is not None:
        out["model"] = dict(model_info)
    if "relearn" in names:
        split = split_forget(len(forget_records), seed)
        out["relearn"] = _relearn(model, twin, tokenizer, template, forget_records, split, measure,
                                  steps=list(check_steps(steps)), seed=int(seed), lr=float(lr),
                                  batch_size=int(batch_size), max_length=max_length)
    if "quantize" in names:
        out["quantize"] = _quantize(model, forget_records, measure, bits, group_sizes, include_lm_head)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / FILE, out)
    if "relearn" in names:
        plot_relearn(out["relearn"], out["metrics"], out_dir / PLOT)
    return out


def _relearn(model, twin, tokenizer, template, records, split, measure, **train) -> dict:
    train_rows, eval_rows = split
    trained = [records[i] for i in train_rows]
    measured = [records[i] for i in eval_rows]

    def curve(m):
        return relearn_curve(m, tokenizer, template, trained, lambda w: measure(w, measured), **train)

    target = curve(model)
    control = curve(twin) if twin is not None else None
    gap = None if control is None else [
        {"step": t["step"], **{k: t[k] - c[k] for k in t if k not in ("step", "train_loss")}}
        for t, c in zip(target, control)]
    return {**train, "train_rows": train_rows, "eval_rows": eval_rows, "target": target, "twin": control, "gap": gap}


def _quantize(model, records, measure, bits, group_sizes, include_lm_head) -> dict:
    rows = [{"bits": None, "group_size": None, "granularity": "none", **measure(model, records)}]
    for b in bits:
        for g in group_sizes:
            q = quantized_copy(model, b, g, include_lm_head=include_lm_head)
            rows.append({"bits": b, "group_size": g, "granularity": granularity(g), **measure(q, records)})
            del q
    return {"include_lm_head": include_lm_head, "layers": len(quantized_linears(model, include_lm_head)),
            "rows": rows}
