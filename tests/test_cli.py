"""Every command line: a help line for every flag, defaults said once and never contradicted,
examples in the epilog, and --help answered before any heavy import."""
import argparse
import json
import subprocess
import sys

import pytest

from fastgeffect.data.templates import TEMPLATES
from fastgeffect.driver.cli import build_parser as run_parser
from fastgeffect.driver.cli import parse_args
from fastgeffect.driver.presets import PRESETS
from fastgeffect.driver.run_folder import RunFolder
from fastgeffect.eval.__main__ import build_parser as eval_parser
from fastgeffect.report import build_parser as report_parser
from fastgeffect.sweep import build_parser as sweep_parser


def parsers():
    """(name, parser) of every command line and sub-command."""
    out = []
    for name, p in (("run", run_parser()), ("sweep", sweep_parser()), ("report", report_parser()),
                    ("eval", eval_parser())):
        out.append((name, p))
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                out += [(f"{name} {sub}", sp) for sub, sp in action.choices.items()]
    return out


@pytest.mark.parametrize("name,parser", parsers(), ids=[n for n, _ in parsers()])
def test_every_flag_has_one_consistent_help_line(name, parser):
    fmt = parser.formatter_class(parser.prog)
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        text = fmt._expand_help(action) if action.help else ""
        flag = "/".join(action.option_strings) or action.dest
        assert text.strip(), f"{name}: {flag} has no help"
        assert "default: None" not in text and "(default: False)" not in text, f"{name}: {flag}: {text}"
        assert text.count("(default") <= 1, f"{name}: {flag} states its default twice: {text}"
    assert parser.format_help()  # renders


def test_run_help_shows_examples_and_needs_no_heavy_import():
    code = ("import sys\nfrom fastgeffect.run import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n"
            "    assert e.code == 0\nheavy = [m for m in ('transformers', 'accelerate', 'scipy', 'matplotlib') "
            "if m in sys.modules]\nassert not heavy, heavy\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "python -m fastgeffect.run --method tnpo" in res.stdout  # the module docstring's examples
    assert "--no-bf16" in res.stdout and "--no-gradient-checkpointing" in res.stdout


def test_run_flags():
    p = run_parser()
    assert p.parse_args([]).bf16 is None  # the default depends on the device
    assert p.parse_args(["--bf16"]).bf16 is True and p.parse_args(["--no-bf16"]).bf16 is False
    assert p.parse_args(["--no-gradient-checkpointing"]).gradient_checkpointing is False
    with pytest.raises(SystemExit):
        p.parse_args(["--resume", "--overwrite"])
    with pytest.raises(SystemExit):
        p.parse_args(["--method", "bogus"])
    with pytest.raises(SystemExit):
        p.parse_args(["--wtnpo-form", "bogus"])  # choices come from the registry


def test_objective_hparams_take_preset_values_only_where_accepted():
    from fastgeffect.driver.config import RunConfig, objective_hparams

    cfg = RunConfig(method="rmu", regularizer="rr")
    assert objective_hparams(cfg, PRESETS["phi"]) == {"rmu_layer": 9, "steering_coeff": 4.0}
    cfg = RunConfig(method="rmu", regularizer="rr", rmu_layer=2)
    assert objective_hparams(cfg, PRESETS["llama"]) == {"rmu_layer": 2, "steering_coeff": 2.0}
    cfg = RunConfig(method="npo", regularizer="none", alpha=2.0)  # passed on: the objective refuses it
    assert objective_hparams(cfg, PRESETS["phi"]) == {"alpha": 2.0}


def test_run_folder_refuses_to_mix_runs(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.prepare(resume=False, overwrite=False, settings={}, resume_keys=())
    folder.write_config({"method": "ga", "seed": 0})
    folder.write_config({"method": "npo"})  # written once: a resumed run keeps the first
    assert json.loads(folder.config_path.read_text())["method"] == "ga"
    with pytest.raises(SystemExit, match="holds another run"):
        folder.prepare(resume=False, overwrite=False, settings={}, resume_keys=())
    with pytest.raises(SystemExit, match=r"other settings \{'seed': \(0, 1\)\}"):
        folder.prepare(resume=True, overwrite=False, settings={"method": "ga", "seed": 1},
                       resume_keys=("method", "seed"))
    folder.prepare(resume=True, overwrite=False, settings={"method": "ga", "seed": 0}, resume_keys=("method", "seed"))
    folder.prepare(resume=False, overwrite=True, settings={}, resume_keys=())
    assert folder.path.is_dir() and not folder.has_config()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("")
    with pytest.raises(SystemExit, match="not a run folder"):
        RunFolder(tmp_path / "other").prepare(resume=True, overwrite=False, settings={}, resume_keys=())
    first = folder.start_timing()
    folder.update_timing(first, {"resumed": False, "status": "done", "total": 1.0})
    second = folder.start_timing()
    folder.update_timing(second, {"resumed": True, "status": "done", "total": 2.0})
    assert [t["resumed"] for t in json.loads((folder / "timing.json").read_text())] == [False, True]


def test_a_killed_invocation_keeps_its_timing_entry(tmp_path):
    # timing.json used to be written once, at the end: a killed invocation's seconds were lost
    import time

    from fastgeffect.driver.study import Timer
    folder = RunFolder(tmp_path / "run")
    folder.prepare(resume=False, overwrite=False, settings={}, resume_keys=())
    killed = Timer(folder)
    killed.phase("setup", time.perf_counter() - 1.5)
    killed.phase("reference", time.perf_counter() - 0.5)  # then SIGKILL: no other line of it runs
    entries = json.loads((folder / "timing.json").read_text())
    assert entries == [{"resumed": False, "status": "running", "setup": pytest.approx(1.5, abs=0.5),
                        "reference": pytest.approx(0.5, abs=0.5)}]
    resumed = Timer(folder, resumed=True)
    resumed.phase("setup", time.perf_counter() - 2.0)
    resumed.save("stopped")
    entries = json.loads((folder / "timing.json").read_text())
    assert [e["status"] for e in entries] == ["killed", "stopped"] and set(entries[0]) >= {"setup", "reference"}
    assert entries[1]["resumed"] is True and entries[1]["setup"] == pytest.approx(2.0, abs=0.5)


def test_template_choices_are_the_package_templates_and_need_model(capsys):
    for parser in (run_parser(), eval_parser()._subparsers._group_actions[0].choices["tofu"]):
        action = next(a for a in parser._actions if a.dest == "template")
        assert sorted(action.choices) == sorted(TEMPLATES) and action.default is None
    with pytest.raises(SystemExit):
        parse_args(["--template", "chat"])
    assert "--template needs --model" in capsys.readouterr().err
