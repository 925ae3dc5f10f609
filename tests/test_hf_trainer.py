"""UnlearningTrainer: every registered objective trains on a tiny Llama; accumulation is exact."""
import copy

import pytest
import torch
from helpers.tiny_models import qa_batch, tiny_llama
from transformers import TrainingArguments

from fastgeffect.integrations.hf import UnlearningTrainer
from fastgeffect.objectives import OBJECTIVES, get_objective
from fastgeffect.reference import ReferenceModel, RefLogprobCache


class PairedToy(torch.utils.data.Dataset):
    """Items of paired forget/retain/refusal samples with varying answer lengths."""

    def __init__(self, n=8):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        def one(seed, index):
            b = qa_batch(seed, b=1, t=10)
            b["index"] = torch.tensor([index])
            return {k: v[0] for k, v in b.items()}
        return {"forget": one(i, i), "retain": one(1000 + i, 1000 + i), "forget_idk": one(2000 + i, i),
                "forget_win": one(3000 + i, i)}


def args(tmp_path, bs, ga, steps):
    return TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                             max_steps=steps, learning_rate=1e-2, optim="sgd", lr_scheduler_type="constant",
                             report_to=[], logging_steps=1, save_strategy="no", use_cpu=True, seed=0,
                             dataloader_drop_last=False)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_trains(tmp_path, name):
    model = tiny_llama()
    before = [p.detach().clone() for p in model.parameters()]
    ref = ReferenceModel(copy.deepcopy(model))
    # on an untrained model p ≈ 1/V: soften the weights that would otherwise vanish (p^5, σ(−β·NLL))
    hp = {"wga": {"alpha": 0.5}, "simnpo": {"delta": 4.0}}.get(name, {})
    obj = get_objective(name, reference=ref, **hp)
    trainer = UnlearningTrainer(model=model, args=args(tmp_path, 4, 1, 3), train_dataset=PairedToy(), objective=obj)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert "unlearn/forget_loss" in logs[0]
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("name,reg", [("tnpo", "gd"), ("npo", "kl"), ("rmu", "rr")])
def test_accumulation_matches_one_big_batch(tmp_path, name, reg):
    base = tiny_llama(seed=1)
    ref = ReferenceModel(copy.deepcopy(base))
    data = PairedToy(8)
    cache = RefLogprobCache.compute(ref, [torch.utils.data.default_collate([data[i] for i in range(8)])["forget"]])
    results = []
    for bs, ga in ((8, 1), (4, 2), (2, 4)):
        model = copy.deepcopy(base)
        obj = get_objective(name, regularizer=reg, reference=ref, ref_cache=cache)
        UnlearningTrainer(model=model, args=args(tmp_path / f"{bs}", bs, ga, 1), train_dataset=data,
                          objective=obj).train()
        results.append([p.detach().clone() for p in model.parameters()])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(a, p) for a, p in zip(results[0], base.parameters()))


def test_pdu_dual_variable_moves_after_each_step(tmp_path):
    # λ_{k+1} = max(0, λ_k + η·(reg_k − ε)), reg_k the step's whole retain loss (two micro-batches)
    model = tiny_llama(seed=2)
    obj = get_objective("ga", regularizer="gd", lam=1.0, constraint_eps=5.0, dual_step=0.5)
    trainer = UnlearningTrainer(model=model, args=args(tmp_path, 2, 2, 4), train_dataset=PairedToy(16),
                                objective=obj)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "unlearn/lam" in h]
    assert len(logs) == 4
    lam = 1.0
    for h in logs:
        lam = max(0.0, lam + 0.5 * (h["unlearn/reg_loss"] - 5.0))
        assert h["unlearn/lam"] == pytest.approx(lam, rel=1e-12, abs=1e-12)
    assert obj.lam == pytest.approx(lam) and obj.lam != 1.0
    with pytest.raises(ValueError, match="cannot resume a PDU run"):
        trainer.train(resume_from_checkpoint=str(tmp_path))
