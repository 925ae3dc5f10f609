"""fastgeffect.eval.lm_eval_tasks: a local multiple-choice task (lm-eval's JSON datasets, no network)
on a tiny model gives the accuracies computed by hand; unknown tasks and bad arguments are refused
before anything runs; the caller's random states and train mode survive an evaluation."""
import json
import math
import random

import numpy as np
import pytest
import torch

pytest.importorskip("lm_eval")

from fastgeffect.eval.lm_eval_tasks import evaluate_tasks, load_task_manager, task_metrics  # noqa: E402
from tests.helpers.ps_cases import byte_level_tokenizer  # noqa: E402
from tests.helpers.toy_qa import tiny_llama  # noqa: E402

TASK = "fg_local_mc"
# choices of different character lengths, some with two-byte characters: the raw, per-character and
# per-byte argmaxes differ on some questions
CHOICES = [["red", "a very long green answer", "éàü", "ça"], ["pomme", "x", "ééèèàà", "naïve ones"],
           ["one", "two", "three", "four"], ["Zürich", "Oslo", "àéîõü", "Rome"]]
QUESTIONS = [f"Question {i} : which one fits {w} ?" for i, w in enumerate(
    ["here", "there", "now", "then", "best", "least", "first", "last", "well", "again", "too", "still"])]


def _docs_without_answers():
    return [{"question": q, "choices": CHOICES[i % len(CHOICES)]} for i, q in enumerate(QUESTIONS)]


def _context(doc):
    return f"{doc['question']}\nAnswer:"  # the YAML's doc_to_text


def _write_task(folder, docs):
    """A zero-shot multiple-choice task over ``docs`` as lm-eval's local JSON dataset; the dataset
    cache lives in ``folder`` too, so nothing is read from or written to the user's cache."""
    folder.mkdir(exist_ok=True)
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    metrics = "".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n"
                      for m in ("acc", "acc_norm", "acc_bytes"))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"  cache_dir: {folder / 'hf-datasets'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        f"metric_list:\n{metrics}", encoding="utf-8")
    return folder


