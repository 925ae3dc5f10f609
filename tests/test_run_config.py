"""One config that is also the command line: every flag of ``python -m fastgeffect.run`` is a
``RunConfig`` field and every field a flag (finetune's likewise), the objective hyper-parameter fields
are the HPARAMS table's, every default is stated once, and parsed settings are never changed."""
import dataclasses
import re
import typing
from typing import Optional

import pytest

from fastgeffect.dataclass_cli import Parser, add_arguments, first_error, like, setting
from fastgeffect.driver import cli
from fastgeffect.driver import config as run_config
from fastgeffect.driver.config import RunConfig, default_out, train_config, usage_error, with_defaults
from fastgeffect.driver.presets import PRESETS
from fastgeffect.finetune import config as finetune_config
from fastgeffect.finetune.config import FinetuneConfig
from fastgeffect.finetune.recipe import Recipe
from fastgeffect.objectives import HPARAMS
from fastgeffect.run import main
from fastgeffect.training.config import UnlearnConfig

# config.json's first keys, in this order (a resumed run compares them; run folders are compared byte for byte)
CONFIG_KEYS = [
    "method", "regularizer", "lam", "alpha", "beta", "beta1", "beta2", "delta", "wtnpo_form", "rmu_layer",
    "steering_coeff", "control_seed", "kl_direction", "kl_positions", "rr_layer", "ignore_first_n_answer_tokens",
    "constraint_eps", "dual_step", "fused", "model", "preset", "benchmark", "split", "data_dir", "authors",
    "muse_forget", "wmdp_domains", "stride", "size", "max_length",
    "retain_log", "cache_dir", "shared_dir", "retain_model", "template", "lora", "epochs", "batch_size", "grad_accum",
    "lr", "weight_decay", "decay_all_params", "warmup_epochs", "max_grad_norm", "seed", "target_seed", "device",
    "fsdp2", "bf16",
    "gradient_checkpointing", "geffect_every", "geffect_batch", "geffect_groups", "risk_rows", "update_effects",
    "second_order", "stop_at_retain_damage", "stop_damage_from", "geffect_guard", "guard_scope", "gru_gamma",
    "pg_steps", "eval", "eval_metrics", "attacks",
    "relearn_steps", "relearn_lr", "eval_tasks", "eval_tasks_include", "eval_tasks_limit",
    "eval_size", "eval_batch_size", "no_uwc", "uwc_rows", "ps_protocol", "eval_max_length",
    "gen_mode", "truth_ratio_agg", "out",
    "resume", "overwrite", "save_model", "checkpoint_epochs", "save_every", "stop_at_step", "no_progress", "report_to"]


def listed_flags(help_text: str) -> set:
    """The settings a --help lists: option lines ``  --x-y ...`` (``--x, --no-x``: the one setting x)."""
    names = set()
    for line in help_text.splitlines():
        m = re.match(r"^  (--[a-z0-9-]+(?:, --[a-z0-9-]+)*)", line)
        if m:
            first = m.group(1).split(", ")[0]
            names.add(first[2:].replace("-", "_"))
    return names - {"help"}


def test_every_run_flag_is_a_field_and_every_field_a_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    flags = listed_flags(capsys.readouterr().out)
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    assert flags - fields == set(), "flags that are no RunConfig field"
    assert fields - flags == set(), "RunConfig fields without a flag"
    assert [f.name for f in dataclasses.fields(RunConfig)] == CONFIG_KEYS


def test_every_finetune_flag_is_a_field_and_every_field_a_flag():
    flags = listed_flags(finetune_config.build_parser().format_help())
    assert flags == {f.name for f in dataclasses.fields(FinetuneConfig)}


def test_objective_hparam_fields_are_the_hparams_table():
    by_name = {f.name: f for f in dataclasses.fields(RunConfig)}
    hints = typing.get_type_hints(RunConfig)
    assert [n for n in by_name if n in HPARAMS] == list(HPARAMS), "one field per HPARAMS name, in its order"
    for name, hp in HPARAMS.items():
        assert hints[name] == Optional[hp.type], name
        assert by_name[name].default is None  # the objective's own
        assert by_name[name].metadata["choices"] == hp.choices
        assert by_name[name].metadata["help"].startswith(hp.help)


def test_training_defaults_and_bounds_are_stated_once():
    run = {f.name: f for f in dataclasses.fields(RunConfig)}
    loop = {f.name: f for f in dataclasses.fields(UnlearnConfig)}
    for f in loop.values():
        if f.name in ("lr", "update_effects", "pg_steps"):  # the preset's; on/off; the driver's own steps
            continue
        assert run[f.name].default == f.default, f.name
        assert run[f.name].metadata["bound"] == f.metadata["bound"], f.name
    assert run["lr"].default is None and run["lr"].metadata["bound"] == loop["lr"].metadata["bound"]
    assert run["update_effects"].default == ("on" if UnlearnConfig.update_effects else "off")
    tune = {f.name: f for f in dataclasses.fields(FinetuneConfig)}
    for f in dataclasses.fields(Recipe):
        assert f.name in tune and tune[f.name].metadata["bound"] == f.metadata["bound"], f.name
        if f.name != "lr":
            assert tune[f.name].default == f.default, f.name
    assert FinetuneConfig(model="m", data_dir="d", out="o").recipe(1e-3) == Recipe(lr=1e-3)


