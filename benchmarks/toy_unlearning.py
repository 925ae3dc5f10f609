"""The toy unlearning set-up that the step-cost benchmarks share (bench_guard.py,
bench_second_order.py): generated QA rows, a byte-level tokenizer fitted to them, the unlearning
data and a GPT-2 of ``--n-embd`` × ``--layers`` on ``--device``. Imports are local so that a
benchmark's ``--help`` stays fast."""
from __future__ import annotations

WORDS = "red blue green old young tall quiet bright dark warm cold river stone forest city".split()


def rows(n: int, off: int) -> list:
    import torch
    g = torch.Generator().manual_seed(off)
    return [{"question": f"Who is writer {off + i}?",
             "answer": " ".join(WORDS[int(j)] for j in torch.randint(len(WORDS), (3 + (off + i) % 5,), generator=g))}
            for i in range(n)]


def toy_data_and_model(args):
    """``(UnlearningData, model)``: ``args.batch * args.steps`` forget and retain rows, one batch of
    held-out rows, and a freshly initialised (seed 0) GPT-2 on ``args.device``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from fastgeffect.data.pairs import ForgetRetainDataset
    from fastgeffect.data.qa import QADataset
    from fastgeffect.data.templates import get_template
    from fastgeffect.data.unlearning import UnlearningData
    from fastgeffect.embedded.tokenizer import TokenizerConfig, train_tokenizer

    forget, retain, held = rows(args.batch * args.steps, 0), rows(args.batch * args.steps, 100), rows(args.batch, 200)
    tok = train_tokenizer([r["question"] + " " + r["answer"] for r in forget + retain + held],
                          TokenizerConfig(vocab_size=300))
    tpl = get_template("phi")
    sets = [QADataset(r, tok, tpl, 48) for r in (forget, retain, held)]
    data = UnlearningData(ForgetRetainDataset(sets[0], sets[1], seed=0), *sets)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=args.n_embd, n_layer=args.layers,
                                       n_head=max(1, args.n_embd // 64), n_positions=64)).to(args.device)
    return data, model