@torch.no_grad()
def _choice_logliks(model, tok, context, choices):
    """log P(" " + choice | context) as lm-eval defines it for ``multiple_choice``: the choice's
    tokens are those of context + " " + choice after the context's tokens; their log-probabilities
    given everything before them, summed (one unpadded forward per choice)."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    out = []
    for choice in choices:
        whole = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
        assert whole[:len(ctx)] == ctx  # the split point is unambiguous for this tokenizer
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
        out.append(sum(logp[t - 1, whole[t]].item() for t in range(len(ctx), len(whole))))
    return np.array(out)


def _mean_and_stderr(hits):
    n, mean = len(hits), sum(hits) / len(hits)
    return mean, math.sqrt(sum((h - mean) ** 2 for h in hits) / (n - 1)) / math.sqrt(n)


@pytest.fixture(scope="module")
def tiny():
    docs = _docs_without_answers()
    tok = byte_level_tokenizer([_context(d) + " " + " ".join(d["choices"]) for d in docs] * 2, vocab_size=400)
    return tiny_llama(len(tok), tokenizer=tok, seed=0), tok


def test_local_multiple_choice_matches_hand_computed_accuracies(tiny, tmp_path):
    model, tok = tiny
    docs = _docs_without_answers()
    preds = {"acc": [], "acc_norm": [], "acc_bytes": []}
    for d in docs:
        ll = _choice_logliks(model, tok, _context(d), d["choices"])
        scores = {"acc": ll, "acc_norm": ll / np.array([len(c) for c in d["choices"]]),
                  "acc_bytes": ll / np.array([len(c.encode()) for c in d["choices"]])}
        for kind, score in scores.items():
            top2 = np.sort(score)[-2:]
            assert top2[1] - top2[0] > 1e-4 * (1 + abs(top2[1]))  # no near-tie that float32 could flip
            preds[kind].append(int(np.argmax(score)))
    assert preds["acc"] != preds["acc_norm"] and preds["acc_norm"] != preds["acc_bytes"]
    # zero-shot, so the answers do not change the log-likelihoods: pick them so that the three
    # accuracies differ and none is 0 or 1
    kinds = ["acc", "acc_norm", "acc_bytes", None]
    for i, d in enumerate(docs):
        kind = kinds[i % len(kinds)]
        d["answer"] = preds[kind][i] if kind else (preds["acc"][i] + 1) % len(d["choices"])
    expected = {k: _mean_and_stderr([float(p == d["answer"]) for p, d in zip(v, docs)]) for k, v in preds.items()}
    assert len({round(m, 9) for m, _ in expected.values()}) == 3
    assert all(0 < m < 1 for m, _ in expected.values())

    model.train()
    out = evaluate_tasks(model, tok, [TASK], batch_size=5, task_manager=load_task_manager(
        _write_task(tmp_path / "tasks", docs), include_defaults=False))
    assert model.training  # restored after HFLM's model.eval()
    import lm_eval
    assert out["lm_eval_version"] == lm_eval.__version__
    got = out["tasks"][TASK]
    assert got["n_samples"] == len(docs)
    for k, (mean, stderr) in expected.items():
        assert got[k] == pytest.approx(mean, abs=1e-12), k
        assert got[f"{k}_stderr"] == pytest.approx(stderr, abs=1e-12), k

    # limit: the first examples only
    part = evaluate_tasks(model, tok, [TASK], batch_size=3, limit=4, task_manager=load_task_manager(
        tmp_path / "tasks", include_defaults=False))["tasks"][TASK]
    assert part["n_samples"] == 4
    assert part["acc"] == pytest.approx(np.mean([p == d["answer"] for p, d in zip(preds["acc"][:4], docs)]))


def test_random_states_train_mode_and_pad_token_survive_an_evaluation(tiny, tmp_path):
    model, tok = tiny
    docs = [dict(d, answer=0) for d in _docs_without_answers()[:3]]
    manager = load_task_manager(_write_task(tmp_path / "tasks", docs), include_defaults=False)

    def draw():
        return random.random(), float(np.random.rand()), torch.rand(2).tolist()

    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    expected = draw()
    random.seed(11), np.random.seed(11), torch.manual_seed(11)
    model.eval()
    assert tok.pad_token is None  # lm-eval gives it one while it runs
    evaluate_tasks(model, tok, [TASK], batch_size=2, task_manager=manager)
    assert draw() == expected and not model.training and tok.pad_token is None


def test_unknown_task_is_refused_naming_it_with_builtin_and_local_tasks_known(tiny, tmp_path):
    model, tok = tiny
    folder = _write_task(tmp_path / "tasks", [dict(d, answer=0) for d in _docs_without_answers()])
    with pytest.raises(ValueError) as e:  # the built-in list (WMDP, MMLU) plus include_path
        evaluate_tasks(model, tok, ["wmdp_bio", "wmdp_cyber", "mmlu", TASK, "wmdp_bioo"], batch_size=1,
                       include_path=folder)
    msg = str(e.value)
    assert "'wmdp_bioo'" in msg and "did you mean wmdp_bio" in msg and "TaskManager().all_tasks" in msg
    assert "'mmlu'" not in msg and f"'{TASK}'" not in msg


def test_bad_arguments_are_refused_before_anything_runs(tiny, tmp_path):
    model, tok = tiny
    for kwargs, match in [(dict(batch_size=0), "batch_size"), (dict(batch_size=2, limit=0), "limit"),
                          (dict(batch_size=2, limit=1.5), "limit"), (dict(batch_size=2, num_fewshot=-1), "num_fewshot"),
                          (dict(batch_size=2, include_path=tmp_path / "nowhere"), "nowhere")]:
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            evaluate_tasks(model, tok, [TASK], **kwargs)
    for tasks in ([], TASK, [TASK, None]):
        with pytest.raises(ValueError, match="non-empty list"):
            evaluate_tasks(model, tok, tasks, batch_size=1)
    manager = load_task_manager(_write_task(tmp_path / "tasks", []), include_defaults=False)
    with pytest.raises(ValueError, match="not both"):
        evaluate_tasks(model, tok, [TASK], batch_size=1, task_manager=manager, include_path=tmp_path)


def test_task_metrics_drops_the_none_filter_and_keeps_others():
    entry = {"alias": "x", "acc,none": 0.5, "acc_stderr,none": 0.1, "exact_match,strict-match": 1.0,
             "acc_norm_stderr,none": "N/A"}
    assert task_metrics(entry) == {"acc": 0.5, "acc_stderr": 0.1, "exact_match,strict-match": 1.0,
                                   "acc_norm_stderr": None}
