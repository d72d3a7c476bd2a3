"""Reading a rank file, verified by its sha256, from the data dir. Never downloads: fetching is
services/context/tokenizer_data.py (`python -m services.context.tokenizer_data fetch`)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from services.context.tokenizers.base import RankFile

DATA_DIR_ENV = "TOKENIZER_DATA_DIR"
DATA_DIR_DEFAULT = Path("var") / "tokenizers"
TIKTOKEN_CACHE_ENV = "TIKTOKEN_CACHE_DIR"
FETCH_COMMAND = "python -m services.context.tokenizer_data fetch"


class TokenizerDataError(Exception):
    """A rank file is missing or does not have the pinned sha256."""


def data_dir() -> Path:
    """The configured data dir: $TOKENIZER_DATA_DIR, else var/tokenizers under the cwd."""
    return Path(os.environ.get(DATA_DIR_ENV) or DATA_DIR_DEFAULT)


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _candidates(spec: RankFile, directory: Path | None) -> list[Path]:
    paths = [(directory or data_dir()) / spec.file_name]
    cache = os.environ.get(TIKTOKEN_CACHE_ENV)
    if cache:
        paths.append(Path(cache) / spec.file_name)
    return paths


def verified_path(spec: RankFile, directory: Path | None = None) -> Path:
    """The rank file's path, after checking its sha256 (for libraries that read it themselves)."""
    read_verified(spec, directory)
    return next(p for p in _candidates(spec, directory) if p.is_file())


def read_verified(spec: RankFile, directory: Path | None = None) -> bytes:
    """The rank file's bytes, after checking its sha256. Never downloads.

    The first existing candidate is authoritative: a wrong file in the data dir is an error, not
    something to skip silently.
    """
    candidates = _candidates(spec, directory)
    for path in candidates:
        if path.is_file():
            data = path.read_bytes()
            actual = sha256_of(data)
            if actual != spec.sha256:
                raise TokenizerDataError(
                    f"tokenizer data for {spec.encoding} is corrupt: {path} has sha256 {actual}, "
                    f"expected {spec.sha256}; delete it and run `{FETCH_COMMAND}`"
                )
            return data
    where = " or ".join(str(p) for p in candidates)
    raise TokenizerDataError(
        f"tokenizer data for {spec.encoding} is missing: {spec.file_name} (sha256 {spec.sha256}) "
        f"not found at {where}; run `{FETCH_COMMAND}` (set ${DATA_DIR_ENV} for another dir)"
    )
