"""Rebuilds every table of docs/studies/smollm2-privacy.md from the logs committed under
docs/studies/smollm2-privacy/logs/ (as docs/studies/smollm2-privacy.sh copies them: each run's
config, timing, metrics_*.json, attacks.json and per-row membership scores; the attacks on the
target and on the UWC models; the retain twin's per-row Min-K% scores).

    python docs/studies/smollm2_privacy_tables.py            # print the tables
    python docs/studies/smollm2_privacy_tables.py --check    # exit 1 unless the document holds them
    python docs/studies/smollm2_privacy_tables.py --write    # put them into the document

Intervals: 95 % percentile bootstrap over rows (forget and holdout rows resampled separately, the
twin's rows paired with the model's for PrivLeak), 2000 resamples, seeded, so the tables rebuild
byte for byte.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the checkout's package, without an install

from fastgeffect.eval.mia import roc_auc  # noqa: E402
from fastgeffect.eval.privleak import privleak  # noqa: E402

LOGS = HERE / "smollm2-privacy" / "logs"  # not "runs/": .gitignore keeps run folders out
DOC = HERE / "smollm2-privacy.md"
BLOCK = re.compile(r"(<!-- table: (?P<name>[a-z0-9-]+) -->\n)(?P<body>.*?)(<!-- end table -->)", re.S)
RUNS = (("ga-none", "GA"), ("npo-none", "NPO"))
MIAS = ("mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus", "mia_reference", "mia_gradnorm")
ATTACK_METRICS = (("nll", "forget NLL"), ("exact_memorization", "exact memorisation"),
                  ("extraction_strength", "extraction strength"))
RESAMPLES, SEED = 2000, 0


def read(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def load(logs: Path) -> dict:
    """The evaluated models in the tables' order: (label, metrics, per-row MIA scores, attacks)."""
    models = []
    for name, label in RUNS:
        run = logs / name
        if not run.is_dir():
            continue
        if not models:  # every run starts from the same (shared) evaluation of the target
            models.append(("Target (before unlearning)", read(run / "metrics_before.json"),
                           read(run / "mia_scores_before.json"), read(logs / "target-before" / "attacks.json")))
        alpha = (read(run / "metrics_uwc.json") or {}).get("alpha")
        method = name.split("-")[0]
        models.append((label, read(run / "metrics_after.json"), read(run / "mia_scores_after.json"),
                       read(run / "attacks.json")))
        models.append((f"{label} + UWC (α {fmt(alpha)})", read(run / "metrics_uwc.json"),
                       read(run / "mia_scores_uwc.json"), read(logs / f"{method}-uwc" / "attacks.json")))
    timing = {name: read(logs / name / "timing.json") for name, _ in RUNS}
    return {"models": models, "twin": read(logs / "twin_mia_min_k.json"), "timing": timing}


def fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{digits}g}"


