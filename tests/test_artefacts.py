"""Shared artefacts (--shared-dir) are reused only for the model, data and settings they were computed for."""
import json
import os

import pytest
import torch

from fastgeffect.driver import artefacts
from fastgeffect.reference import RefLogprobCache
from fastgeffect.run import main

pytestmark = pytest.mark.usefixtures("module_embedded_cache")  # tiny targets built once per module


def run(out, *extra):
    return main(["--size", "tiny", "--epochs", "1", "--out", str(out), "--no-progress", *extra])


def ref_values(path):
    return {i: v.tolist() for i, v in RefLogprobCache.load(path).entries.items()}


def test_two_targets_sharing_a_folder_get_their_own_artefacts(tmp_path, capsys):
    """The issue's case: a second target (another seed) must not reuse the first's reference
    log-probs, retain log or evaluation before unlearning; corrupt artefacts are recomputed."""
    shared = tmp_path / "shared"
    assert run(tmp_path / "seed0", "--shared-dir", str(shared)) == 0
    before0 = json.loads((tmp_path / "seed0" / "metrics_before.json").read_text())
    assert run(tmp_path / "seed1", "--shared-dir", str(shared), "--seed", "1") == 0
    assert run(tmp_path / "fresh1", "--seed", "1") == 0  # the same target on its own
    err = capsys.readouterr().err
    for name in ("ref_logprobs_forget.pt", "retain_model/eval_log_forget.json", "metrics_before.json"):
        assert f"recomputing {shared / name}: it was computed with other" in err, name
    shared1 = json.loads((tmp_path / "seed1" / "metrics_before.json").read_text())
    fresh1 = json.loads((tmp_path / "fresh1" / "metrics_before.json").read_text())
    assert shared1 == pytest.approx(fresh1, rel=1e-9) and shared1 != pytest.approx(before0, rel=1e-3)
    assert ref_values(shared / "ref_logprobs_forget.pt") == ref_values(tmp_path / "fresh1" / "ref_logprobs_forget.pt")

    # half-written or emptied artefacts are named and recomputed, never read
    pt = shared / "ref_logprobs_forget.pt"
    pt.write_bytes(pt.read_bytes()[:100])
    (shared / "metrics_before.json").write_text("")
    (shared / "retain_model" / "eval_log_forget.json").write_text("")
    assert run(tmp_path / "again1", "--shared-dir", str(shared), "--seed", "1") == 0
    err = capsys.readouterr().err
    for name in ("ref_logprobs_forget.pt", "retain_model/eval_log_forget.json", "metrics_before.json"):
        assert f"recomputing {shared / name}: its bytes differ" in err, name
    again1 = json.loads((tmp_path / "again1" / "metrics_before.json").read_text())
    assert again1 == pytest.approx(fresh1, rel=1e-9)
    assert ref_values(pt) == ref_values(tmp_path / "fresh1" / "ref_logprobs_forget.pt")


def test_intact_artefacts_are_reused_and_overwrite_recomputes_them(tmp_path, capsys):
    shared = tmp_path / "shared"
    assert run(tmp_path / "a", "--shared-dir", str(shared), "--eval", "none") == 0
    stamp = os.stat(shared / "ref_logprobs_forget.pt").st_mtime_ns
    assert run(tmp_path / "b", "--shared-dir", str(shared), "--eval", "none", "--beta", "2") == 0
    assert os.stat(shared / "ref_logprobs_forget.pt").st_mtime_ns == stamp  # same target: reused
    assert "recomputing" not in capsys.readouterr().err
    assert run(tmp_path / "b", "--shared-dir", str(shared), "--eval", "none", "--beta", "2", "--overwrite") == 0
    assert f"recomputing {shared / 'ref_logprobs_forget.pt'}: --overwrite" in capsys.readouterr().err
    assert os.stat(shared / "ref_logprobs_forget.pt").st_mtime_ns != stamp


def test_cached_reuses_only_a_matching_intact_artefact(tmp_path, capsys):
    path = tmp_path / "a.json"
    calls = []

    def compute(p):
        calls.append(p)
        p.write_text(json.dumps({"value": len(calls)}))
        return {"value": len(calls)}

    def get(fingerprint, **kw):
        return artefacts.cached(path, fingerprint, compute, artefacts.load_json_dict, **kw)["value"]

    assert get({"model": "m1"}) == 1
    assert get({"model": "m1"}) == 1 and len(calls) == 1  # reused
    assert get({"model": "m2"}) == 2  # another model: recomputed
    assert "it was computed with other model" in capsys.readouterr().err
    assert get({"model": "m2"}, recompute=True) == 3
    artefacts.fingerprint_path(path).unlink()  # e.g. written by a version without fingerprints
    assert get({"model": "m2"}) == 4
    assert "it has no a.json.fingerprint.json" in capsys.readouterr().err
    path.write_text('{"value": 9}')  # changed after its fingerprint was recorded
    assert get({"model": "m2"}) == 5
    artefacts.fingerprint_path(path).write_text("{")
    assert get({"model": "m2"}) == 6
    assert "a.json.fingerprint.json is unreadable" in capsys.readouterr().err
    assert get({"model": "m2"}) == 6 and len(calls) == 6


def test_reference_cache_load_names_a_corrupt_file(tmp_path):
    path = tmp_path / "ref.pt"
    RefLogprobCache({0: torch.ones(3)}).save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["ref.pt"]  # no temporary left behind
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match="ref.pt is not a readable reference log-prob cache"):
        RefLogprobCache.load(path)
    torch.save([1, 2], path)
    with pytest.raises(ValueError, match="is not a reference log-prob cache"):
        RefLogprobCache.load(path)


def test_shared_dir_may_not_be_another_runs_folder(tmp_path):
    # it used to overwrite that run's metrics_before.json, eval_before/ logs and twin log, exit 0
    assert run(tmp_path / "a", "--eval", "none") == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir() if p.is_file()}
    with pytest.raises(SystemExit, match="--shared-dir .* is another run's folder"):
        run(tmp_path / "b", "--shared-dir", str(tmp_path / "a"))
    assert not (tmp_path / "b").exists()  # refused before the run folder was claimed
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir() if p.is_file()} == before
    # the run's own folder as its shared folder is what leaving the flag out means
    assert run(tmp_path / "c", "--eval", "none", "--shared-dir", str(tmp_path / "c")) == 0
