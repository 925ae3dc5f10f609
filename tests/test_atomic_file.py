"""fastgeffect.atomic_file: the one atomic writer, and every writer of a whole file routed through it."""
import errno
import os

import pytest
import torch

from fastgeffect.atomic_file import atomic_write
from fastgeffect.jsonfile import read_json, write_json
from fastgeffect.jsonl import write_jsonl_atomic
from fastgeffect.reference import RefLogprobCache
from fastgeffect.training.backend import StateNotSaved, write_state


def test_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "f.bin"
    assert atomic_write(path, lambda f: f.write(b"one")) == path
    atomic_write(str(path), lambda f: f.write(b"two"))
    assert path.read_bytes() == b"two" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failed_or_interrupted_write_keeps_the_previous_file(tmp_path, error):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def half_then_fail(f):
        f.write(b"partial")
        raise error
    with pytest.raises(type(error)):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_every_whole_file_writer_syncs_through_it(tmp_path, monkeypatch):
    """A failing fsync (a full disk) reaches each writer: they all write through atomic_write."""
    state, cache, js, jl = (tmp_path / n for n in ("state.pt", "ref.pt", "m.json", "log.jsonl"))
    write_state(state, {"step": 1})
    RefLogprobCache({0: torch.ones(2)}).save(cache)
    write_json(js, {"old": 1})
    write_jsonl_atomic(jl, [{"step": 0}])

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(StateNotSaved, match="No space left"):
        write_state(state, {"step": 2})
    with pytest.raises(OSError, match="could not write the reference log-probs"):
        RefLogprobCache({0: torch.zeros(2)}).save(cache)
    with pytest.raises(OSError, match="cannot write"):
        write_json(js, {"new": 2})
    with pytest.raises(OSError, match="No space left"):
        write_jsonl_atomic(jl, [{"step": 1}])
    monkeypatch.undo()
    assert torch.load(state, weights_only=False) == {"step": 1}
    assert torch.equal(RefLogprobCache.load(cache).entries[0], torch.ones(2))
    assert read_json(js) == {"old": 1} and jl.read_text() == '{"step": 0}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl", "m.json", "ref.pt", "state.pt"]


def test_a_saved_state_does_not_depend_on_its_file_name(tmp_path):
    # torch.save names its archive after a file it is given by path (the temporary's: per process)
    state = {"step": 3, "model": {"w": torch.arange(6.0).reshape(2, 3)}}
    write_state(tmp_path / "a.pt", state)
    write_state(tmp_path / "state.pt", state)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "state.pt").read_bytes()