def test_spelled_out_choices_are_their_homes():
    from fastgeffect.data.templates import TEMPLATES
    from fastgeffect.eval.ps_protocols import PS_PROTOCOLS
    from fastgeffect.geffect import GROUPINGS

    assert run_config.GEFFECT_GROUPINGS == GROUPINGS
    assert sorted(run_config.TEMPLATE_NAMES) == sorted(TEMPLATES)
    assert run_config.PS_PROTOCOLS == PS_PROTOCOLS


def test_parsed_settings_are_never_changed():
    cfg = cli.parse_args(["--method", "simnpo", "--seed", "3"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0
    assert cfg.out == str(default_out(cfg)) == "runs/simnpo-gd-forget10-seed3"
    resolved = with_defaults(cfg, PRESETS["embedded"])
    assert (cfg.preset, cfg.lr, cfg.gen_mode, cfg.regularizer) == (None, None, None, None)  # untouched
    assert (resolved.preset, resolved.lr, resolved.gen_mode, resolved.regularizer) == \
        ("embedded", 1e-3, "independent", "gd")
    assert with_defaults(dataclasses.replace(cfg, lr=0.5), PRESETS["embedded"]).lr == 0.5  # given: kept
    assert train_config(resolved) == UnlearnConfig(epochs=5, lr=1e-3, seed=3, pg_steps=(0, -1))
    # the folder name is the same whether computed from the config or from the parser's Namespace
    ap = cli.build_parser()
    assert default_out(ap.parse_args(["--method", "wga", "--alpha", "2"]), ap.parse_args([])) == \
        default_out(RunConfig(method="wga", alpha=2.0))


def test_usage_errors_name_the_flag():
    assert usage_error(RunConfig()) is None
    assert usage_error(RunConfig(lr=float("nan"))) == "--lr must be a finite number > 0, got nan"
    assert usage_error(RunConfig(beta=0.0)).startswith("--beta must be a finite number > 0")
    assert usage_error(RunConfig(method="undial", beta=0.0)) is None  # UNDIAL's own bound, from HPARAMS
    assert usage_error(RunConfig(lora=0)) == "--lora must be an integer >= 1 (the adapters' rank), got 0"
    assert usage_error(RunConfig(out="")) == "--out is empty: give a path, or leave the flag out for its default"
    assert usage_error(RunConfig(template="chat")).startswith("--template needs --model")
    assert usage_error(RunConfig(pg_steps="0,-3")).startswith("--pg-steps: steps are >= 0")


def test_library_configs_check_their_bounds_from_the_same_fields():
    with pytest.raises(ValueError, match="^epochs must be an integer >= 1, got 0$"):
        UnlearnConfig(epochs=0).check()
    with pytest.raises(ValueError, match=r"^seed must be an integer in \[0, 2\^32\), got -1$"):
        UnlearnConfig(seed=-1).check()
    with pytest.raises(ValueError, match="is not divisible by grad_accum 3"):
        UnlearnConfig(grad_accum=3).check()
    with pytest.raises(ValueError, match="^--lora must be an integer >= 0, got -1$"):
        Recipe(lr=1e-3, lora=-1).check()


@dataclasses.dataclass(frozen=True)
class Toy:
    name: str = setting(help="required: no default", path=True)
    rate: float = setting(0.5, "a rate", group="numbers", low=0, strict=True, why="0: off is not allowed")
    count: int = setting(2, "a count", group="numbers", low=1, high=10)
    mode: str = setting("a", "a mode", choices=("a", "b"))
    fast: Optional[bool] = setting(None, "tri-state")
    keep: bool = setting(False, "a switch", group="once", exclusive="one")
    drop: bool = setting(False, "another switch", group="once", exclusive="one")
    hidden: int = setting(0, "set in Python only", flag=False)
    copied: int = like(UnlearnConfig, "epochs", group="numbers")


def toy_parser():
    return add_arguments(Parser(prog="toy"), Toy)


def test_the_parser_is_generated_from_the_fields():
    ap = toy_parser()
    ns = ap.parse_args(["--name", "x", "--rate", "-1e-3"])  # a negative number is a value
    assert vars(ns) == {"name": "x", "rate": -0.001, "count": 2, "mode": "a", "fast": None, "keep": False,
                        "drop": False, "copied": 5}
    assert first_error(Toy(**vars(ns))) == "--rate must be a finite number > 0 (0: off is not allowed), got -0.001"
    assert first_error(Toy(name="x", count=10)) == "--count must be an integer in [1, 10), got 10"
    assert first_error(Toy(name="x", copied=0)) == "--copied must be an integer >= 1, got 0"
    assert first_error(Toy(name=" ")) == "--name is empty: give a path"  # required: it has no default
    assert first_error(Toy(name="x", mode="c")) == "--mode must be one of a, b, got 'c'"
    assert ap.parse_args(["--name", "x", "--no-fast"]).fast is False
    for bad in (["--rate", "1"], ["--name", "x", "--keep", "--drop"], ["--name", "x", "--hidden", "1"]):
        with pytest.raises(SystemExit):
            ap.parse_args(bad)  # required, exclusive, not a flag
    help_text = ap.format_help()
    assert "numbers:" in help_text and "once:" in help_text
    with pytest.raises(TypeError, match="unknown metadata"):
        like(UnlearnConfig, "epochs", colour="red")


def test_help_states_the_presets_values_from_the_presets():
    from fastgeffect.driver.presets import by_preset

    assert by_preset("gen_mode") == "independent for embedded, tofu for phi/llama"
    assert by_preset("template", model_only=True) == "phi for phi, llama2 for llama"
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(RunConfig)}
    for name in ("gen_mode", "ps_protocol"):
        assert by_preset(name) in helps[name]
