"""No weight decay on biases and norm weights in unlearning (issue 28, item 6c), as Hugging Face's
Trainer: the param groups against ``Trainer.get_decay_parameter_names`` and a hand-made module,
``decay_all_params`` restoring decay on every parameter, LoRA (adapters only), and a run folder
of an older version (which decayed every parameter) resuming as it ran."""
import json

import pytest
import torch
from helpers.model_families import tiny_model
from torch import nn
from transformers import Trainer

from fastgeffect.driver.config import RunConfig, as_older_run, train_config, with_defaults
from fastgeffect.driver.presets import resolve_preset
from fastgeffect.run import main
from fastgeffect.training.decay import decay_param_groups, no_decay_names


def names_in(model, groups):
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [(sorted(name_of[id(p)] for p in g["params"]), g["weight_decay"]) for g in groups]


class Hand(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 4)                   # weight decayed, bias not
        self.ln = nn.LayerNorm(4)                     # a LayerNorm by type, whatever its name
        self.final_norm = nn.Parameter(torch.ones(4))  # "_norm" in the name
        self.normalizer = nn.Parameter(torch.ones(2, 2))  # "norm" only as part of a word: decayed
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_param_groups_of_a_hand_made_module():
    model = Hand()
    assert no_decay_names(model) == {"proj.bias", "ln.weight", "ln.bias", "final_norm", "frozen.bias"}
    groups = decay_param_groups(model, 0.01)
    assert names_in(model, groups) == [(["normalizer", "proj.weight"], 0.01),
                                       (["final_norm", "ln.bias", "ln.weight", "proj.bias"], 0.0)]
    assert names_in(model, decay_param_groups(model, 0.01, decay_all=True)) == [
        (["final_norm", "ln.bias", "ln.weight", "normalizer", "proj.bias", "proj.weight"], 0.01)]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi", "opt"])
def test_param_groups_are_hugging_faces(arch):
    model = tiny_model(arch, layers=2)
    # (uses no Trainer state) HF lists a tied weight under both names, named_parameters once
    decayed = set(Trainer.get_decay_parameter_names(None, model)) & {n for n, _ in model.named_parameters()}
    (decay, wd), (rest, zero) = names_in(model, decay_param_groups(model, 0.1))
    assert (wd, zero) == (0.1, 0.0)
    assert set(decay) == decayed and rest and not set(rest) & decayed
    assert set(decay) | set(rest) == {n for n, _ in model.named_parameters()}
    assert all(n.endswith("bias") or "norm" in n or "ln" in n for n in rest), rest


def test_lora_adapters_only_all_decayed():
    from fastgeffect.driver.lora import add_lora
    model = add_lora(tiny_model("llama", layers=2), 2)
    groups = names_in(model, decay_param_groups(model, 0.01))
    assert len(groups) == 1  # bias="none": no adapter bias, and the frozen norms are not trainable
    names, wd = groups[0]
    assert wd == 0.01 and names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert set(names) == {n for n, p in model.named_parameters() if p.requires_grad}


def test_the_driver_passes_the_flag_and_an_older_folder_keeps_decaying_everything():
    cfg = with_defaults(RunConfig(method="ga"), resolve_preset("embedded", None))
    assert train_config(cfg).decay_all_params is False
    assert train_config(RunConfig(**{**cfg.__dict__, "decay_all_params": True})).decay_all_params is True
    assert as_older_run(cfg, {"method": "ga"}).decay_all_params is True  # made before the setting
    assert as_older_run(cfg, {"decay_all_params": False}).decay_all_params is False


@pytest.mark.usefixtures("module_embedded_cache")
def test_unlearning_optimiser_groups_and_an_older_run_folder_resumes(tmp_path, monkeypatch):
    from fastgeffect.unlearn import Unlearner
    seen = []
    real_init = Unlearner.__init__

    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        seen.append([(len(g["params"]), g["weight_decay"]) for g in self.optimizer.param_groups])

    monkeypatch.setattr(Unlearner, "__init__", spy)
    common = ["--size", "tiny", "--no-progress", "--method", "ga", "--eval", "none", "--epochs", "2",
              "--batch-size", "2", "--geffect-every", "0"]
    assert main([*common, "--out", str(tmp_path / "new"), "--stop-at-step", "1"]) == 0
    (n_decay, wd), (n_rest, zero) = seen[-1]
    assert wd == pytest.approx(0.01) and zero == 0.0 and n_decay > 0 and n_rest > 0
    assert json.loads((tmp_path / "new" / "config.json").read_text())["decay_all_params"] is False
    # an older version decayed every parameter and recorded no decay_all_params
    old = tmp_path / "old"
    assert main([*common, "--out", str(old), "--stop-at-step", "1", "--decay-all-params"]) == 0
    assert seen[-1] == [(n_decay + n_rest, wd)]
    cfg = json.loads((old / "config.json").read_text())
    del cfg["decay_all_params"], cfg["train"]["decay_all_params"]
    (old / "config.json").write_text(json.dumps(cfg))
    assert main([*common, "--out", str(old), "--resume"]) == 0  # one param group, as its optimiser state
    assert seen[-1] == [(n_decay + n_rest, wd)]
    steps = len((old / "train_log.jsonl").read_text().splitlines())
    assert steps == 2 * 3  # 2 epochs of the 5 tiny forget rows in batches of 2: resumed to the end
    with pytest.raises(SystemExit, match="decay_all_params"):  # a folder that recorded it must agree
        main([*common, "--out", str(tmp_path / "new"), "--resume", "--decay-all-params"])
