"""Tiny causal LMs of every supported family (built from configs: no download) and QA-style
batches, for the G-effect tests."""
import torch
import transformers as tr

VOCAB = 37  # odd sizes on purpose
HIDDEN = 16

ARCHS = {
    # name: (config class, model class, kwargs)
    "llama": (tr.LlamaConfig, tr.LlamaForCausalLM,
              dict(hidden_size=HIDDEN, intermediate_size=24, num_attention_heads=2, num_key_value_heads=1,
                   max_position_embeddings=32)),
    "gpt2": (tr.GPT2Config, tr.GPT2LMHeadModel,
             dict(n_embd=HIDDEN, n_head=2, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                  bos_token_id=0, eos_token_id=0)),
    "phi": (tr.PhiConfig, tr.PhiForCausalLM,
            dict(hidden_size=HIDDEN, intermediate_size=24, num_attention_heads=2, max_position_embeddings=32,
                 resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)),
    "gpt_neox": (tr.GPTNeoXConfig, tr.GPTNeoXForCausalLM,
                 dict(hidden_size=HIDDEN, intermediate_size=24, num_attention_heads=2, max_position_embeddings=32)),
    "qwen2": (tr.Qwen2Config, tr.Qwen2ForCausalLM,
              dict(hidden_size=HIDDEN, intermediate_size=24, num_attention_heads=2, num_key_value_heads=1,
                   max_position_embeddings=32)),
    "opt": (tr.OPTConfig, tr.OPTForCausalLM,
            dict(hidden_size=HIDDEN, ffn_dim=24, num_attention_heads=2, word_embed_proj_dim=HIDDEN,
                 max_position_embeddings=32, dropout=0.0, attention_dropout=0.0, bos_token_id=0, eos_token_id=0,
                 pad_token_id=1)),
}

LAYER_KEY = {"gpt2": "n_layer"}


def tiny_model(arch="llama", layers=3, seed=0, dtype=torch.float32, **overrides):
    cfg_cls, model_cls, kw = ARCHS[arch]
    kw = dict(kw, **overrides)
    kw[LAYER_KEY.get(arch, "num_hidden_layers")] = layers
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(vocab_size=VOCAB, **kw))
    return model.to(dtype).eval()


def qa_batch(seed=0, b=3, t=9, vocab=VOCAB):
    """Right-padded batch: question positions and padding are -100 in labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (b, t), generator=g)
    labels = ids.clone()
    attn = torch.ones_like(ids)
    for i in range(b):
        labels[i, : 2 + i % 3] = -100
        pad = (i % 2) * 2
        if pad:
            ids[i, t - pad:] = 1
            labels[i, t - pad:] = -100
            attn[i, t - pad:] = 0
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def logits_of(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def flat_grads(loss, params):
    """Naive reference: the full gradient as separate float64 tensors (zeros where unused)."""
    gs = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(p, dtype=torch.float64) if g is None else g.double() for g, p in zip(gs, params)]
