"""The retain twin's per-row Min-K% scores on a run's forget and holdout rows, for PrivLeak's
bootstrap interval in docs/studies/smollm2-privacy.md (a run keeps only the twin's AUC).

    python docs/studies/smollm2_privacy_twin_scores.py RUN_FOLDER --out twin_mia_min_k.json

The rows, the token length and the model are the run's own (its config.json and its evaluation's
mia_scores.json); the AUC recomputed here must equal the one the run used for PrivLeak, which
proves the rows are the same, or nothing is written.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the checkout's package, without an install

from fastgeffect.data.holdout import load_holdout  # noqa: E402
from fastgeffect.data.templates import choose_template  # noqa: E402
from fastgeffect.data.tofu import load_tofu_split  # noqa: E402
from fastgeffect.driver.targets import tofu_subset  # noqa: E402
from fastgeffect.eval.mia import mia_auc  # noqa: E402
from fastgeffect.jsonfile import write_json  # noqa: E402
from fastgeffect.model_loading import load_causal_lm  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a run folder evaluated with PrivLeak against its retain twin")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    cfg = json.loads((args.run / "config.json").read_text())
    scores = json.loads((args.run / "eval_after" / "mia_scores.json").read_text())
    data_dir = tofu_subset(cfg["data_dir"], cfg["authors"], cfg.get("cache_dir")) if cfg.get("authors") \
        else cfg["data_dir"]
    n = cfg["eval_size"]
    forget = load_tofu_split(cfg["split"], str(data_dir))[:n]
    holdout = load_holdout(cfg["split"], data_dir)[:n]
    twin, tokenizer = load_causal_lm(cfg["retain_model"])
    template = choose_template(tokenizer, cfg.get("template"))
    res = mia_auc(twin, tokenizer, template, forget, holdout, attack="mia_min_k",
                  batch_size=cfg["eval_batch_size"], max_length=scores["max_length"])
    want = scores["reference_auc"]
    if abs(res["auc"] - want) > 1e-9:
        print(f"the twin's AUC here is {res['auc']} but the run used {want}: not the run's rows or model",
              file=sys.stderr)
        return 1
    write_json(args.out, {"retain_model": cfg["retain_model"], "rows": n, "max_length": scores["max_length"],
                          "mia_min_k": res["auc"], "forget_scores": res["forget_scores"],
                          "holdout_scores": res["holdout_scores"]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
