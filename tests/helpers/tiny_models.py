"""A tiny Llama and QA-style batches with sample indices, for the objective, trainer and op tests
(built from a config: no download)."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 61


def tiny_llama(seed=0, layers=3, vocab=VOCAB, hidden=16):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def qa_batch(seed, b=3, t=10, vocab=VOCAB, index_start=0):
    """Right-padded QA-style batch: question tokens and padding are -100 in labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, t), generator=g)
    labels = ids.clone()
    attn = torch.ones_like(ids)
    for i in range(b):
        q = 2 + i % 3
        pad = i % 2 * 2
        labels[i, :q] = -100
        if pad:
            labels[i, t - pad:] = -100
            attn[i, t - pad:] = 0
    return {"input_ids": ids, "attention_mask": attn, "labels": labels,
            "index": torch.arange(index_start, index_start + b)}


def paired_batches(seed=0, b=3, t=10):
    return {"forget": qa_batch(seed, b, t), "retain": qa_batch(seed + 100, b, t, index_start=100),
            "forget_idk": qa_batch(seed + 200, b, t), "forget_win": qa_batch(seed + 300, b, t)}
