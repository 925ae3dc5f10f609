"""`python -m fastgeffect.report`: the summary of a run folder, and clear refusals of missing,
foreign or damaged folders and logs (naming the file and line); importing the report does not
import matplotlib, and its modules name the run folder's files only through run_files."""
import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fastgeffect.report import compare, main, write_report

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "fastgeffect" / "report"


def run_python(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)

GROUPS = {"embed": -0.5, "shallow": -0.25, "middle": 0.25, "deep": -1.0, "lm": 0.5}


def geffect_lines():
    return [{"step": s, "risk": r, "total": sum(GROUPS.values()) * (s + 1), "groups": dict(GROUPS),
             "risk_value": 2.0 - s, "tied": False} for s in range(2) for r in ("unlearn", "retain")]


def write_lines(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail, encoding="utf-8")


@pytest.fixture
def run(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"method": "tnpo", "lr": 1e-5, "objective_hparams": {"beta": 4.0}}))
    write_lines(d / "geffect.jsonl", geffect_lines())
    write_lines(d / "train_log.jsonl", [{"step": s, "loss": 1.0 - s, "inv_conf": 3.0 + s,
                                         "weights": {"mean": 0.5, "std": 0.1, "min": 0.1, "max": 0.9}}
                                        for s in range(2)])
    (d / "metrics_after.json").write_text(json.dumps({"Model Utility": 0.5, "Forget Quality": 0.01}))
    return d


def test_show_writes_the_summary(run, capsys):
    assert main(["show", str(run)]) == 0
    summary = (run / "summary.md").read_text()
    assert summary.startswith("# tnpo run") and "beta=4.0" in summary and "| Model Utility |" in summary
    assert "| unlearn |" in summary and (run / "plots" / "geffect.png").exists()
    assert (run / "plots" / "weights.png").exists()
    assert "# tnpo run" in capsys.readouterr().out


def test_show_refuses_a_missing_folder(tmp_path, capsys):
    # was a FileNotFoundError traceback from mkdir
    missing = tmp_path / "nope"
    assert main(["show", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"{missing}: no such run folder" in err and "--out" in err
    assert not missing.exists()


def test_show_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    # wrote summary.md and plots/ into any folder, with exit 0
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["show", str(tmp_path)]) == 2
    assert "is not a run folder: it has no config.json" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert main(["compare", str(tmp_path), str(tmp_path / "x")]) == 2


def test_torn_last_line_is_dropped(run):
    # a crash while appending leaves a line without its newline: not a record
    write_lines(run / "train_log.jsonl", [{"step": 0, "inv_conf": 3.0}], tail='{"step": 1, "inv_c')
    write_lines(run / "geffect.jsonl", geffect_lines(), tail='{"step": 2, "risk": "unl')
    assert "| unlearn |" in write_report(run).read_text()


def test_malformed_middle_line_names_the_file(run):
    (run / "train_log.jsonl").write_text('{"step": 0, "inv_conf": 3.0}\n{"step": 1, "inv_c\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"train_log\.jsonl:2: not a JSON record"):
        write_report(run)
    assert not (run / "summary.md").exists()


@pytest.mark.parametrize("edit, problem", [
    (lambda r: r.pop("groups"), "the record has no 'groups'"),
    (lambda r: r["groups"].update(lm=None), "'groups' has 'lm': null, expected a number"),
    (lambda r: r.update(total="x"), "'total' is \"x\", expected a number"),
])
def test_bad_geffect_record_names_file_and_line(run, edit, problem):
    # a record without groups was a KeyError naming nothing
    records = geffect_lines()
    edit(records[2])
    (run / "geffect.jsonl").write_text("\n" + "".join(json.dumps(r) + "\n" for r in records))  # a blank first line
    with pytest.raises(ValueError, match=r"geffect\.jsonl:4: " + problem.replace("(", r"\(").replace(")", r"\)")):
        write_report(run)


def test_bad_train_log_and_metrics_name_the_file(run, capsys):
    write_lines(run / "train_log.jsonl", [{"step": 0, "weights": {"count": 0}}])
    assert main(["show", str(run)]) == 2
    assert "train_log.jsonl:1: 'weights' has 'mean': null, expected a number" in capsys.readouterr().err
    write_lines(run / "train_log.jsonl", [{"step": 0}])
    (run / "metrics_after.json").write_text('{"Model Utility": 0.5,')
    with pytest.raises(ValueError, match=r"metrics_after\.json: not a JSON file"):
        write_report(run)


def test_a_regularised_run_is_named_with_its_regulariser(run):
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "regularizer": "gd"}))
    assert main(["show", str(run)]) == 0
    assert (run / "summary.md").read_text().startswith("# tnpo + gd run")
    config["regularizer"] = "none"
    (run / "config.json").write_text(json.dumps(config))
    assert main(["show", str(run)]) == 0
    assert (run / "summary.md").read_text().startswith("# tnpo run")


