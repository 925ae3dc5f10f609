"""One G-effect measurement (``GEffect.measure``: two risk backwards with streaming dot products)
and per-sample G-effects (ghost dot products) on a Llama-shaped model: tiny on CPU, Llama-2-7B on
a GPU."""
import argparse

import bench_geffect
import pytest
import torch

import fastgeffect.losses as L
from fastgeffect.geffect import GEffect, per_sample_geffects

MODELS = {"small": dict(hidden=64, layers=2, inter=128, heads=4, vocab=512, batch=2, seq=32, ps_seq=16,
                        dtype="float32"),
          "real": dict(bench_geffect.PRESETS["llama7b"])}


@pytest.fixture
def setup(scale):
    size, device = scale
    cfg = argparse.Namespace(**MODELS[size])
    model = bench_geffect.build(cfg, torch.device(device), getattr(torch, cfg.dtype))
    forget = bench_geffect.batch(cfg.batch, cfg.seq, cfg.vocab, device, 1)
    retain = bench_geffect.batch(cfg.batch, cfg.seq, cfg.vocab, device, 2)
    ref = torch.full(forget[1].shape, -3.0, device=device)
    L.tnpo(model(input_ids=forget[0]).logits, forget[1], ref).backward()  # the objective gradient in p.grad
    yield model, cfg, device, forget, retain
    model.zero_grad(set_to_none=True)


def test_bench_geffect_measure(benchmark, setup, sync):
    model, _, device, forget, retain = setup
    engine = GEffect(model)
    risks = {"unlearn": lambda: bench_geffect.nll_of(model, *forget),
             "retain": lambda: bench_geffect.nll_of(model, *retain)}
    benchmark(lambda: (engine.measure(risks), sync(device)))


def test_bench_per_sample_geffects(benchmark, setup, sync):
    model, cfg, device, _, retain = setup
    ids, labels = bench_geffect.batch(4 if device == "cpu" else 16, cfg.ps_seq, cfg.vocab, device, 3)
    denom = L.valid_mask(labels).sum()
    model.zero_grad(set_to_none=True)
    acc = torch.float64 if device == "cpu" else torch.float32

    def step():
        per_sample_geffects(model, lambda: bench_geffect.nll_of(model, *retain),
                            lambda: bench_geffect.per_sample_terms(model, ids, labels, denom), accumulate_dtype=acc)
        sync(device)
    benchmark(step)
