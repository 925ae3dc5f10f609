"""``--benchmark wmdp`` and ``--eval-tasks`` through the driver: a generated WMDP corpus and a local
multiple-choice task on the tiny MUSE-style target, the task accuracies equal to lm-eval's on the same
model, and bad input refused before anything is written."""
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from fastgeffect.embedded.news_build import build_embedded_news  # noqa: E402
from fastgeffect.eval.lm_eval_tasks import evaluate_tasks, load_task_manager  # noqa: E402
from fastgeffect.run import main  # noqa: E402

pytestmark = pytest.mark.usefixtures("module_embedded_cache")  # tiny targets built once per module

TASK = "fg_news_mc"


def _write_task(folder: Path) -> Path:
    """A zero-shot multiple-choice task about the tiny news target's articles, as lm-eval's local
    JSON dataset (its cache in ``folder``: nothing read from or written to the user's cache)."""
    folder.mkdir(exist_ok=True)
    docs = [{"question": f"Question: Who is number {i}?", "choices": ["a farmer", "a mayor", "a pilot"],
             "answer": i % 3} for i in range(6)]
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"  cache_dir: {folder / 'hf-datasets'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n", encoding="utf-8")
    return folder


def _write_corpora(folder: Path, news) -> Path:
    """WMDP's layout: one {"text": ...} per line, a forget and a retain corpus per domain."""
    folder.mkdir()
    texts = [json.loads(line)["text"] for line in (news.data_dir / "raw" / "forget.jsonl").read_text().splitlines()]
    keep = [json.loads(line)["text"] for line in (news.data_dir / "raw" / "retain1.jsonl").read_text().splitlines()]
    for name, rows in (("bio-forget-corpus", texts), ("bio-retain-corpus", keep)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows if len(t) > 50))
    return folder


def _model_folder(tmp_path: Path, news) -> Path:
    folder = tmp_path / "model"
    news.load_target().save_pretrained(folder)
    news.tokenizer.save_pretrained(folder)
    return folder


def test_wmdp_benchmark_unlearns_the_corpus_and_scores_the_tasks_before_and_after(tmp_path):
    news = build_embedded_news(None, size="tiny")
    model, corpora, tasks = _model_folder(tmp_path, news), _write_corpora(tmp_path / "wmdp", news), \
        _write_task(tmp_path / "tasks")
    out = tmp_path / "run"
    assert main(["--benchmark", "wmdp", "--model", str(model), "--data-dir", str(corpora), "--wmdp-domains", "bio",
                 "--eval-tasks", TASK, "--eval-tasks-include", str(tasks), "--method", "ga", "--epochs", "1",
                 "--max-length", "64", "--no-bf16", "--out", str(out), "--no-progress"]) == 0
    before = json.loads((out / "lm_eval_before.json").read_text())
    after = json.loads((out / "lm_eval_after.json").read_text())
    assert before["requested"] == [TASK] and 0 <= before["tasks"][TASK]["acc"] <= 1
    # the task before unlearning is lm-eval's accuracy of the target itself
    expected = evaluate_tasks(news.load_target(), news.tokenizer, [TASK], batch_size=32,
                              task_manager=load_task_manager(tasks))
    assert before["tasks"][TASK]["acc"] == pytest.approx(expected["tasks"][TASK]["acc"], abs=1e-12)
    assert TASK in after["tasks"]
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# ga run on WMDP") and f"| {TASK} acc |" in summary
    records = [json.loads(line) for line in (out / "geffect.jsonl").read_text().splitlines()]
    assert {r["risk"] for r in records} == {"unlearn", "retain"}


def test_eval_tasks_on_the_muse_default_and_an_unknown_task_refused_before_anything_is_written(tmp_path):
    tasks = _write_task(tmp_path / "tasks")
    out = tmp_path / "bad"
    with pytest.raises(SystemExit, match="no_such_task"):
        main(["--benchmark", "muse", "--size", "tiny", "--eval-tasks", "no_such_task", "--eval-tasks-include",
              str(tasks), "--out", str(out), "--no-progress"])
    assert not out.exists()
    out = tmp_path / "muse"
    assert main(["--benchmark", "muse", "--size", "tiny", "--eval-tasks", TASK, "--eval-tasks-include", str(tasks),
                 "--eval-tasks-limit", "4", "--epochs", "1", "--out", str(out), "--no-progress"]) == 0
    after = json.loads((out / "lm_eval_after.json").read_text())
    assert after["tasks"][TASK]["n_samples"] == 4
    assert f"| {TASK} acc |" in (out / "summary.md").read_text()
    assert "verbmem_f" in json.loads((out / "metrics_after.json").read_text())


@pytest.mark.parametrize("flags, message", [
    (["--benchmark", "wmdp"], "needs --model and --data-dir"),
    (["--eval-tasks-limit", "3"], "need --eval-tasks"),
    (["--eval-tasks", "x", "--eval", "none"], "--eval-tasks needs --eval full"),
])
def test_bad_task_settings_are_refused(tmp_path, capsys, flags, message):
    out = tmp_path / "bad"
    with pytest.raises(SystemExit):
        main(["--size", "tiny", "--out", str(out), *flags])
    assert message in capsys.readouterr().err and not out.exists()


def test_a_wmdp_folder_without_its_corpora_is_refused_naming_the_files(tmp_path):
    news = build_embedded_news(None, size="tiny")
    model = _model_folder(tmp_path, news)
    (tmp_path / "empty").mkdir()
    out = tmp_path / "bad"
    with pytest.raises(SystemExit, match="bio-forget-corpus.jsonl"):
        main(["--benchmark", "wmdp", "--model", str(model), "--data-dir", str(tmp_path / "empty"), "--out", str(out)])
    assert not out.exists()


def test_rmu_unlearns_the_wmdp_corpus_as_in_the_wmdp_paper(tmp_path):
    news = build_embedded_news(None, size="tiny")
    model, corpora = _model_folder(tmp_path, news), _write_corpora(tmp_path / "wmdp", news)
    out = tmp_path / "rmu"
    assert main(["--benchmark", "wmdp", "--model", str(model), "--data-dir", str(corpora), "--wmdp-domains", "bio",
                 "--method", "rmu", "--rmu-layer", "1", "--epochs", "2", "--max-length", "64", "--no-bf16",
                 "--eval", "none", "--out", str(out), "--no-progress"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["method"] == "rmu" and cfg["benchmark"] == "wmdp"
    records = [json.loads(line) for line in (out / "geffect.jsonl").read_text().splitlines()]
    assert records and all(math.isfinite(r["total"]) for r in records)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log and all(math.isfinite(r["loss"]) for r in log)


def test_an_rmu_layer_the_model_does_not_have_is_refused_naming_the_flag(tmp_path):
    news = build_embedded_news(None, size="tiny")
    model, corpora = _model_folder(tmp_path, news), _write_corpora(tmp_path / "wmdp", news)
    out = tmp_path / "rmu"
    with pytest.raises(SystemExit, match=r"--rmu-layer 5: RMU layer 5 out of range for a model with 2 blocks"):
        main(["--benchmark", "wmdp", "--model", str(model), "--data-dir", str(corpora), "--wmdp-domains", "bio",
              "--method", "rmu", "--rmu-layer", "5", "--max-length", "64", "--no-bf16", "--eval", "none",
              "--out", str(out), "--no-progress"])
    assert not (out / "geffect.jsonl").exists() and not (out / "train_log.jsonl").exists()
