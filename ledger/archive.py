"""Archives of a tenant's old events, the pure part: the file format, and its verification
with no database (`tokenledger audit verify --archive FILE`).

An archive is one gzip stream of lines: each event of the tenant in log order, as the
canonical JSON of its row (every hashed field, its position, the time it was recorded, its
transaction id, its prev_hash and hash in hex), then one last line, the manifest. The
manifest says whose events these are and up to where (the tenant's checkpoint it ends at, with
every field of that checkpoint, so its hash can be recomputed and compared with the one an
auditor kept), the stream heads at the start (those of the previous archive; none for the
first) and at the end, how many events, and the sha256 of every event line. The manifest
comes last so that a writer streams the log through in constant memory.

Verification checks the sha256, each stream's chain from its head at the start (from genesis
for a first archive) to its head at the end, positions increasing and the tenant's only, the
count, and that the checkpoint is consistent with the archive: its hash recomputes, it sits
at the last event, its count of events is the archive's (with those before it), and its
stream digest is the digest of the archive's heads.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ledger import checkpoints as cp
from ledger import codec
from ledger.checkpoints import Checkpoint, Digest
from ledger.model import AccountKey
from ledger.replay import ChainVerifier

FORMAT = "tokenledger-archive/1"
Heads = dict[str, str]
"""Stream key text (checkpoints.account_key_text) -> "version:hash hex", as checkpoints keep."""


class ArchiveUnreadable(ValueError):
    """The file is not an archive at all (missing, not gzip, no manifest): nothing to verify."""


@dataclass(frozen=True)
class Manifest:
    tenant_id: str
    seq: int
    before_month: str
    """YYYY-MM: every event of the tenant that occurred before it is in this archive or an
    earlier one."""
    first_position: int
    last_position: int
    events: int
    events_before: int
    """The tenant's events in earlier archives: with `events`, the checkpoint's count."""
    start_heads: Heads
    heads: Heads
    checkpoint: dict[str, Any]
    payload_sha256: str
    previous_manifest_sha256: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **self.__dict__}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Manifest:
        if obj.get("format") != FORMAT:
            raise ArchiveUnreadable(f"not a {FORMAT} manifest")
        body = {k: v for k, v in obj.items() if k != "format"}
        try:
            return cls(**body)
        except TypeError as exc:
            raise ArchiveUnreadable(f"the manifest is malformed: {exc}") from None

    def sha256(self) -> str:
        return hashlib.sha256(codec.canonical_json(self.to_json())).hexdigest()

    def the_checkpoint(self) -> Checkpoint:
        return checkpoint_from_json(self.checkpoint)


def checkpoint_to_json(c: Checkpoint) -> dict[str, Any]:
    return {
        "tenant_id": c.tenant_id, "seq": c.seq, "position": c.position, "events": c.events,
        "taken_at": codec.ts(c.taken_at), "state": c.state_json(), "delta_rows": c.delta_rows,
        "delta_digest": c.delta_digest.hex(), "prev_hash": c.prev_hash.hex(), "hash": c.hash.hex(),
    }  # fmt: skip


def checkpoint_from_json(obj: dict[str, Any]) -> Checkpoint:
    return Checkpoint(
        tenant_id=obj["tenant_id"], seq=obj["seq"], position=obj["position"],
        events=obj["events"], taken_at=codec.parse_ts(obj["taken_at"]),
        state={kind: Digest.from_json(obj["state"][kind]) for kind in cp.KINDS},
        delta_rows=obj["delta_rows"], delta_digest=bytes.fromhex(obj["delta_digest"]),
        prev_hash=bytes.fromhex(obj["prev_hash"]), hash=bytes.fromhex(obj["hash"]),
    )  # fmt: skip


def event_line(row: dict[str, Any]) -> bytes:
    """One event row (as the events table gives it) as its archive line."""
    out = {name: row[name] for name in codec.HASHED_COLUMNS}
    out |= {"position": row["position"], "recorded_at": row["recorded_at"]}
    out |= {"xid": str(row["xid"]), "prev_hash": bytes(row["prev_hash"]).hex()}
    out["hash"] = bytes(row["hash"]).hex()
    return codec.canonical_json(out) + b"\n"


def row_from_line(line: bytes) -> dict[str, Any]:
    """An archive line as an event row again (the types the events table gives)."""
    row: dict[str, Any] = json.loads(line)
    row["occurred_at"] = codec.parse_ts(row["occurred_at"])
    row["recorded_at"] = codec.parse_ts(row["recorded_at"])
    row["prev_hash"], row["hash"] = bytes.fromhex(row["prev_hash"]), bytes.fromhex(row["hash"])
    return row


def head_text(version: int, hash_: bytes) -> str:
    return f"{version}:{hash_.hex()}"


def stream_key(text: str) -> AccountKey:
    tenant, user, conversation = json.loads(text)
    return AccountKey(tenant, user, conversation)


class Writer:
    """Writes an archive: events one at a time, then the manifest."""

    def __init__(self, out: IO[bytes], start_heads: Heads) -> None:
        self._gz = gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=0)
        self._sha = hashlib.sha256()
        self.heads = dict(start_heads)
        self.events, self.first_position, self.last_position = 0, 0, 0

    def add(self, row: dict[str, Any]) -> None:
        line = event_line(row)
        self._gz.write(line)
        self._sha.update(line)
        key = cp.account_key_text(AccountKey(row["tenant_id"], row["user_id"],
                                             row["conversation_id"]))  # fmt: skip
        self.heads[key] = head_text(row["version"], bytes(row["hash"]))
        self.events += 1
        self.first_position = self.first_position or row["position"]
        self.last_position = row["position"]

    @property
    def payload_sha256(self) -> str:
        return self._sha.hexdigest()

    def finish(self, manifest: Manifest) -> None:
        self._gz.write(codec.canonical_json(manifest.to_json()) + b"\n")
        self._gz.close()


def _lines(path: Path) -> Iterator[bytes]:
    try:
        with gzip.open(path, "rb") as f:
            yield from f
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise ArchiveUnreadable(f"{path}: {exc}") from None


def read(path: Path) -> tuple[Manifest, Iterator[dict[str, Any]]]:
    """The manifest, and the event rows (a second pass over the file)."""
    manifest = read_manifest(path)

    def rows() -> Iterator[dict[str, Any]]:
        previous: bytes | None = None
        for line in _lines(path):
            if previous is not None:
                yield row_from_line(previous)
            previous = line

    return manifest, rows()


def read_manifest(path: Path) -> Manifest:
    last = b""
    for line in _lines(path):
        last = line
    try:
        return Manifest.from_json(json.loads(last))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise ArchiveUnreadable(f"{path}: no manifest at the end") from None


@dataclass
class ArchiveReport:
    """What an offline verification found; `problems` empty: the archive verifies."""

    path: str
    manifest: Manifest
    events: int = 0
    streams: int = 0
    problems: list[str] = field(default_factory=list)


def verify(path: Path, previous: Manifest | None = None) -> ArchiveReport:
    """Verify an archive with no database; with `previous` (the tenant's archive before it),
    also that this one continues it."""
    manifest = read_manifest(path)
    report = ArchiveReport(str(path), manifest)
    chains, sha, positions = _Chains(manifest.start_heads), hashlib.sha256(), _Positions()
    lines = _lines(path)
    pending: bytes | None = None
    for line in lines:
        if pending is not None:
            sha.update(pending)
            report.problems += chains.feed(pending, manifest.tenant_id) + positions.feed(pending)
        pending = line
    report.events, report.streams = chains.verifier.checked, len(chains.verifier.heads)
    report.problems += _payload_problems(manifest, sha.hexdigest(), chains, positions)
    report.problems += _checkpoint_problems(manifest, chains.heads_text())
    if previous is not None:
        report.problems += _continuation_problems(manifest, previous)
    return report


class _Chains:
    def __init__(self, start: Heads) -> None:
        self.verifier = ChainVerifier()
        self.verifier.heads = {stream_key(k): cp.parse_stream(v) for k, v in start.items()}
        self.start = set(self.verifier.heads)

    def feed(self, line: bytes, tenant_id: str) -> list[str]:
        try:
            row = row_from_line(line)
        except (ValueError, KeyError, TypeError) as exc:
            return [f"an unreadable event line: {exc}"]
        if row.get("tenant_id") != tenant_id:
            return [f"position {row.get('position')} is tenant {row.get('tenant_id')!r}'s"]
        breaks = len(self.verifier.breaks)
        try:
            self.verifier.feed(row)
        except KeyError as exc:
            return [f"position {row['position']} lacks {exc}"]
        return [
            f"stream {b.stream} version {b.version}: {b.problem}"
            for b in self.verifier.breaks[breaks:]
        ]

    def heads_text(self) -> Heads:
        return {cp.account_key_text(k): head_text(*h) for k, h in self.verifier.heads.items()}


class _Positions:
    def __init__(self) -> None:
        self.first, self.last = 0, 0

    def feed(self, line: bytes) -> list[str]:
        try:
            position = int(json.loads(line)["position"])
        except (ValueError, KeyError, TypeError):
            return []  # _Chains said so
        problem = [] if position > self.last else [f"position {position} follows {self.last}"]
        self.first, self.last = self.first or position, position
        return problem


def _payload_problems(m: Manifest, sha: str, chains: _Chains, pos: _Positions) -> list[str]:
    out = []
    if sha != m.payload_sha256:
        out.append(f"the events' sha256 is {sha}, the manifest says {m.payload_sha256}")
    if chains.verifier.checked != m.events:
        out.append(f"{chains.verifier.checked} events, the manifest says {m.events}")
    if (pos.first, pos.last) != (m.first_position, m.last_position):
        out.append(
            f"positions {pos.first}..{pos.last}, the manifest says "
            f"{m.first_position}..{m.last_position}"
        )
    heads = chains.heads_text()
    for key in sorted(heads.keys() | m.heads.keys()):
        if heads.get(key) != m.heads.get(key):
            out.append(f"stream {key} ends at {heads.get(key)}, the manifest says "
                       f"{m.heads.get(key)}")  # fmt: skip
    return out


def _checkpoint_problems(m: Manifest, heads: Heads) -> list[str]:
    try:
        c = m.the_checkpoint()
    except (KeyError, ValueError, TypeError) as exc:
        return [f"the manifest's checkpoint is malformed: {exc}"]
    out = []
    if c.expected_hash() != c.hash:
        out.append(f"checkpoint {c.name}: its hash does not match its content")
    if c.tenant_id != m.tenant_id or c.position != m.last_position:
        out.append(f"checkpoint {c.name} is at position {c.position}, not the archive's end")
    if c.events != m.events_before + m.events:
        out.append(f"checkpoint {c.name} counts {c.events} events, the archives "
                   f"{m.events_before} + {m.events}")  # fmt: skip
    streams = stream_digest(heads)
    if (streams.rows, streams.total) != (c.state["stream"].rows, c.state["stream"].total):
        out.append(f"checkpoint {c.name}: its stream digest is not that of the archive's heads")
    return out


def stream_digest(heads: Heads) -> Digest:
    """The digest a checkpoint keeps of its stream heads (checkpoints.stream_item)."""
    d = Digest()
    for key, value in heads.items():
        d.add(("stream", key, value))
    return d


def _continuation_problems(m: Manifest, previous: Manifest) -> list[str]:
    out = []
    if previous.tenant_id != m.tenant_id or previous.seq + 1 != m.seq:
        out.append(
            f"archive {m.seq} does not follow archive {previous.seq} of {previous.tenant_id}"
        )
    if m.previous_manifest_sha256 != previous.sha256():
        out.append("the previous archive's manifest is not the one this archive names")
    if m.start_heads != previous.heads or m.first_position <= previous.last_position:
        out.append("this archive does not start where the previous one ends")
    if m.events_before != previous.events_before + previous.events:
        out.append(f"{m.events_before} events before, the previous archives hold "
                   f"{previous.events_before + previous.events}")  # fmt: skip
    return out


def describe(reports: Iterable[ArchiveReport]) -> list[str]:
    """One line per archive, then its problems indented."""
    out = []
    for r in reports:
        m = r.manifest
        status = "ok" if not r.problems else f"{len(r.problems)} PROBLEMS"
        out.append(
            f"{r.path}: tenant {m.tenant_id} archive {m.seq} (before {m.before_month}), "
            f"{r.events:,} events in {r.streams:,} streams, positions {m.first_position}.."
            f"{m.last_position}, checkpoint {m.checkpoint.get('seq')}: {status}"
        )
        out += [f"  {p}" for p in r.problems]
    return out
