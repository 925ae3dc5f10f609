"""The ``chat`` format (the tokenizer's own chat template) on a real tokenizer: chosen by default,
the generation context tokenises as a prefix of the teacher-forced text on real TOFU questions,
the answer mask covers exactly the answer and EOS, and PS reads it right."""
from pathlib import Path

import pytest

from fastgeffect.data.templates import IGNORE_INDEX, choose_template, encode_qa, get_template
from fastgeffect.data.tofu import load_tofu_split
from fastgeffect.eval.ps import ps_scores
from fastgeffect.model_loading import load_causal_lm
from tests.helpers.smollm2 import ALIAS, converted_smollm2
from tests.helpers.toy_qa import tiny_tokenizer

TOFU = Path(__file__).resolve().parents[1] / ".." / "shared" / "tofu"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    cache, _ = converted_smollm2(tmp_path_factory)
    return load_causal_lm(ALIAS, cache_dir=cache)


def test_chat_is_the_default_for_a_tokenizer_with_a_chat_template(smollm2):
    _, tok = smollm2
    assert choose_template(tok).name == "chat"
    assert choose_template(tok, "phi").name == "phi"  # --template wins
    plain = tiny_tokenizer(["Who is Ann ?"])
    assert choose_template(plain).name == "phi"
    assert choose_template(plain, default="llama2").name == "llama2"
    with pytest.raises(ValueError, match="needs a tokenizer that has a chat_template"):
        choose_template(plain, "chat")
    with pytest.raises(ValueError, match="unknown template 'vicuna'"):
        choose_template(tok, "vicuna")


@pytest.mark.skipif(not TOFU.is_dir(), reason="../shared/tofu (the TOFU data) is not present")
def test_chat_prefix_property_on_20_real_tofu_questions(smollm2):
    _, tok = smollm2
    template = get_template("chat")
    rows = load_tofu_split("full", TOFU)[::200][:20]  # 20 authors, one question each
    assert len(rows) == 20
    for r in rows:
        prompt = template.prompt(r["question"], tok)
        assert prompt.count(r["question"]) == 1 and prompt.endswith("assistant\n")  # user turn, then assistant's
        enc = encode_qa(tok, template, r["question"], r["answer"], 512)
        context = tok(prompt, add_special_tokens=False)["input_ids"]  # what generation and PS start from
        n = len(context)
        assert enc["input_ids"][:n] == context
        assert all(label == IGNORE_INDEX for label in enc["labels"][:n])
        answer = [t for t in enc["labels"][n:] if t != IGNORE_INDEX]
        assert answer[-1] == tok.eos_token_id  # the assistant turn ends with the template's end token
        assert tok.eos_token == "<|im_end|>"
        assert tok.decode(answer[:-1]) == r["answer"]  # the mask covers exactly the answer


def test_a_template_that_merges_across_the_boundary_is_refused(smollm2):
    _, tok = smollm2
    # "[/INST]" + '"...' tokenises as ']"': the prompt's tokens are not a prefix of the full text's
    with pytest.raises(ValueError, match="not a prefix of the prompt\\+answer tokens"):
        encode_qa(tok, get_template("llama2"), "Who wrote it?", '"Echoes" is by Ann.', 64)


def test_ps_with_the_chat_format(smollm2):
    model, tok = smollm2
    template = get_template("chat")
    records = [{"question": "What is the capital of France?", "answer": "The capital of France is Paris."},
               {"question": "What is the capital of France?", "answer": "Lyon is a city with many old bridges."}]
    res = ps_scores(model, tok, template, records, batch_size=2)
    # the model's own greedy answer needs no answer word (PS 1); an unrelated sentence is not completed
    assert res["scores"][0] == 1.0
    assert res["scores"][1] < 1.0
