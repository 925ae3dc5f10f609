"""The privacy and memorisation metrics of a run's evaluations (``--eval-metrics``; docs/design.md
§5.4): which families it computes, the holdout rows (non-members) and PrivLeak's reference AUC,
each decided once before the evaluation before unlearning, and the metrics of one model.

PrivLeak's reference is the retain twin's Min-K% AUC on the same forget and holdout rows: an
open-unlearning retain log's ``mia_min_k`` when ``--retain-log`` is one, else computed for the
twin (kept in the shared folder with its fingerprint), else 0.5 (no twin), which the summary says.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..data.holdout import check_holdout, holdout_file, load_holdout
from ..data.tofu import RETAIN_OF, load_tofu_split
from ..eval.memorization import memorization_scores
from ..eval.mia import DEFAULT_K, mia_auc, mia_report
from ..eval.open_unlearning_retain import privleak_reference
from ..eval.privleak import privleak
from ..jsonfile import write_json
from .artefacts import cached, load_json_dict, retain_log_fingerprint
from .config import RunConfig, eval_metrics
from .targets import Target

NO_TWIN_AUC = 0.5  # PrivLeak's reference without a retain twin (open-unlearning's ref_value)
MIA_SCORES = "mia_scores.json"  # per-sample membership scores, in each evaluation's log folder


@dataclass(frozen=True)
class PrivacyInputs:
    """What every evaluation of a run shares: the metric families, the holdout rows (None: no
    PrivLeak / MIA), PrivLeak's reference AUC and a note saying where it came from."""
    families: tuple
    holdout: Optional[list] = None
    reference_auc: Optional[float] = None
    note: Optional[str] = None
    max_length: Optional[int] = None  # the membership scores' encoding length (:func:`mia_length`)

    def fingerprint(self) -> dict:
        """What the metrics depend on beyond the model and the TOFU sets (for cached evaluations)."""
        return {"families": list(self.families), "holdout": None if self.holdout is None else len(self.holdout),
                "reference_auc": self.reference_auc, "max_length": self.max_length}


def mia_length(target: Target, rows: list, eval_length: int) -> int:
    """The token length the membership scores encode with: the evaluation length, raised to fit
    the longest forget or holdout row whole (within the model's positions). Truncating would cut
    more of the rows the tokenizer was not fitted to (holdout names) than of the members, and score
    the cut, not the rows."""
    add = not target.template.chat
    longest = max(len(target.tokenizer(target.template.full(r["question"], r["answer"], target.tokenizer),
                                       add_special_tokens=add)["input_ids"]) + 1 for r in rows)  # + EOS
    limit = getattr(getattr(target.model, "config", None), "max_position_embeddings", None) or longest
    return max(eval_length, min(longest, limit))


def holdout_rows(target: Target, sets, cfg: RunConfig, families: tuple) -> Optional[list]:
    """The first ``--eval-size`` holdout rows, checked against every trained row (forget and retain
    splits); None when the data has no holdout file and the families were not asked for by name."""
    try:
        rows = load_holdout(cfg.split, target.data_dir)
        if rows is None:
            where = holdout_file(cfg.split, target.data_dir)
            if cfg.eval_metrics is not None:
                raise SystemExit(f"--eval-metrics {cfg.eval_metrics} needs holdout rows (authors never trained on) "
                                 f"and the data has no {where}: drop privleak/mia, or add TOFU's holdout file")
            return None
        trained = load_tofu_split(cfg.split, target.data_dir) + load_tofu_split(RETAIN_OF[cfg.split], target.data_dir)
        check_holdout(rows, forget=trained, retain=sets.get("retain", []))
    except ValueError as e:
        raise SystemExit(f"holdout rows: {e}") from None
    return rows[: cfg.eval_size]


