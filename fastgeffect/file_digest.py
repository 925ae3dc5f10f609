"""The SHA-256 of a file's bytes, read in chunks: what names a converted model in the cache and
what fingerprints a shared artefact (no torch here, so it stays cheap to import)."""
import hashlib
import os
from typing import Union


def file_sha256(path: Union[str, os.PathLike]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