def table(head: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def auc_of(forget, holdout) -> float:
    # the package's convention: forget rows (members) label 0, holdout rows label 1
    return roc_auc([0] * len(forget) + [1] * len(holdout), list(forget) + list(holdout))


def resampled_counts(n_forget: int, n_holdout: int):
    """How often each forget and each holdout row is drawn in each of the seeded resamples: two
    (resamples × rows) count matrices."""
    rng = np.random.default_rng(SEED)
    f = rng.integers(0, n_forget, (RESAMPLES, n_forget))
    h = rng.integers(0, n_holdout, (RESAMPLES, n_holdout))
    count = lambda idx, n: np.stack([np.bincount(row, minlength=n) for row in idx]).astype(np.float64)  # noqa: E731
    return count(f, n_forget), count(h, n_holdout)


def resampled_aucs(forget, holdout) -> np.ndarray:
    """The AUC of every resample at once: the Mann–Whitney pair matrix of the rows (a holdout row
    above a forget row 1, a tie ½: roc_auc's own count) weighted by how often each row was drawn."""
    f, h = np.asarray(forget, dtype=np.float64), np.asarray(holdout, dtype=np.float64)
    pairs = (h[None, :] > f[:, None]) + 0.5 * (h[None, :] == f[:, None])
    cf, ch = resampled_counts(len(f), len(h))
    return np.einsum("bi,ij,bj->b", cf, pairs, ch) / (len(f) * len(h))


def interval(values) -> str:
    lo, hi = np.percentile(values, [2.5, 97.5])
    return f"[{fmt(float(lo))}, {fmt(float(hi))}]"


def auc_cell(scores: dict) -> str:
    f, h = scores["forget_scores"], scores["holdout_scores"]
    return f"{fmt(auc_of(f, h))} {interval(resampled_aucs(f, h))}"


def privleak_cell(scores: dict, twin: dict) -> str:
    f, h = scores["forget_scores"], scores["holdout_scores"]
    tf, th = twin["forget_scores"], twin["holdout_scores"]
    if (len(f), len(h)) != (len(tf), len(th)):
        raise SystemExit(f"the twin's scores cover {len(tf)} + {len(th)} rows, the model's {len(f)} + {len(h)}")
    # the same seeded resamples for the model and the twin: the rows are paired
    boot = [privleak(a, b) for a, b in zip(resampled_aucs(f, h), resampled_aucs(tf, th))]
    return f"{fmt(privleak(auc_of(f, h), auc_of(tf, th)))} {interval(boot)}"


def metrics_table(data: dict) -> str:
    cols = (("PS-exact forget", "forget PS-exact"), ("PS-exact retain", "retain PS-exact"),
            ("Model Utility", "Model Utility"), ("Forget Quality", "Forget Quality"),
            ("exact_memorization", "exact_memorization"), ("extraction_strength", "extraction_strength"))
    rows = [[label] + [fmt((m or {}).get(k)) for k, _ in cols] for label, m, _, _ in data["models"]]
    return table(["model"] + [c for _, c in cols], rows)


def mia_table(data: dict) -> str:
    rows = []
    for label, m, scores, _ in data["models"]:
        per = (scores or {}).get("per_sample", {})
        for k in MIAS:  # the per-row scores must give the AUC the evaluation reported
            if k in per and abs(auc_of(per[k]["forget_scores"], per[k]["holdout_scores"]) - m[k]) > 1e-9:
                raise SystemExit(f"{label}: {k}'s per-row scores do not give the reported AUC {m[k]}")
        cells = [auc_cell(per[k]) if k in per else "–" for k in MIAS]
        rows.append([label] + cells + [privleak_cell(per["mia_min_k"], data["twin"])
                                       if "mia_min_k" in per and data["twin"] else "–"])
    twin = data["twin"]
    if twin:
        rows.append(["Retain twin (PrivLeak's reference)"] + ["–", "–", auc_cell(twin), "–", "–", "–", "0"])
    return table(["model"] + list(MIAS) + ["privleak"], rows)


def twin_curves(data: dict) -> Optional[list]:
    """The twin's relearning curve: one attack's, after checking every attack file holds the same one
    (the control is deterministic by seed)."""
    curves = [a["relearn"]["twin"] for _, _, _, a in data["models"] if a and a.get("relearn", {}).get("twin")]
    for c in curves[1:]:
        if c != curves[0]:
            raise SystemExit("the attack files hold different relearning curves of the retain twin")
    return curves[0] if curves else None


def relearn_table(data: dict) -> str:
    steps = None
    rows = []
    for label, _, _, a in data["models"]:
        if not a or "relearn" not in a:
            continue
        curve = a["relearn"]["target"]
        steps = steps or [p["step"] for p in curve]
        rows.append([label] + [f"{fmt(p['nll'])} / {fmt(p['exact_memorization'])}" for p in curve])
    twin = twin_curves(data)
    if twin:
        rows.append(["Retain twin (control)"] + [f"{fmt(p['nll'])} / {fmt(p['exact_memorization'])}" for p in twin])
    return table(["model"] + [f"k = {k}" for k in steps or []], rows)


def quantize_table(data: dict) -> str:
    head, rows = None, []
    for label, _, _, a in data["models"]:
        if not a or "quantize" not in a:
            continue
        q = a["quantize"]["rows"]
        head = head or ["none" if r["bits"] is None else f"{r['bits']}-bit {r['granularity']}" for r in q]
        rows.append([label] + [f"{fmt(r['nll'])} / {fmt(r['exact_memorization'])} / {fmt(r['extraction_strength'])}"
                               for r in q])
    return table(["model"] + (head or []), rows)


def cost_table(data: dict) -> str:
    phases = ("eval_before", "unlearn", "eval_after", "uwc", "attacks")
    rows = []
    for name, label in RUNS:
        timing = data["timing"].get(name)
        if not timing:
            continue
        sums = {p: sum(t.get(p, 0.0) for t in timing) for p in phases}
        rows.append([label] + [f"{sums[p]:.0f}" for p in phases])
    return table(["run"] + [f"{p} (s)" for p in phases], rows)


TABLES = {"metrics": metrics_table, "mia": mia_table, "relearn": relearn_table, "quantize": quantize_table,
          "cost": cost_table}


def build(logs: Path = LOGS) -> Dict[str, str]:
    data = load(logs)
    return {name: fn(data) for name, fn in TABLES.items()}


def fill(doc: str, tables: Dict[str, str]) -> str:
    def sub(m):
        name = m.group("name")
        if name not in tables:
            raise SystemExit(f"unknown table {name!r} in the document; known: {', '.join(tables)}")
        return m.group(1) + tables[name] + m.group(4)
    return BLOCK.sub(sub, doc)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 unless the document holds these tables")
    mode.add_argument("--write", action="store_true", help="write the tables into the document")
    ap.add_argument("--logs", type=Path, default=LOGS, help="the logs' folder (default: the committed one)")
    ap.add_argument("--doc", type=Path, default=DOC, help="the document (default: smollm2-privacy.md)")
    args = ap.parse_args(argv)
    if not args.logs.is_dir():
        print(f"--logs {args.logs}: no such folder", file=sys.stderr)
        return 2
    tables = build(args.logs)
    if not (args.check or args.write):
        for name, text in tables.items():
            print(f"<!-- table: {name} -->\n{text}<!-- end table -->\n")
        return 0
    doc = args.doc.read_text()
    found = {m.group("name") for m in BLOCK.finditer(doc)}
    missing = [n for n in tables if n not in found]
    if missing:
        print(f"{args.doc.name} has no block for the tables {missing}", file=sys.stderr)
        return 1
    new = fill(doc, tables)
    if args.write:
        args.doc.write_text(new)
        return 0
    if new != doc:
        print(f"{args.doc.name}: its tables differ from what the logs in {args.logs} give; "
              f"rebuild them with --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
