"""fastgeffect.jsonl: the one reader, appender, atomic writer and resume truncation of JSON lines."""
import json
import math

import pytest

from fastgeffect.jsonl import JsonlAppender, append_jsonl, json_line, read_jsonl, truncate_jsonl, write_jsonl_atomic


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
    assert path.read_text() == '{"b": 3}\n' and [p.name for p in tmp_path.iterdir()] == ["data.json"]


def test_lines_are_json_dumps_defaults_in_the_record_key_order():
    # the bytes every log had before the appends were routed here
    record = {"step": 3, "z": 0.1 + 0.2, "a": [1, None, True], "nested": {"y": 1e-310, "x": "é"}}
    assert json_line(record) == json.dumps(record) + "\n"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_appends_are_strict_json_and_all_or_nothing(tmp_path, bad):
    path = tmp_path / "log.jsonl"
    append_jsonl(path, [{"step": 0, "loss": 1.0}])
    with pytest.raises(ValueError, match=r"log.jsonl: refusing to write 'weights' → 'std' is (nan|inf|-inf).*"
                                         r"None.*nothing was written"):
        append_jsonl(path, [{"step": 1, "loss": 0.5}, {"step": 2, "weights": {"mean": 1.0, "std": bad}}])
    with JsonlAppender(path) as log:
        with pytest.raises(ValueError, match="refusing to write 'grad_norm'"):
            log.append([{"step": 1, "grad_norm": bad}])
        log.append([{"step": 1, "inv_conf": None}])  # an undefined value is null
    assert path.read_text() == '{"step": 0, "loss": 1.0}\n{"step": 1, "inv_conf": null}\n'


def test_a_rewrite_keeps_what_an_older_version_wrote(tmp_path):
    path = tmp_path / "geffect.jsonl"
    path.write_text('{"step": 0, "inv_conf": Infinity}\n{"step": 1, "inv_conf": 2.0}\n')
    assert truncate_jsonl(path, from_step=1)  # a resume over a log with a non-strict line still works
    assert path.read_text() == '{"step": 0, "inv_conf": Infinity}\n'
