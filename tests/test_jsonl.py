"""fastgeffect.jsonl: the one reader, appender, atomic writer and resume truncation of JSON lines."""
import pytest

from fastgeffect.jsonl import append_jsonl, read_jsonl, truncate_jsonl, write_jsonl_atomic


def test_append_read_truncate(tmp_path):
    path = tmp_path / "log.jsonl"
    assert not truncate_jsonl(path)  # no file: nothing to do
    append_jsonl(path, [{"step": s, "v": s * 1.5} for s in range(4)])
    append_jsonl(path, [{"note": "no step"}])
    assert [r.get("step") for r in read_jsonl(path)] == [0, 1, 2, 3, None]
    assert not truncate_jsonl(path)  # intact: untouched
    with open(path, "a") as f:
        f.write('{"step": 4, "v"')  # torn by a crash
    with pytest.raises(ValueError, match=r"log.jsonl:6"):
        read_jsonl(path)
    assert len(read_jsonl(path, skip_torn_tail=True)) == 5
    assert truncate_jsonl(path, from_step=2)
    assert read_jsonl(path) == [{"step": 0, "v": 0.0}, {"step": 1, "v": 1.5}, {"note": "no step"}]


def test_data_files_may_end_without_newline(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('{"a": 1}\n\n{"a": 2}')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    write_jsonl_atomic(path, [{"b": 3}])
    assert path.read_text() == '{"b": 3}\n' and not (tmp_path / "data.json.tmp").exists()
