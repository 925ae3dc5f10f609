"""GEffectCallback under a plain HF ``Trainer`` with a GA ``compute_loss`` and gradient accumulation:
the logged G-effects equal ``−‖∇NLL(forget)‖²`` and ``−⟨∇NLL(retain), ∇NLL(forget)⟩`` computed
independently at the initial weights, however the callback is added (``callbacks=[...]``,
``add_callback``, ``attach``); training with the callback is training without it."""
import glob
import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers.ga_trainer import FORGET, RETAIN, Rows, ga_trainer
from helpers.launch_logs import launch_failure
from helpers.tiny_models import tiny_llama
from transformers import TrainerCallback, TrainingArguments

from fastgeffect import GEffect
from fastgeffect.geffect import build_grouping, read_geffect_log
from fastgeffect.integrations.hf import GEffectCallback, UnlearningTrainer
from fastgeffect.losses import nll
from fastgeffect.objectives import get_objective
from fastgeffect.unlearn import nll_risk

ROOT = Path(__file__).resolve().parents[1]


HOW = ("attach", "callbacks", "add_callback")  # the ways of adding the callback to a Trainer


def train(out_dir, model, lr, callback=None, how="attach", **kw):
    """The GA trainer with ``callback`` added ``how`` (one of :data:`HOW`), trained."""
    trainer = ga_trainer(out_dir, model, lr, callbacks=[callback] if callback and how == "callbacks" else None, **kw)
    if callback is not None and how == "attach":
        callback.attach(trainer)
    elif callback is not None and how == "add_callback":
        trainer.add_callback(callback)
    trainer.train()
    return trainer


def nll_grads(model, batch):
    model.zero_grad()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    nll(out.logits, batch["labels"]).backward()
    grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return grads


def expected_geffects(model):
    """Per-group and total G-effects of GA on FORGET, from the two NLL gradients at ``model``'s weights."""
    g_f, g_r = nll_grads(model, FORGET), nll_grads(model, RETAIN)
    grouping = build_grouping(model, "paper")
    group_of = {id(p): grouping.names[g] for p, g in zip(grouping.params, grouping.group_ids)}
    out = {"unlearn": {}, "retain": {}}
    for name, p in model.named_parameters():
        g = group_of[id(p)]
        for risk, grad in (("unlearn", g_f[name]), ("retain", g_r[name])):
            out[risk][g] = out[risk].get(g, 0.0) - float((grad * g_f[name]).sum())
    scale = {"unlearn": sum(float((g * g).sum()) for g in g_f.values()),
             "retain": math.sqrt(sum(float((g * g).sum()) for g in g_f.values())
                                 * sum(float((g * g).sum()) for g in g_r.values()))}
    return out, scale


def test_logged_geffects_of_ga_equal_the_gradient_products(tmp_path):
    model = tiny_llama(seed=0)
    expected, scale = expected_geffects(model)
    cb = GEffectCallback(risk_batches={"unlearn": FORGET, "retain": RETAIN}, out=str(tmp_path / "geffect.jsonl"))
    trainer = train(tmp_path / "run", model, lr=0.0, callback=cb)
    records = read_geffect_log(tmp_path / "geffect.jsonl")
    assert [(r["step"], r["risk"]) for r in records] == [(s, k) for s in range(3) for k in ("unlearn", "retain")]
    for r in records:
        tol = 1e-4 * scale[r["risk"]]
        assert set(r["groups"]) == set(expected[r["risk"]])
        for g, v in expected[r["risk"]].items():
            assert r["groups"][g] == pytest.approx(v, abs=tol), (r["step"], r["risk"], g)
        assert r["total"] == pytest.approx(math.fsum(expected[r["risk"]].values()), abs=tol)
    assert records[0]["total"] < 0  # GA raises the forget NLL: -||∇NLL||²
    with torch.no_grad():
        assert records[0]["risk_value"] == pytest.approx(float(nll_risk(model, FORGET)), rel=1e-6)
    logged = [h for h in trainer.state.log_history if "geffect/unlearn/total" in h]
    assert [h["step"] for h in logged] == [1, 2, 3]  # one entry per logged step, after the step's loss
    for h in logged:
        for risk in ("unlearn", "retain"):
            for g, v in expected[risk].items():
                assert h[f"geffect/{risk}/{g}"] == pytest.approx(v, abs=1e-4 * scale[risk])
        assert h["risk/unlearn"] == pytest.approx(records[0]["risk_value"], rel=1e-6)