def _twin_auc(target: Target, sets, cfg: RunConfig, shared: Path, holdout: list, max_length: int) -> float:
    """The retain twin's Min-K% AUC on the run's forget and holdout rows, kept in ``shared``."""
    device = next(target.model.parameters()).device

    def compute(path: Path) -> dict:
        twin = target.load_retain().to(device)
        auc = mia_auc(twin, target.tokenizer, target.template, sets["forget"][: cfg.eval_size], holdout,
                      attack="mia_min_k", batch_size=cfg.eval_batch_size, max_length=max_length)["auc"]
        write_json(path, {"mia_min_k": auc})
        return {"mia_min_k": auc}
    fingerprint = {**retain_log_fingerprint(target, cfg.split, cfg.eval_size), "artefact": "retain_model_mia_min_k",
                   "holdout_rows": len(holdout), "k": DEFAULT_K, "max_length": max_length}
    return cached(shared / "retain_model" / "mia_min_k.json", fingerprint, compute, load_json_dict,
                  recompute=cfg.overwrite, lock_dir=shared)["mia_min_k"]


def privacy_inputs(target: Target, sets, cfg: RunConfig, shared: Path, retain_log, max_length: int) -> PrivacyInputs:
    """The families ``--eval-metrics`` asks for, the holdout rows and PrivLeak's reference: all
    checked before anything is evaluated."""
    families = eval_metrics(cfg)
    if not {"privleak", "mia"} & set(families):
        return PrivacyInputs(families)
    holdout = holdout_rows(target, sets, cfg, families)
    if holdout is not None:
        max_length = mia_length(target, sets["forget"][: cfg.eval_size] + holdout, max_length)
    if holdout is None:
        note = (f"PrivLeak and the membership-inference AUCs are not computed: the data has no "
                f"{holdout_file(cfg.split, target.data_dir).name} (holdout rows)")
        print(f"note: {note}", file=sys.stderr)
        return PrivacyInputs(tuple(f for f in families if f not in ("privleak", "mia")), note=note)
    ref = privleak_reference(retain_log) if retain_log else None
    if ref is not None:
        return PrivacyInputs(families, holdout, ref, f"PrivLeak against --retain-log's mia_min_k AUC {ref:.4g}",
                             max_length)
    if target.load_retain is not None:
        ref = _twin_auc(target, sets, cfg, shared, holdout, max_length)
        return PrivacyInputs(families, holdout, ref, f"PrivLeak against the retain twin's Min-K% AUC {ref:.4g} "
                                                     f"on the same {len(holdout)} holdout rows", max_length)
    return PrivacyInputs(families, holdout, NO_TWIN_AUC,
                         f"PrivLeak against AUC {NO_TWIN_AUC} (no retain twin: pass --retain-model or an "
                         "open-unlearning --retain-log with mia_min_k)", max_length)


def privacy_metrics(model, target: Target, sets, cfg: RunConfig, privacy: PrivacyInputs, out_dir: Path,
                    eval_length: int) -> dict:
    """The metrics of ``privacy.families`` for ``model`` under open-unlearning's names (memorisation
    at the evaluation length ``eval_length``, as TOFU's losses); per-sample membership scores go to
    ``out_dir/mia_scores.json``."""
    forget = sets["forget"][: cfg.eval_size]
    kw = dict(batch_size=cfg.eval_batch_size, max_length=privacy.max_length)
    metrics: dict = {}
    if "memorization" in privacy.families:
        mem = memorization_scores(model, target.tokenizer, target.template, forget, batch_size=cfg.eval_batch_size,
                                  max_length=eval_length)
        metrics.update(exact_memorization=mem["em"], extraction_strength=mem["es"])
    if privacy.holdout is None:
        return metrics
    if "mia" in privacy.families:
        twin = target.load_retain().to(next(model.parameters()).device) if target.load_retain else None
        report = mia_report(model, target.tokenizer, target.template, forget, privacy.holdout,
                            reference_model=twin, **kw)
    else:
        one = mia_auc(model, target.tokenizer, target.template, forget, privacy.holdout, attack="mia_min_k", **kw)
        report = {"mia_min_k": one["auc"], "per_sample": {"mia_min_k": {k: one[k] for k in ("forget_scores",
                                                                                             "holdout_scores")}}}
    per_sample = report.pop("per_sample")
    metrics.update(report)
    metrics["privleak"] = privleak(report["mia_min_k"], privacy.reference_auc)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / MIA_SCORES, {"reference_auc": privacy.reference_auc, "max_length": privacy.max_length,
                                      "per_sample": per_sample})
    return metrics
