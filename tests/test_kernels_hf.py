"""fused_causal_lm_loss / fused_causal_lm_kl on tiny Llama, Phi and GPT-2 models: same loss and
parameter gradients as fastgeffect.losses on the model's materialised logits, and the LM head
module is never called."""
import pytest
import torch
from helpers.devices import device_for, to_device
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM

from fastgeffect import losses
from fastgeffect.kernels import fused_causal_lm_kl, fused_causal_lm_loss

V = 101


def tiny(family, tied=False, seed=0):
    torch.manual_seed(seed)
    if family == "llama":
        cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          tie_word_embeddings=tied)
        return LlamaForCausalLM(cfg).eval()
    if family == "phi":  # Phi-1.5 style: LM head with a bias
        cfg = PhiConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64)
        return PhiForCausalLM(cfg).eval()
    cfg = GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64)  # tied
    return GPT2LMHeadModel(cfg).eval()


def batch(B=3, T=11, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=gen)
    attn = torch.ones(B, T, dtype=torch.long)
    attn[1, -3:] = 0  # right padding
    labels = ids.clone()
    labels[:, :4] = -100  # question
    labels[attn == 0] = -100
    ref = -torch.rand(B, T, generator=gen) * 6
    return ids, attn, labels, ref


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family,tied", [("llama", False), ("llama", True), ("phi", False), ("gpt2", True)])
@pytest.mark.parametrize("objective", ["nll", "wga", "wtnpo"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_causal_lm_loss_matches_unfused(family, tied, objective, backend):
    dev = device_for(backend)
    model = tiny(family, tied).to(dev)
    ids, attn, labels, ref = to_device(dev, *batch())
    kw = {"ref_logprobs": ref} if objective == "wtnpo" else {}
    head_calls = []
    hook = model.get_output_embeddings().register_forward_hook(lambda *a: head_calls.append(1))
    loss, logp = fused_causal_lm_loss(model, ids, attn, labels, objective=objective, backend=backend,
                                      return_logprobs=True, chunk_size=8, **kw)
    hook.remove()
    assert not head_calls, "the fused path must not run the LM head module (it would materialise logits)"
    loss.backward()
    got = grads(model)
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=attn).logits
    want = getattr(losses, objective)(logits, labels, **kw)
    want.backward()
    ref_grads = grads(model)
    assert torch.allclose(loss, want, rtol=1e-5, atol=1e-6)
    assert torch.allclose(logp, losses.token_logprobs(logits, labels).detach(), rtol=1e-5, atol=1e-5)
    assert set(got) == set(ref_grads)
    for name, g in ref_grads.items():
        assert torch.allclose(got[name], g, rtol=1e-4, atol=1e-6), name
    if tied:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("family", ["llama", "phi"])
@pytest.mark.parametrize("positions", ["all", "answer"])
def test_fused_causal_lm_kl_matches_unfused(family, positions):
    model, ref_model = tiny(family, seed=0), tiny(family, seed=1)
    ids, attn, labels, _ = batch(seed=3)
    loss = fused_causal_lm_kl(model, ref_model, ids, attn, labels, positions=positions, chunk_size=8)
    loss.backward()
    got = grads(model)
    model.zero_grad()
    with torch.no_grad():
        ref_logits = ref_model(input_ids=ids, attention_mask=attn).logits
    want = losses.kl(model(input_ids=ids, attention_mask=attn).logits, ref_logits, labels, positions=positions)
    want.backward()
    assert torch.allclose(loss, want, rtol=1e-5, atol=1e-7)
    for name, g in grads(model).items():
        assert torch.allclose(got[name], g, rtol=1e-4, atol=1e-7), name
    assert all(p.grad is None for p in ref_model.parameters())


def test_rejects_models_with_transformed_logits_and_bad_shapes():
    model = tiny("llama")
    ids, attn, labels, ref = batch()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="softcapping"):
        fused_causal_lm_loss(model, ids, attn, labels, objective="ga")
    model.config.final_logit_softcapping = None
    with pytest.raises(ValueError, match="labels shape"):
        fused_causal_lm_loss(model, ids, attn, labels[:, 1:], objective="ga")
    with pytest.raises(ValueError, match="ref_logprobs shape"):
        fused_causal_lm_loss(model, ids, attn, labels, objective="tnpo", ref_logprobs=ref[:, 1:])
    with pytest.raises(TypeError, match="causal LM"):
        fused_causal_lm_loss(torch.nn.Linear(2, 2), ids, attn, labels, objective="ga")