def direct_geffects(model):
    """Per-group G-effects of one GA step on the whole forget batch (the gradient a step of the GA
    trainer accumulates) at ``model``'s weights, measured by :class:`fastgeffect.GEffect` itself."""
    ge = GEffect(model, groups="paper")
    model.zero_grad()
    (-nll_risk(model, FORGET)).backward()
    results = ge.measure({"unlearn": lambda: nll_risk(model, FORGET), "retain": lambda: nll_risk(model, RETAIN)})
    model.zero_grad()
    return {risk: res.groups for risk, res in results.items()}


def size(groups):
    """The size of a measurement's terms, Σ|group|: what a tolerance on any of them is relative to."""
    return math.fsum(abs(v) for v in groups.values())


def test_added_as_any_hf_callback_it_measures_and_logs_as_attached(tmp_path):
    """``Trainer(callbacks=[cb])``, ``trainer.add_callback(cb)`` and ``cb.attach(trainer)`` write the
    same records, equal to GEffect's own measurement, and put them into the step's loss log."""
    direct = direct_geffects(tiny_llama(seed=0))
    runs = {}
    for how in HOW:
        cb = GEffectCallback({"unlearn": FORGET, "retain": RETAIN}, out=str(tmp_path / f"{how}.jsonl"))
        trainer = train(tmp_path / how, tiny_llama(seed=0), lr=0.0, callback=cb, how=how)
        runs[how] = read_geffect_log(tmp_path / f"{how}.jsonl"), trainer.state.log_history
    for how, (records, history) in runs.items():
        assert [(r["step"], r["risk"]) for r in records] == [(s, k) for s in range(3) for k in ("unlearn", "retain")]
        for r, attached in zip(records, runs["attach"][0]):
            assert r["groups"] == pytest.approx(attached["groups"], abs=1e-6 * size(attached["groups"])), how
            want = direct[r["risk"]]
            assert r["groups"] == pytest.approx(want, abs=1e-4 * size(want)), (how, r["step"], r["risk"])
            assert r["total"] == pytest.approx(math.fsum(want.values()), abs=1e-4 * size(want)), how
        logged = [h for h in history if "geffect/unlearn/total" in h]
        assert [h["step"] for h in logged] == [1, 2, 3] and all("loss" in h for h in logged), how
        for h in logged:  # logging every step: each holds its step's two records
            for r in records[2 * h["step"] - 2:2 * h["step"]]:
                assert {g: h[f"geffect/{r['risk']}/{g}"] for g in r["groups"]} == r["groups"], how
                assert (h[f"geffect/{r['risk']}/total"], h[f"risk/{r['risk']}"]) == (r["total"], r["risk_value"])


class SeenLogs(TrainerCallback):
    """Keeps the keys of each log it is shown, as a ``report_to`` integration is shown them."""

    def __init__(self):
        self.seen = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(set(logs))


def test_the_values_reach_the_callbacks_after_it_and_attach_puts_it_first(tmp_path):
    """The report_to integrations are the Trainer's first callbacks: a callback in ``callbacks=[...]``
    adds its values for those after it (and the log history); ``attach`` makes it the first."""
    before, after, key = SeenLogs(), SeenLogs(), "geffect/unlearn/total"
    cb = GEffectCallback({"unlearn": FORGET}, out=None)
    trainer = ga_trainer(tmp_path / "listed", tiny_llama(), lr=0.0, callbacks=[before, cb, after])
    trainer.train()
    assert len(before.seen) == 4 and not any(key in keys for keys in before.seen)  # 3 loss logs, 1 summary
    assert [key in keys for keys in after.seen] == [True, True, True, False]
    assert sum(key in h for h in trainer.state.log_history) == 3
    first = SeenLogs()
    cb = GEffectCallback({"unlearn": FORGET}, out=None)
    trainer = ga_trainer(tmp_path / "attached", tiny_llama(), lr=0.0, callbacks=[first, cb])
    cb.attach(trainer)
    assert trainer.callback_handler.callbacks[0] is cb and trainer.callback_handler.callbacks.count(cb) == 1
    trainer.train()
    assert [key in keys for keys in first.seen] == [True, True, True, False]