def test_import_does_not_import_matplotlib():
    res = run_python("-c", "import fastgeffect.report, sys; assert 'matplotlib' not in sys.modules, 'matplotlib'")
    assert res.returncode == 0, res.stderr


def test_python_m_draws_the_plots_without_pyplot(run):
    # the package's __main__; the figures are drawn without pyplot, so a caller's backend is left alone
    code = ("import runpy, sys\nsys.argv = ['report', 'show', sys.argv[1]]\ntry:\n"
            "    runpy.run_module('fastgeffect.report', run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code\nassert 'matplotlib.pyplot' not in sys.modules\n")
    res = run_python("-c", code, str(run))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("# tnpo run")
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["geffect.png", "risk.png", "weights.png"]
    assert all((run / "plots" / name).read_bytes().startswith(b"\x89PNG") for name in ("geffect.png", "risk.png"))
    assert "- [plots/weights.png](plots/weights.png)" in (run / "summary.md").read_text()


def test_compare_checks_every_run_before_writing(run, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"method": "ga"}))
    (other / "geffect.jsonl").write_text('{"step": 0}\n')
    with pytest.raises(ValueError, match=r"geffect\.jsonl:1: the record has no 'risk'"):
        compare([run, other], tmp_path / "cmp")
    assert not (tmp_path / "cmp").exists()
    (other / "geffect.jsonl").unlink()
    table = compare([run, other], tmp_path / "cmp").read_text()
    assert table.startswith("# Comparison") and "| Model Utility | 0.5 |" in table and "![curves](compare.png)" in table
    assert (tmp_path / "cmp" / "compare.png").read_bytes().startswith(b"\x89PNG")


def _string_constants(tree):
    """The string constants of a module's code: docstrings (prose) left out."""
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docs]


def test_report_names_run_files_only_through_run_files():
    # a file name written here as a literal would drift from the loop's and the driver's
    file_name = re.compile(r"\w\.(jsonl?|md|png|html|pt)\b")
    found = {p.name: [s for s in _string_constants(ast.parse(p.read_text())) if file_name.search(s)]
             for p in sorted(REPORT.glob("*.py"))}
    assert {k: v for k, v in found.items() if v} == {}


def _copy_run(run, dest, **config):
    """A copy of the run folder ``run`` at ``dest`` with some settings of its config.json changed."""
    import shutil
    shutil.copytree(run, dest)
    cfg = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**cfg, **config}))
    return dest


def test_compare_gives_runs_with_one_folder_name_their_own_labels(run, tmp_path):
    # two runs in folders of one name used to collapse into one entry (one curve, one column)
    a, b = _copy_run(run, tmp_path / "a" / "tnpo"), _copy_run(run, tmp_path / "b" / "tnpo")
    table = compare([a, b], tmp_path / "cmp").read_text()
    header = table.splitlines()[2]
    assert "(a/tnpo)" in header and "(b/tnpo)" in header
    with pytest.raises(ValueError, match="is given twice"):
        compare([a, a], tmp_path / "cmp2")


def test_compare_refuses_runs_made_under_other_settings_unless_asked(run, tmp_path, capsys):
    a = _copy_run(run, tmp_path / "a", split="forget10", eval_size=300)
    b = _copy_run(run, tmp_path / "b", split="forget05", eval_size=100)
    with pytest.raises(ValueError, match=r"split: .*'forget10', .*'forget05'; eval_size: .*300, .*100"):
        compare([a, b], tmp_path / "cmp")
    assert not (tmp_path / "cmp").exists()
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 2
    assert "--allow-different" in capsys.readouterr().err
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp"), "--allow-different"]) == 0
    assert "**Made under different settings**: split:" in (tmp_path / "cmp" / "compare.md").read_text()
