"""fastgeffect.geffect.risk: the one risk module (NLL risk, the loop's risk rows, the rank shares,
the checks), importable by the Hugging Face callback without the loop."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.model_families import qa_batch, tiny_model

from fastgeffect.geffect.risk import (
    fixed_forget_items,
    fixed_retain_items,
    forget_risk_items,
    n_tokens,
    nll_risk,
    nll_risk_on,
    retain_risk_items,
)

ROOT = Path(__file__).resolve().parents[1]


def items(n, seed=0):
    """QADataset-like rows (1-D tensors and an index), of different answer lengths."""
    b = qa_batch(seed, b=n)
    return [{**{k: v[i] for k, v in b.items()}, "index": i} for i in range(n)]


def test_the_callback_takes_its_risk_without_the_loop():
    code = ("import sys, fastgeffect.integrations.hf_callback as cb, fastgeffect.geffect.risk as risk; "
            "print(cb.nll_risk is risk.nll_risk, 'fastgeffect.unlearn' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    assert out.stdout.split() == ["True", "False"]


def test_the_loop_reexports_nll_risk():
    from fastgeffect.unlearn import nll_risk as from_the_loop
    assert from_the_loop is nll_risk


@pytest.mark.parametrize("world", [2, 3, 7])
def test_rank_shares_sum_to_the_risk_of_all_rows(world):
    model = tiny_model("llama", layers=2, dtype=torch.float64)
    rows = items(5)
    whole = float(nll_risk_on(model, rows, torch.device("cpu"))().detach())
    shares = [float(nll_risk_on(model, rows, torch.device("cpu"), rank=r, world=world)().detach())
              for r in range(world)]
    assert sum(shares) == pytest.approx(whole, rel=1e-12)
    assert all(s == 0.0 for s in shares[5:])  # ranks without rows join with a zero-weight copy
    assert n_tokens(rows) == sum(int((it["labels"][1:] != -100).sum()) for it in rows) > 0


def test_risk_rows():
    class Pairs:  # ForgetRetainDataset-like: index -> {"forget": row, ...}
        def __getitem__(self, i):
            return {"forget": {"index": i}}
    assert [r["index"] for r in forget_risk_items(Pairs(), ((4, 1), (0, 3)), 3)] == [4, 1, 0]
    heldout = [{"index": i} for i in range(10)]
    a, b = retain_risk_items(heldout, 3, 7, 4), retain_risk_items(heldout, 3, 7, 4)
    assert a == b and len({r["index"] for r in a}) == 4  # seeded, without repeats
    assert retain_risk_items(heldout, 3, 8, 4) != a  # a fresh draw at every step
    assert len(retain_risk_items(heldout, 3, 7, 50)) == 10


def test_fixed_risk_rows_are_one_seeded_draw():
    forget, heldout = [{"index": i} for i in range(10)], [{"index": 100 + i} for i in range(40)]
    a = fixed_forget_items(forget, 3, 4)
    assert a == fixed_forget_items(forget, 3, 4) and len({r["index"] for r in a}) == 4  # seeded, without repeats
    assert fixed_forget_items(forget, 4, 4) != a  # another seed: other rows
    assert len(fixed_forget_items(forget, 3, 50)) == 10  # at most every row
    r = fixed_retain_items(heldout, 3, 8)
    assert r == fixed_retain_items(heldout, 3, 8) and len({x["index"] for x in r}) == 8
    assert fixed_retain_items(heldout, 4, 8) != r
    # not any step's draw (the fixed draw's generator seeds lie apart from the per-step ones)
    assert all(r != retain_risk_items(heldout, 3, step, 8) for step in range(50))
