"""The tiny models of every supported family (tests/helpers/model_families.py) build and run."""
import pytest
import torch
from helpers.model_families import ARCHS, VOCAB, logits_of, qa_batch, tiny_model


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_tiny_models_run(arch):
    model = tiny_model(arch, layers=2)
    batch = qa_batch()
    logits = logits_of(model, batch)
    assert logits.shape == (*batch["input_ids"].shape, VOCAB)
    assert torch.isfinite(logits).all()
