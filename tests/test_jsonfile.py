"""Whole JSON files: the atomic strict writer and the reader that names a broken file."""
import errno
import json
import math
import os

import pytest

from fastgeffect.distributed import write_json_main
from fastgeffect.jsonfile import JSONFileError, read_json, write_json


def test_write_json_round_trip_leaves_no_temporary(tmp_path):
    path = tmp_path / "m.json"
    write_json(path, {"a": 1.5, "b": [1, None], "p": tmp_path})
    assert read_json(path) == {"a": 1.5, "b": [1, None], "p": str(tmp_path)}
    write_json_main(path, {"c": 2})
    assert json.loads(path.read_text()) == {"c": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_write_json_refuses_non_finite_numbers_and_keeps_the_old_file(tmp_path, bad):
    path = tmp_path / "metrics.json"
    write_json(path, {"ok": 1})
    with pytest.raises(ValueError, match=r"metrics.json.*'log Forget Quality' → 1 is"):
        write_json(path, {"Prob.": 0.5, "log Forget Quality": [0.0, bad]})
    with pytest.raises(ValueError, match="metrics.json: refusing to write 'x' is"):
        write_json_main(path, {"x": bad})  # the driver's writer of config and metrics files
    assert read_json(path) == {"ok": 1} and "NaN" not in path.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_write_json_on_a_full_disk_keeps_the_old_file_and_names_the_path(tmp_path, monkeypatch):
    path = tmp_path / "eval_log_forget.json"
    write_json(path, {"old": 1})

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="cannot write .*eval_log_forget.json .No space left.*unchanged"):
        write_json(path, {"new": 2})
    assert read_json(path) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["eval_log_forget.json"]  # the temporary is removed


@pytest.mark.parametrize("content, problem", [(b"", "is empty"), (b'{"avg_gt_loss": {"0": 1.', "not valid JSON"),
                                              (b'{"a": "\xff"}', "not UTF-8")])
def test_read_json_names_a_broken_file(tmp_path, content, problem):
    path = tmp_path / "eval_log_forget.json"
    path.write_bytes(content)
    with pytest.raises(JSONFileError, match=rf"eval_log_forget.json: .*{problem}.*partial write.*delete it and rerun"):
        read_json(path)
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "absent.json")
