"""The retain twin's forget log is checked against what TOFU's log stores (issue 24, item 7): the
answer cut to the tokens within max_length. A log made at this evaluation's length is accepted even
where answers are cut; one made at another length, eval size or forget split is refused, each named
as what it is."""
import pytest
from helpers.toy_qa import tiny_llama, toy_qa_records, toy_tokenizer_for

from fastgeffect.data.templates import get_template
from fastgeffect.eval import evaluate_tofu, load_logs

TPL = get_template("phi")


@pytest.fixture(scope="module")
def toy():
    recs = toy_qa_records(6)
    tok = toy_tokenizer_for(recs, TPL)
    model = tiny_llama(len(tok), hidden_size=24, layers=2, heads=2, seed=3, tokenizer=tok)
    return model, tok, recs


def _short_length(tok, recs):
    """A max_length that cuts every answer but leaves a few of its tokens."""
    return min(len(tok(TPL.prompt(r["question"]) + TPL.answer_start)["input_ids"]) for r in recs) + 3


def _twin_log(model, tok, recs, folder, **kw):
    evaluate_tofu(model, tok, TPL, {"forget": recs}, out_dir=folder, max_new_tokens=2, batch_size=4,
                  progress=False, **kw)
    return folder / "eval_log_forget.json"


def test_a_log_made_at_this_length_is_accepted_where_answers_are_cut(toy, tmp_path):
    model, tok, recs = toy
    short = _short_length(tok, recs)
    log = _twin_log(model, tok, recs, tmp_path / "twin", max_length=short)
    stored = [v[-1] for v in load_logs(tmp_path / "twin")["eval_log_forget.json"]["generated_text"].values()]
    assert all(s != r["answer"] for s, r in zip(stored, recs))  # every answer is cut: the case that failed
    res = evaluate_tofu(model, tok, TPL, {"forget": recs}, retain_log=log, max_length=short, max_new_tokens=2,
                        batch_size=4, progress=False)
    assert res["metrics"]["Forget Quality"] == 1.0  # the same model: the same truth ratios


def test_a_log_made_at_another_length_is_named_as_such(toy, tmp_path):
    model, tok, recs = toy
    short = _short_length(tok, recs)
    log = _twin_log(model, tok, recs, tmp_path / "twin", max_length=short)
    kw = dict(max_new_tokens=2, batch_size=4, progress=False)
    with pytest.raises(ValueError, match=r"cut at another length .* another max length"):
        evaluate_tofu(model, tok, TPL, {"forget": recs}, retain_log=log, max_length=short + 4, **kw)
    with pytest.raises(ValueError, match=r"cut at another length .*the sizes differ too \(12 samples there, 5 here\)"):
        evaluate_tofu(model, tok, TPL, {"forget": recs}, retain_log=log, max_length=200, ds_size=5, **kw)


def test_another_size_or_split_is_named_as_such(toy, tmp_path):
    model, tok, recs = toy
    short = _short_length(tok, recs)
    log = _twin_log(model, tok, recs, tmp_path / "twin", max_length=short)
    # checked before anything is evaluated (model=None), with the raw answers the log's cuts come from
    with pytest.raises(ValueError, match=r"has 12 samples but this forget evaluation 5: the same forget split "
                                         r"evaluated with another eval size"):
        evaluate_tofu(None, tok, TPL, {"forget": recs}, retain_log=log, ds_size=5, max_length=short,
                      progress=False)
    with pytest.raises(ValueError, match=r"other ground-truth answers \(samples \[0, 1, 2, 3, 4\]\).*another "
                                         r"forget split.*sizes differ too \(12 samples there, 6 here\)"):
        evaluate_tofu(None, tok, TPL, {"forget": recs[6:]}, retain_log=log, max_length=short, progress=False)


def test_an_evaluation_length_that_leaves_no_answer_token_is_refused_naming_the_flag(toy):
    """Found before any evaluation (it surfaced as a traceback deep in the TOFU evaluator)."""
    import argparse

    from fastgeffect.driver import cli
    from fastgeffect.driver.evaluation import check_eval_length

    _, tok, recs = toy
    target = argparse.Namespace(tokenizer=tok, template=TPL, max_length=500)
    longest = max(len(tok(TPL.prompt(r["question"]))["input_ids"]) for r in recs)
    sets = {"forget": recs[:3], "retain": recs}
    fits = cli.parse_args(["--preset", "embedded", "--eval-max-length", str(longest + 1)])
    check_eval_length(target, sets, fits)
    short = cli.parse_args(["--preset", "embedded", "--eval-max-length", str(longest)])
    with pytest.raises(SystemExit, match=rf"evaluation length {longest} tokens leaves no answer token for the "
                                         rf"longest prompt \({longest} tokens, .*set --eval-max-length to more "
                                         rf"than {longest}"):
        check_eval_length(target, sets, short)
