"""Checks of the files and folders a run's flags name, done before the run folder is claimed, so a
wrong path costs no set-up and leaves nothing behind; each message names the flag and the fix."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .. import run_files as files
from ..eval import load_retain_log
from ..model_loading import ALIASES
from .artefacts import load_json_dict

# what Forget Quality reads of a retain model's forget log (the rest is checked where it is used)
RETAIN_LOG_KEYS = ("avg_paraphrased_loss", "average_perturb_loss")
MANIFEST = "manifest.json"  # what python -m fastgeffect.finetune --out DIR writes next to DIR/target


def looks_like_path(name: str) -> bool:
    """A ``--model`` value meant as a local folder rather than a hub name (``name`` or ``org/name``)."""
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name


def check_model(name: str, flag: str = "--model") -> None:
    if name in ALIASES:  # its package is looked for when it is converted
        return
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise SystemExit(f"{flag} {name}: no such .gguf file")
        return
    if path.exists():
        if not path.is_dir():
            raise SystemExit(f"{flag} {name} is a file; pass the folder that holds config.json and the weights, "
                             "or a .gguf file")
        if not (path / "config.json").is_file():
            raise SystemExit(f"{flag} {name} is a folder without config.json, not a Hugging Face model folder "
                             "(save_pretrained writes config.json and the weights there)")
    elif looks_like_path(name):
        raise SystemExit(f"{flag} {name}: no such folder (a hub model is named name or org/name)")


def check_manifest(model: str, authors: Optional[int], data_dir: Optional[str], flag: str = "--model") -> None:
    """``--authors`` must name the subset ``--model`` (or its twin) was fine-tuned on, when the fine-tune's
    ``manifest.json`` sits next to its folder (``python -m fastgeffect.finetune --out DIR`` writes
    DIR/target and DIR/manifest.json): with another subset, the forget set would hold authors the model
    was never fine-tuned on, or miss ones it was. The subset folder the fine-tune wrote (its manifest's
    ``data``) given as ``--data-dir`` without ``--authors`` is that subset too."""
    folder = Path(model).expanduser()
    path = folder.resolve().parent / MANIFEST
    if not folder.is_dir() or not path.is_file():  # a hub model, or a folder not made by finetune
        return
    try:
        manifest = load_json_dict(path)
    except ValueError as e:
        raise SystemExit(f"{flag} {model}: {e}") from None
    if "authors" not in manifest:  # not a fine-tune's manifest: nothing recorded to compare with
        return
    trained = manifest["authors"]  # None: all of TOFU
    same_folder = data_dir is not None and isinstance(manifest.get("data"), str) and \
        Path(manifest["data"]).resolve() == Path(data_dir).resolve()
    if trained != authors and not (authors is None and same_folder):
        said = "all of TOFU" if trained is None else f"--authors {trained}"
        given = "no --authors (all of TOFU)" if authors is None else f"--authors {authors}"
        fix = "leave --authors out" if trained is None else \
            f"pass --authors {trained} with the TOFU folder, or --data-dir {manifest.get('data')} without --authors"
        raise SystemExit(f"{flag} {model} was fine-tuned on {said} ({path}), but this run has {given}: {fix}")


def finetune_manifest(model: str) -> Optional[dict]:
    """The ``manifest.json`` of the fine-tune that wrote the folder ``model`` (DIR/target or DIR/retain
    of ``python -m fastgeffect.finetune --out DIR``), or None for any other model."""
    folder = Path(model).expanduser()
    path = folder.resolve().parent / MANIFEST
    if not folder.is_dir() or not path.is_file():
        return None
    try:
        manifest = load_json_dict(path)
    except ValueError as e:
        raise SystemExit(f"{model}: {e}") from None
    return manifest if "authors" in manifest and isinstance(manifest.get("outputs"), dict) else None


# what a target and its twin must share for Forget Quality to compare like with like
TWIN_KEYS = ("model_fingerprint", "template", "recipe", "authors", "dtype")


def check_twin(model: Optional[str], retain_model: Optional[str], split: str) -> None:
    """``--retain-model`` must be a retain-only twin of ``--model`` for the run's forget ``split``:
    not the target itself; where fine-tunes' manifests tell, the retain twin its fine-tune made, for
    this forget split (a twin of another split saw some of these authors), from the same base model,
    recipe, template, author subset and dtype; and a target that saw the forget authors (not one
    trained on a retain split). Checked from the manifests before any model is loaded."""
    if model is not None and Path(model).expanduser().resolve() == Path(retain_model).expanduser().resolve():
        raise SystemExit(f"--retain-model {retain_model} is --model itself: Forget Quality would compare the model "
                         "with itself; give its retain-only twin (python -m fastgeffect.finetune --retain-twin "
                         "writes DIR/retain)")
    twin = finetune_manifest(retain_model)
    if twin is not None:
        made = twin["outputs"].get("retain")
        if not twin.get("retain_twin") or made is None or Path(made).resolve() != Path(retain_model).resolve():
            raise SystemExit(f"--retain-model {retain_model} is not the retain twin its fine-tune made "
                             f"({made or 'none'}, by its {MANIFEST}): give a model fine-tuned on a retain split only")
        if twin.get("forget_split") != split:
            raise SystemExit(f"--retain-model {retain_model} learnt the retain split of {twin.get('forget_split')}, "
                             f"not of --split {split}: it saw some of the authors this run forgets; fine-tune a twin "
                             f"with --forget-split {split}")
    target = finetune_manifest(model) if model is not None else None
    if target is not None and target.get("split") != "full":
        raise SystemExit(f"--model {model} was fine-tuned on {target.get('split')}, not on full TOFU (by its "
                         f"{MANIFEST}): it never learnt every forget author, so there is nothing to unlearn and no "
                         "twin to compare with")
    if twin is not None and target is not None:
        differ = [k for k in TWIN_KEYS if target.get(k) != twin.get(k)]
        if differ:
            raise SystemExit(f"--retain-model {retain_model} was fine-tuned with other {', '.join(differ)} than "
                             f"--model {model} (their {MANIFEST} files): Forget Quality would compare unlike models; "
                             "fine-tune both in one run (--retain-twin)")


def check_data(model: Optional[str], data_dir: Optional[str], authors: Optional[int]) -> None:
    if data_dir is not None and not Path(data_dir).is_dir():
        raise SystemExit(f"--data-dir {data_dir} is not a folder")
    if model is not None and authors is not None and data_dir is None:
        raise SystemExit("--authors needs --data-dir (the TOFU folder the model was fine-tuned on)")
    if model is None:  # the embedded target: generated text, or real TOFU text of N authors
        if authors is not None and data_dir is None:
            raise SystemExit("--authors needs --data-dir (a folder of TOFU files)")
        if data_dir is not None and authors is None:
            raise SystemExit("without --model, --data-dir needs --authors N (real TOFU text on the tiny pipeline)")


def check_retain_log(path: str) -> None:
    """A light check that ``--retain-log`` is a retain model's forget log (the evaluation checks its values)."""
    if not Path(path).exists():
        raise SystemExit(f"--retain-log {path}: no such file (pass the eval_log_forget.json of a retain-only model)")
    try:
        log = load_retain_log(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
        raise SystemExit(f"--retain-log {path} is not a TOFU forget log ({type(e).__name__}: {e}); pass the "
                         "eval_log_forget.json of a retain-only model") from None
    missing = [k for k in RETAIN_LOG_KEYS if not isinstance(log, dict) or k not in log]
    if missing:
        raise SystemExit(f"--retain-log {path} has no {', '.join(missing)}: pass the eval_log_forget.json of a "
                         "retain-only model")


def check_shared_dir(shared_dir: Optional[str], out: Optional[str]) -> None:
    """``--shared-dir`` must not be another run's folder: the evaluation before unlearning, its logs
    and the twin's log written there would replace that run's own (a sweep's ``shared/`` is made
    for this and carries no run marker)."""
    if shared_dir is None or (out is not None and Path(shared_dir).resolve() == Path(out).resolve()):
        return
    if (Path(shared_dir) / files.MARKER).exists():
        raise SystemExit(f"--shared-dir {shared_dir} is another run's folder (it holds {files.MARKER}): this run "
                         f"would overwrite its {files.METRICS_BEFORE}, {files.EVAL_BEFORE}/ and retain twin's log; "
                         "give a folder of its own (e.g. a sweep's shared/), or leave --shared-dir out")


def check_inputs(*, model: Optional[str], retain_model: Optional[str], data_dir: Optional[str],
                 authors: Optional[int], retain_log: Optional[str], shared_dir: Optional[str] = None,
                 out: Optional[str] = None, split: str = "forget10") -> None:
    """Every path the settings name: ``--model`` (and its fine-tune's manifest), ``--retain-model``,
    ``--data-dir`` (with ``--authors``), ``--retain-log``, ``--shared-dir``."""
    check_shared_dir(shared_dir, out)
    if model is not None:
        check_model(model)
        check_manifest(model, authors, data_dir)
    if retain_model is not None:
        check_model(retain_model, "--retain-model")
        check_manifest(retain_model, authors, data_dir, "--retain-model")
        check_twin(model, retain_model, split)
    check_data(model, data_dir, authors)
    if retain_log is not None:
        check_retain_log(retain_log)
