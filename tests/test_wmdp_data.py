"""fastgeffect.data.wmdp: WMDP's forget/retain corpora read from JSON-lines text in the release's
layout (a generated corpus, no network); every malformed file is refused naming the file and line."""
import json

import pytest

from fastgeffect.data.wmdp import DOMAINS, MIN_CHARS, WMDPCorpora, corpus_file, load_wmdp_corpora, read_text_jsonl


def _doc(domain, split, i):
    return f"{domain} {split} document {i}: " + " ".join(f"w{i}_{k}" for k in range(12))


def _write_corpora(folder, n=3):
    """Every corpus of the release, ``n`` documents each (one written as a bare JSON string, one
    with extra fields), plus a short line that the length filter drops and a blank line."""
    folder.mkdir(exist_ok=True)
    for domain in DOMAINS:
        for split in ("forget", "retain"):
            docs = [_doc(domain, split, i) for i in range(n)]
            lines = [json.dumps(docs[0]), json.dumps({"title": "t", "text": docs[1], "doi": "x"}), "",
                     json.dumps({"text": "too short"})] + [json.dumps({"text": d}) for d in docs[2:]]
            (folder / corpus_file(domain, split)).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def test_release_layout_is_read_in_file_order(tmp_path):
    corpora = load_wmdp_corpora(_write_corpora(tmp_path / "wmdp"))
    assert isinstance(corpora, WMDPCorpora)
    for domain in DOMAINS:
        for split in ("forget", "retain"):
            assert getattr(corpora, split)[domain] == [_doc(domain, split, i) for i in range(3)]
    assert corpora.forget_texts == corpora.forget["bio"] + corpora.forget["cyber"]
    assert corpora.retain_texts == corpora.retain["bio"] + corpora.retain["cyber"]
    cyber = load_wmdp_corpora(tmp_path / "wmdp", ["cyber"])
    assert list(cyber.forget) == ["cyber"] and cyber.forget_texts == corpora.forget["cyber"]


def test_length_filter_is_rmus(tmp_path):
    path = tmp_path / "c.jsonl"
    texts = ["x" * MIN_CHARS, "y" * (MIN_CHARS + 1), "é" * (MIN_CHARS + 1)]  # characters, not bytes
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    assert read_text_jsonl(path) == texts[1:]  # RMU keeps len(text) > min_len
    assert read_text_jsonl(path, min_chars=0) == texts
    with pytest.raises(ValueError, match=r"c\.jsonl: no document longer than 100 characters \(3 records\)"):
        read_text_jsonl(path, min_chars=100)
    with pytest.raises(ValueError, match="min_chars"):
        read_text_jsonl(path, min_chars=-1)


@pytest.mark.parametrize("content, match", [
    (b'{"text": "' + b"a" * 60 + b'"}\n{"text": "unterminated\n', r"cyber-forget-corpus\.jsonl:2: not a JSON line"),
    (b"plain text, not JSON lines at all\n", r"cyber-forget-corpus\.jsonl:1: not a JSON line"),
    (b'\n\n{"body": "no text field"}\n', r"cyber-forget-corpus\.jsonl:3: expected a string 'text' field, found no "
                                       r"such field \(fields: body\)"),
    (b'{"text": ["a", "b"]}\n', r"cyber-forget-corpus\.jsonl:1: expected a string 'text' field, found a list"),
    (b"[1, 2]\n", r"cyber-forget-corpus\.jsonl:1: expected a JSON object .* got a JSON list"),
    (b'{"text": "' + b"a" * 60 + b'"}\n\xff\xfe\x00garbage\n', r"cyber-forget-corpus\.jsonl:2: not UTF-8"),
    (b"", r"cyber-forget-corpus\.jsonl: no document longer than 50 characters \(0 records\)"),
])
def test_malformed_corpus_is_refused_naming_file_and_line(tmp_path, content, match):
    folder = _write_corpora(tmp_path / "wmdp")
    (folder / "cyber-forget-corpus.jsonl").write_bytes(content)
    with pytest.raises(ValueError, match=match):
        load_wmdp_corpora(folder)
    assert len(load_wmdp_corpora(folder, ["bio"]).forget_texts) == 3  # the other domain's files are fine


def test_missing_files_and_bad_arguments_are_refused(tmp_path):
    folder = _write_corpora(tmp_path / "wmdp")
    (folder / "bio-retain-corpus.jsonl").unlink()
    (folder / "cyber-forget-corpus.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="missing WMDP corpus files bio-retain-corpus.jsonl, "
                                                "cyber-forget-corpus.jsonl"):
        load_wmdp_corpora(folder)
    with pytest.raises(FileNotFoundError, match="no such WMDP data folder"):
        load_wmdp_corpora(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nothing.jsonl: no such WMDP corpus file"):
        read_text_jsonl(tmp_path / "nothing.jsonl")
    with pytest.raises(ValueError, match="unknown WMDP domain 'chem'"):
        load_wmdp_corpora(folder, ["chem"])
    with pytest.raises(ValueError, match="non-empty list"):
        load_wmdp_corpora(folder, "bio")
    with pytest.raises(ValueError, match="'forget' or 'retain'"):
        corpus_file("bio", "test")