def test_a_log_holds_the_mean_of_the_steps_measured_since_the_last(tmp_path):
    """Logging every 2 of 3 steps: the step-2 log holds the mean of steps 0 and 1, and the summary
    log at the end of training holds step 2, whose loss the Trainer never logs."""
    cb = GEffectCallback({"unlearn": FORGET, "retain": RETAIN}, out=str(tmp_path / "g.jsonl"))
    trainer = train(tmp_path / "run", tiny_llama(seed=1), lr=1.0, callback=cb, how="callbacks", logging_steps=2)
    records = {(r["step"], r["risk"]): r for r in read_geffect_log(tmp_path / "g.jsonl")}
    logged = [h for h in trainer.state.log_history if "geffect/unlearn/total" in h]
    assert [h["step"] for h in logged] == [2, 3] and "loss" in logged[0] and "train_loss" in logged[1]
    for risk in ("unlearn", "retain"):
        r0, r1, r2 = (records[s, risk] for s in range(3))
        tol = 1e-9 * size(r0["groups"])
        assert abs(r0["total"] - r1["total"]) > 1e3 * tol  # the weights moved: a mean of two differing steps
        for g in r0["groups"]:
            assert logged[0][f"geffect/{risk}/{g}"] == pytest.approx((r0["groups"][g] + r1["groups"][g]) / 2, abs=tol)
            assert logged[1][f"geffect/{risk}/{g}"] == r2["groups"][g]
        assert logged[0][f"risk/{risk}"] == pytest.approx((r0["risk_value"] + r1["risk_value"]) / 2, rel=1e-12)


def test_a_log_not_made_by_trainer_log_gets_an_entry_of_its_own():
    model = tiny_llama(seed=0)
    (-nll_risk(model, FORGET)).backward()
    cb = GEffectCallback({"unlearn": FORGET}, out=None)
    cb.on_pre_optimizer_step(None, SimpleNamespace(global_step=0), None, model=model)
    logs, state = {"custom": 1.0}, SimpleNamespace(global_step=1, log_history=[{"other": 2.0, "step": 0}])
    cb.on_log(None, state, None, logs=logs)
    assert logs.keys() == {"custom", "geffect/unlearn/total", "risk/unlearn"} | {
        f"geffect/unlearn/{g}" for g in ("embed", "shallow", "middle", "deep", "lm")}
    assert state.log_history == [{"other": 2.0, "step": 0}, {**{k: logs[k] for k in logs if k != "custom"}, "step": 1}]
    assert logs["geffect/unlearn/total"] < 0  # GA on the risk's own batch


def test_training_with_the_callback_is_training_without_it(tmp_path):
    base = tiny_llama(seed=3)
    results = []
    for name, cb in (("plain", None), ("measured", GEffectCallback({"unlearn": FORGET, "retain": RETAIN}, out=None))):
        model = tiny_llama(seed=3)
        model.load_state_dict(base.state_dict())
        train(tmp_path / name, model, lr=0.05, callback=cb, max_grad_norm=1.0)  # clipping on, as by default
        results.append([p.detach().clone() for p in model.parameters()])
    assert any(not torch.equal(a, b) for a, b in zip(results[0], base.parameters()))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_geffects_reach_tensorboard_through_report_to(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # optional test dependency

    cb = GEffectCallback({"unlearn": FORGET}, every=2, groups="blocks", out=None)
    train(tmp_path, tiny_llama(), lr=0.0, callback=cb, report_to=["tensorboard"])
    files = glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True)
    assert files
    acc = EventAccumulator(files[0]).Reload()
    tags = set(acc.Tags()["scalars"])
    want = {"train/geffect/unlearn/total", "train/risk/unlearn", "train/loss"}
    want |= {f"train/geffect/unlearn/block.{i}" for i in range(3)}
    assert want <= tags, sorted(tags)
    # measured at steps 0 and 2 (every=2): logged with the losses of steps 1 and 3
    assert [e.step for e in acc.Scalars("train/geffect/unlearn/total")] == [1, 3]


