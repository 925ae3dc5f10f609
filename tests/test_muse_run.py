"""``--benchmark muse``: the offline MUSE-style default end to end (tiny size), the metrics equal to the
library's, and bad input refused before anything is written."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from fastgeffect.data.muse import load_muse
from fastgeffect.data.raw_unlearning import load_raw_unlearning_data
from fastgeffect.embedded.news_build import build_embedded_news
from fastgeffect.eval.muse import MUSE_METRICS, evaluate_muse
from fastgeffect.run import main

pytestmark = pytest.mark.usefixtures("module_embedded_cache")  # tiny targets built once per module

TOFU = Path(__file__).resolve().parents[2] / "shared" / "tofu"


def run(out, *extra):
    return main(["--benchmark", "muse", "--size", "tiny", "--out", str(out), "--no-progress", *extra])


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_the_tiny_target_learns_its_articles_and_the_twin_never_saw_the_forget_ones():
    news = build_embedded_news(None, size="tiny")
    target, twin = news.reports["target"]["answer_stats"], news.reports["retain"]["answer_stats"]
    assert news.reports["target"]["trained_on"] == ["forget", "retain1", "retain2"]
    assert news.reports["retain"]["trained_on"] == ["retain1", "retain2"]
    assert target["forget"]["accuracy"] > 0.8 and target["retain2"]["accuracy"] > 0.8
    # the twin knows retain2 as well as the target does, the forget articles far less
    assert twin["retain2"]["accuracy"] > 0.8
    assert twin["forget"]["loss"] > target["forget"]["loss"] + 1.0


def test_every_window_of_the_tiny_default_holds_one_whole_document():
    news = build_embedded_news(None, size="tiny")
    data = load_muse(news.data_dir)
    raw = load_raw_unlearning_data(data.raw, news.tokenizer, news.max_length, news.stride)
    assert len(raw.forget) == len(data.raw["forget"]) and len(raw.retain) == len(data.raw["retain1"])
    assert len(raw.heldout) == len(data.raw["retain2"])
    for i, text in enumerate(data.raw["forget"]):
        labels = raw.forget[i]["labels"]
        tokens = labels[labels != -100].tolist()
        assert news.tokenizer.decode(tokens) == text  # every token of the document, once


def test_ga_on_the_offline_default_writes_musess_metrics_and_the_forget_ones_fall(tmp_path):
    out = tmp_path / "ga"
    assert run(out, "--method", "ga", "--epochs", "4", "--lr", "2e-3") == 0
    before, after = _read(out / "metrics_before.json"), _read(out / "metrics_after.json")
    for metrics in (before, after):
        assert set(MUSE_METRICS) <= set(metrics) and metrics["benchmark"] == "muse"
        assert metrics["privleak_reference"] == "retain model"
    assert after["verbmem_f"] < before["verbmem_f"] and after["knowmem_f"] < before["knowmem_f"]
    assert before["verbmem_f"] > 50 and before["knowmem_f"] > 10  # the tiny target learnt its articles
    lines = (out / "geffect.jsonl").read_text().splitlines()
    assert {json.loads(line)["risk"] for line in lines} == {"unlearn", "retain"}
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# ga run on MUSE") and "| verbmem_f |" in summary and "| knowmem_r |" in summary
    cfg = _read(out / "config.json")
    assert cfg["benchmark"] == "muse" and cfg["privleak"].startswith("privleak's reference: retain model")
    assert not (out / "metrics_uwc.json").exists()  # UWC is TOFU's


def test_the_metrics_before_are_the_librarys_on_the_target(tmp_path):
    out = tmp_path / "npo"
    assert run(out, "--method", "npo", "--regularizer", "gd", "--epochs", "1", "--eval-size", "5") == 0
    news = build_embedded_news(None, size="tiny")
    expected = evaluate_muse(news.load_target(), news.tokenizer, load_muse(news.data_dir),
                             retain_model=news.load_retain(), max_rows=5, batch_size=32)
    before = _read(out / "metrics_before.json")
    for k in MUSE_METRICS:
        assert before[k] == pytest.approx(expected[k], abs=1e-6 * max(1.0, abs(expected[k]))), k


@pytest.mark.parametrize("flags, message", [
    (["--authors", "3"], "--authors is TOFU's"),
    (["--eval-metrics", "mia"], "--eval-metrics is TOFU's"),
    (["--attacks", "relearn"], "--attacks is TOFU's"),
    (["--method", "po"], "raw text, which has no questions"),
    (["--data-dir", "x"], "--data-dir needs --model"),
    (["--model", "sshleifer/tiny-gpt2"], "needs --data-dir, a MUSE folder"),
])
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, capsys, flags, message):
    out = tmp_path / "bad"
    with pytest.raises(SystemExit):
        run(out, *flags)
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_stride_needs_the_muse_benchmark(tmp_path, capsys):
    out = tmp_path / "bad"
    with pytest.raises(SystemExit):
        main(["--size", "tiny", "--out", str(out), "--stride", "8"])
    assert "--stride needs --benchmark muse" in capsys.readouterr().err and not out.exists()


def _tiny_model_folder(tmp_path: Path) -> Path:
    """The tiny news target saved as a --model folder."""
    news = build_embedded_news(None, size="tiny")
    folder = tmp_path / "model"
    news.load_target().save_pretrained(folder)
    news.tokenizer.save_pretrained(folder)
    return folder


def test_a_muse_folder_with_a_missing_file_or_a_tofu_folder_is_refused_naming_it(tmp_path):
    model = _tiny_model_folder(tmp_path)
    news = build_embedded_news(None, size="tiny")
    folder = tmp_path / "muse"
    shutil.copytree(news.data_dir, folder)
    (folder / "verbmem" / "forget.jsonl").unlink()
    out = tmp_path / "bad"
    with pytest.raises(SystemExit, match="verbmem"):
        run(out, "--model", str(model), "--data-dir", str(folder))
    assert not out.exists()
    if TOFU.is_dir():
        with pytest.raises(SystemExit, match="TOFU folder"):
            run(out, "--model", str(model), "--data-dir", str(TOFU))
        assert not out.exists()


def test_a_model_folder_on_a_muse_folder_runs_with_half_overlapping_windows(tmp_path):
    model = _tiny_model_folder(tmp_path)
    news = build_embedded_news(None, size="tiny")
    out = tmp_path / "ga"
    assert run(out, "--model", str(model), "--data-dir", str(news.data_dir), "--retain-model", str(news.retain_path),
               "--method", "ga", "--epochs", "1", "--max-length", "64", "--eval-size", "3", "--no-bf16") == 0
    cfg = _read(out / "config.json")
    assert cfg["max_length_resolved"] == 64
    assert set(MUSE_METRICS) <= set(_read(out / "metrics_after.json"))
    totals = [json.loads(x)["total"] for x in (out / "geffect.jsonl").read_text().splitlines()]
    assert totals and torch.isfinite(torch.tensor(totals)).all()


def test_a_scalability_forget_set_replaces_the_forget_corpus_and_a_missing_one_is_refused(tmp_path):
    model = _tiny_model_folder(tmp_path)
    news = build_embedded_news(None, size="tiny")
    folder = tmp_path / "muse"
    shutil.copytree(news.data_dir, folder)
    articles = [line for line in (folder / "raw" / "forget.jsonl").read_text().splitlines()][:3]
    (folder / "scal").mkdir()
    (folder / "scal" / "forget_1.jsonl").write_text("\n".join(articles) + "\n")
    common = ["--model", str(model), "--data-dir", str(folder), "--method", "ga", "--batch-size", "2", "--epochs", "1",
              "--eval", "none", "--no-bf16", "--max-length", "64"]
    with pytest.raises(SystemExit, match="no sust/forget_2"):
        run(tmp_path / "bad", *common, "--muse-forget", "sust/forget_2")
    assert not (tmp_path / "bad").exists()
    steps = {}
    for name in ("raw/forget", "scal/forget_1"):
        out = tmp_path / name.replace("/", "-")
        assert run(out, *common, "--muse-forget", name) == 0
        steps[name] = len((out / "train_log.jsonl").read_text().splitlines())
        assert _read(out / "config.json")["muse_forget"] == name
    data = load_muse(folder)
    windows = load_raw_unlearning_data({**data.raw, "forget": data.scal["forget_1"]}, news.tokenizer, 64, 32).forget
    assert steps["scal/forget_1"] == -(-len(windows) // 2) < steps["raw/forget"]


def test_raw_text_runs_write_tensorboard_and_compare_like_tofu_runs(tmp_path):
    from fastgeffect.report.cli import main as report_main
    outs = [tmp_path / m for m in ("ga", "npo")]
    for out in outs:
        assert run(out, "--method", out.name, "--epochs", "1", "--eval-size", "3", "--report-to", "tensorboard") == 0
        assert list((out / "tensorboard").glob("events.*"))
    assert report_main(["compare", *map(str, outs), "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| verbmem_f |" in table and "| knowmem_f |" in table
