"""Raw-text unlearning data: a forget corpus and a retain corpus (MUSE's ``raw`` subset, or WMDP's
corpora in its shape: :func:`wmdp_raw`) in the shape :class:`.unlearning.UnlearningData` gives
the objectives, the loop and the G-effects.

Every token of an article is an answer token, in windows of ``max_length`` tokens ``stride`` apart
(:class:`.raw_text.TextWindowDataset`). The unlearning pairs each forget window with a window of
``retain1`` (the retain data the unlearning may train on, as MUSE's baselines do); ``retain2``,
which the target saw but the unlearning never trains on, is the held-out retain data of the
retaining G-effects — the part TOFU's ``retain_perturbed`` plays.
"""
from __future__ import annotations

import math
import random
from typing import Dict, List, Sequence

from .pairs import ForgetRetainDataset
from .raw_text import TextWindowDataset
from .unlearning import UnlearningData

HELDOUT_SHARE = 0.1  # of a WMDP retain corpus: never trained on by the unlearning, the retaining G-effects' data


def wmdp_raw(forget: Sequence[str], retain: Sequence[str], seed: int) -> Dict[str, List[str]]:
    """WMDP's corpora in MUSE's raw splits: the forget corpus, and the retain corpus split once per
    ``seed`` into the part the unlearning trains on (``retain1``) and a held-out tenth (``retain2``)."""
    if len(retain) < 2:
        raise ValueError(f"the retain corpus has {len(retain)} document(s); at least 2 are needed (one held out)")
    order = list(range(len(retain)))
    random.Random(seed).shuffle(order)
    n_held = max(1, math.ceil(HELDOUT_SHARE * len(retain)))
    held = set(order[:n_held])
    return {"forget": list(forget), "retain1": [t for i, t in enumerate(retain) if i not in held],
            "retain2": [t for i, t in enumerate(retain) if i in held]}


def load_raw_unlearning_data(raw: dict, tokenizer, max_length: int, stride: int, *, seed: int = 0,
                             rank: int = 0) -> UnlearningData:
    """``raw``: MUSE's raw splits, ``{"forget": [text, ...], "retain1": [...], "retain2": [...]}``."""
    missing = [s for s in ("forget", "retain1", "retain2") if not raw.get(s)]
    if missing:
        raise ValueError(f"raw-text unlearning needs the forget, retain1 and retain2 corpora; "
                         f"empty or missing: {', '.join(missing)}")
    forget = TextWindowDataset(raw["forget"], tokenizer, max_length, stride)
    retain = TextWindowDataset(raw["retain1"], tokenizer, max_length, stride)
    heldout = TextWindowDataset(raw["retain2"], tokenizer, max_length, stride)
    return UnlearningData(ForgetRetainDataset(forget, retain, seed=seed, rank=rank), forget, retain, heldout)