def test_bad_arguments_are_refused_with_their_name():
    with pytest.raises(ValueError, match="non-empty dict"):
        GEffectCallback({})
    with pytest.raises(ValueError, match=r"lacks \['labels'\]"):
        GEffectCallback({"unlearn": {"input_ids": FORGET["input_ids"], "attention_mask": FORGET["attention_mask"]}})
    with pytest.raises(ValueError, match="every"):
        GEffectCallback({"unlearn": FORGET}, every=0)
    with pytest.raises(TypeError, match="risk_fn"):
        GEffectCallback({"unlearn": FORGET}, risk_fn="nll")


def test_what_cannot_be_measured_is_refused_before_training(tmp_path, monkeypatch):
    cb = GEffectCallback({"unlearn": FORGET}, out=None)
    state = SimpleNamespace(is_world_process_zero=True, global_step=0)
    plain = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    cb.on_train_begin(plain, state, None)
    # DeepSpeed, as TrainingArguments(deepspeed=...) and `accelerate launch` with a DeepSpeed config set it up
    ds = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                           deepspeed={"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}})
    with pytest.raises(NotImplementedError, match="DeepSpeed"):
        cb.on_train_begin(ds, state, None)
    with pytest.raises(NotImplementedError, match="fp16"):
        cb.on_train_begin(SimpleNamespace(fp16=True), state, None)
    monkeypatch.delattr(TrainerCallback, "on_pre_optimizer_step")  # a transformers without the event
    with pytest.raises(RuntimeError, match="on_pre_optimizer_step"):
        cb.on_train_begin(plain, state, None)


def test_a_given_risk_fn_replaces_the_nll(tmp_path):
    model = tiny_llama(seed=0)
    expected, scale = expected_geffects(model)
    twice = GEffectCallback({"unlearn": FORGET}, groups={"all": [n for n, _ in model.named_parameters()]},
                            out=str(tmp_path / "g.jsonl"), risk_fn=lambda m, b: 2 * nll_risk(m, b))
    train(tmp_path / "run", model, lr=0.0, callback=twice)
    for r in read_geffect_log(tmp_path / "g.jsonl"):
        assert r["groups"] == {"all": r["total"]}
        assert r["total"] == pytest.approx(2 * math.fsum(expected["unlearn"].values()), abs=2e-4 * scale["unlearn"])


def test_under_ddp_the_geffects_are_those_of_one_process(tmp_path):
    """2 gloo processes (torchrun), one forget row per rank and micro-batch: the same G-effects as
    the gradient products of one process, in the main rank's log and in every rank's Trainer logs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          f"--master_port={port}", str(ROOT / "tests/helpers/hf_callback_ddp.py"), str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, launch_failure(res.stderr)
    expected, scale = expected_geffects(tiny_llama(seed=0))
    records = read_geffect_log(tmp_path / "geffect.jsonl")
    assert [(r["step"], r["risk"]) for r in records] == [(s, k) for s in range(3) for k in ("unlearn", "retain")]
    with torch.no_grad():
        model = tiny_llama(seed=0)
        risk = {k: float(nll_risk(model, b)) for k, b in (("unlearn", FORGET), ("retain", RETAIN))}
    for r in records:
        assert r["total"] == pytest.approx(math.fsum(expected[r["risk"]].values()), abs=1e-4 * scale[r["risk"]])
        assert r["risk_value"] == pytest.approx(risk[r["risk"]], rel=1e-5)  # the main rank's, counted once
    logged = [json.loads((tmp_path / f"logged{rank}.json").read_text()) for rank in (0, 1)]
    assert logged[0] == logged[1] and len(logged[0]) == 3
    for h in logged[0]:
        for g, v in expected["unlearn"].items():
            assert h[f"geffect/unlearn/{g}"] == pytest.approx(v, abs=1e-4 * scale["unlearn"])


def readme_example() -> str:
    """The README's plain-Trainer example: its python block that calls ``.attach(trainer)`` and trains."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.DOTALL)
    found = [b for b in blocks if ".attach(trainer)" in b and "trainer.train()" in b]
    assert len(found) == 1, "the README has one runnable GEffectCallback example"
    return found[0]


def test_the_readme_example_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(readme_example(), "README.md", "exec"), scope)
    records = read_geffect_log(tmp_path / "ga-run" / "geffect.jsonl")
    assert [(r["step"], r["risk"]) for r in records] == [(s, k) for s in range(4) for k in ("unlearn", "retain")]
    assert set(records[0]["groups"]) == {"embed", "shallow", "middle", "deep", "lm"}
    assert records[0]["total"] < 0  # GA on the forget rows themselves: -||∇NLL||² at step 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = glob.glob(str(tmp_path / "ga-run" / "runs" / "**" / "events.out.tfevents.*"), recursive=True)
    assert len(events) == 1
    assert [e.step for e in EventAccumulator(events[0]).Reload().Scalars("train/geffect/retain/lm")] == [1, 2, 3, 4]
    assert sum("geffect/retain/lm" in h for h in scope["trainer"].state.log_history) == 4


def test_under_the_unlearning_trainer(tmp_path):
    """Our UnlearningTrainer with the GA objective on items whose forget rows are FORGET's: the same
    G-effects (its whole-step counts make the accumulated gradient that of the whole forget batch)."""
    model = tiny_llama(seed=0)
    expected, scale = expected_geffects(model)
    rows = Rows()
    items = [{"forget": {**rows[i], "index": torch.tensor(i)}, "retain": {k: v[0] for k, v in RETAIN.items()}}
             for i in range(len(rows))]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, max_steps=2, learning_rate=0.0, optim="sgd",
                             max_grad_norm=0.0, report_to=[], logging_steps=1, save_strategy="no", use_cpu=True)
    trainer = UnlearningTrainer(model=model, args=args, train_dataset=items, objective=get_objective("ga"))
    GEffectCallback({"unlearn": FORGET, "retain": RETAIN}, out=str(tmp_path / "g.jsonl")).attach(trainer)
    trainer.train()
    records = read_geffect_log(tmp_path / "g.jsonl")
    assert len(records) == 4
    for r in records:
        assert r["total"] == pytest.approx(math.fsum(expected[r["risk"]].values()), abs=1e-4 * scale[r["risk"]])


def test_a_risk_batch_the_nll_cannot_use_is_refused_before_training(tmp_path):
    # it used to fail at the first optimiser step, as a bare AllMaskedError / IndexError naming no batch
    masked = {**FORGET, "labels": torch.full_like(FORGET["labels"], -100)}
    with pytest.raises(ValueError, match="risk batch 'unlearn' has no label to predict"):
        GEffectCallback({"unlearn": masked})
    GEffectCallback({"unlearn": masked}, risk_fn=lambda m, b: nll_risk(m, FORGET))  # a risk_fn reads what it likes
    model = tiny_llama(seed=0)
    oov = {**FORGET, "input_ids": FORGET["input_ids"].clone()}
    oov["input_ids"][0, 1] = model.config.vocab_size
    cb = GEffectCallback({"unlearn": oov}, out=None)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    state = SimpleNamespace(is_world_process_zero=True, global_step=0)
    with pytest.raises(ValueError, match=r"risk batch 'unlearn': input_ids holds ids outside the model's vocabulary"):
        cb.on_train_begin(args, state, None, model=model)
    GEffectCallback({"unlearn": FORGET}, out=None).on_train_begin(args, state, None, model=model)  # a valid one
