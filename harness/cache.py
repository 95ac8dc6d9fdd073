"""Trained posteriors on disk, keyed by a hash of what affects training, checked on every read.

A sweep over batch sizes, backends or bit widths then trains once. Writes go to a staging
folder renamed into place, so parallel jobs never see half a posterior.

Each entry (`<name>-<key>/`) holds the posterior (`tensors.safetensors`, `meta.json`), the
key's parts (`key.json`) and `entry.json`: the format version, the harness version, when
it was written, the method config that trained it, and the sha256 of each of the other
files. A read recomputes the hashes, so a flipped byte, a truncated file, a missing file,
unparsable JSON or another format version is found before the posterior is used; the
entry is then reported (one warning line), moved to `<cache>/.quarantine/` (never deleted:
it may be the only copy of a long fit) and trained again. Staging folders record their
writer's PID; one whose writer is gone, or older than `STALE_STAGING_S`, is leftover from a
killed job and is removed.

Which method options are in the key: `fit` plus the options the method lists in
`fit_options`, exactly as before. The whole config is not hashed because the built-in
methods share entries across configs that differ only at inference (a sweep over
`samples` trains once; MC dropout, Laplace and SWAG read the MAP network trained under
their own config names), and hashing every option would retrain for each of them. The
entry instead records the resolved config that trained it, and on a hit for a method whose
class does not set `fit_options` itself (the empty default of `harness.api.MethodBase` is no
statement), options outside `fit` whose values differ from that config are named in a
warning: for a method that forgot to declare an option which does change training (the
built-in ensemble's `members` was one), that warning is the only sign of a stale posterior;
setting `fit_options` (`()` when no option outside `fit` matters) is how a method states
its contract and silences it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harness.api import Posterior

FORMAT = 2  # 1: the unversioned layout (no entry.json), read as a bad entry
ENTRY = "entry.json"
HASHED = ("tensors.safetensors", "meta.json", "key.json")
OWNER = "owner.json"  # inside a staging folder only: who is writing it
STAGING = ".staging-"
QUARANTINE = ".quarantine"
STALE_STAGING_S = 15 * 60  # a staging folder lives for the seconds a save takes
IGNORED_DRIFT = ("name", "fit", "base")  # in the key already, or keyed as the base entry

log = logging.getLogger(__name__)
_warned: set[tuple[str, str]] = set()


def harness_version() -> str:
    try:
        return importlib.metadata.version("bnn-harness")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def key(parts: dict[str, Any]) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def read_entry(path: Path) -> tuple[dict[str, Any], str | None]:
    """The entry's record and what is wrong with it (None: every file is as written)."""
    record_path = path / ENTRY
    if not record_path.is_file():
        return {}, f"no {ENTRY} (an unversioned entry from before format {FORMAT}, or partial)"
    try:
        record = json.loads(record_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return {}, f"{ENTRY} is unreadable ({type(err).__name__})"
    if not isinstance(record, dict):
        return {}, f"{ENTRY} is not a JSON object"
    if record.get("format") != FORMAT:
        return record, f"format version {record.get('format')!r}, expected {FORMAT}"
    hashes = record.get("sha256")
    if not isinstance(hashes, dict):
        return record, f"{ENTRY} has no sha256 table"
    for name in HASHED:
        file = path / name
        if not file.is_file():
            return record, f"{name} is missing"
        if _sha256(file) != hashes.get(name):
            return record, f"{name} does not match its sha256 (corrupt or truncated)"
    return record, None


def _load(path: Path, parts: dict[str, Any]) -> tuple[Posterior | None, dict, str | None]:
    record, problem = read_entry(path)
    if problem is not None:
        return None, record, problem
    try:
        stored = json.loads((path / "key.json").read_text())
        posterior = Posterior.load(path)
    except Exception as err:  # hashes match but the writer wrote garbage: still not usable
        return None, record, f"unreadable posterior ({type(err).__name__}: {err})"
    if stored != json.loads(json.dumps(parts, sort_keys=True, default=str)):
        return None, record, "key.json does not match the key it is filed under"
    return posterior, record, None


def quarantine(root: Path, path: Path, problem: str) -> Path | None:
    """Moves a bad entry aside (with a note of what was wrong); None if it was already gone."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    dest = root / QUARANTINE / f"{path.name}-{stamp}-{os.getpid()}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.rename(dest)
    except FileNotFoundError:  # a parallel job moved it first
        return None
    (dest / "QUARANTINED.txt").write_text(f"{_now()}: {problem}\n")
    return dest


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def staging_leftover(path: Path, max_age_s: float = STALE_STAGING_S) -> str | None:
    """Why a staging folder is leftover (its writer is gone, or it is too old), or None."""
    try:
        owner = json.loads((path / OWNER).read_text())
        pid, host = int(owner["pid"]), str(owner["host"])
    except (OSError, ValueError, KeyError, TypeError):
        pid, host = None, None
    if pid is not None and host == socket.gethostname() and not _pid_alive(pid):
        return f"its writer (pid {pid}) is gone"
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
    if age > max_age_s:
        return f"it is {age / 60:.0f} min old"
    return None


def clean_staging(root: Path, max_age_s: float = STALE_STAGING_S) -> list[Path]:
    removed = []
    for path in sorted(root.glob(STAGING + "*")) if root.is_dir() else []:
        reason = staging_leftover(path, max_age_s)
        if reason is not None and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            log.warning("cache: removed staging folder %s: %s", path.name, reason)
            removed.append(path)
    return removed


def declares_fit_options(method: Any) -> bool:
    """Whether the plugin's class sets `fit_options`. The default a plugin inherits from
    harness.api, or that the registry binds on an instance, is no statement about which
    options change training."""
    return any(
        "fit_options" in vars(k) for k in type(method).__mro__ if k.__module__ != "harness.api"
    )


def drift(stored: dict[str, Any], current: dict[str, Any], declared: list[str]) -> dict:
    """Options outside the key whose values differ from the config that trained the entry."""
    if stored.get("name") != current.get("name"):
        return {}  # a base trained under another method's config (MC dropout's MAP network)
    ignored = {*IGNORED_DRIFT, *declared}
    return {
        k: (stored[k], v)
        for k, v in current.items()
        if k not in ignored and k in stored and stored[k] != v
    }


def _warn_drift(entry: str, record: dict[str, Any], config: dict[str, Any]) -> None:
    changed = drift(record.get("trained_with") or {}, config, [])
    text = ", ".join(f"method.{k}={old!r} (now {new!r})" for k, (old, new) in changed.items())
    if changed and (entry, text) not in _warned:
        _warned.add((entry, text))
        log.warning(
            "cache: %s was trained with %s and is reused because method '%s' declares no "
            "fit_options; if one of these changes training, list it in fit_options "
            "(declare fit_options = () to state that none does)",
            entry,
            text,
            config.get("name"),
        )


def _write(staging: Path, posterior: Posterior, parts: dict, config: dict | None) -> None:
    posterior.save(staging)
    (staging / "key.json").write_text(json.dumps(parts, indent=2, sort_keys=True, default=str))
    record = {
        "format": FORMAT,
        "harness_version": harness_version(),
        "created": _now(),
        "method": posterior.method,
        "trained_with": config,
        "sha256": {name: _sha256(staging / name) for name in HASHED},
    }
    (staging / ENTRY).write_text(json.dumps(record, indent=2, sort_keys=True, default=str))


def fit_or_load(
    root: Path,
    name: str,
    parts: dict[str, Any],
    fit: Callable[[], Posterior],
    config: dict[str, Any] | None = None,
    check_drift: bool = False,
) -> tuple[Posterior, bool]:
    """The cached posterior (and True) or a freshly fitted one (and False).

    `config`: the resolved method config, recorded in the entry; `check_drift`: warn when a
    hit was trained with other values outside the key (for methods without `fit_options`).
    A bad entry is quarantined and refitted; `fit` raising leaves nothing behind.
    """
    clean_staging(root)
    target = root / f"{name}-{key(parts)}"
    if target.exists():
        posterior, record, problem = _load(target, parts)
        if posterior is not None:
            if check_drift and config is not None:
                _warn_drift(target.name, record, config)
            return posterior, True
        problem = problem or "unknown problem"
        dest = quarantine(root, target, problem)
        where = "moved aside by a parallel job" if dest is None else f"moved to {dest}"
        log.warning("cache: bad entry %s: %s; %s, retraining", target.name, problem, where)
    posterior = fit()
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=STAGING))
    try:
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "created": _now()}
        (staging / OWNER).write_text(json.dumps(owner))
        _write(staging, posterior, parts, config)
        (staging / OWNER).unlink()
        staging.rename(target)
    except OSError:  # another job finished first (theirs is as good as ours), or disk full
        shutil.rmtree(staging, ignore_errors=True)
    return posterior, False


# `bnn-harness cache list|verify|prune`


@dataclass
class Status:
    path: Path
    name: str
    key: str
    method: str
    size: int
    created: str
    version: str
    problem: str | None

    @property
    def state(self) -> str:
        return "ok" if self.problem is None else f"BAD: {self.problem}"


def scan(root: Path) -> list[Status]:
    """Every entry under root (not quarantine or staging), each verified."""
    out = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if not path.is_dir() or path.name.startswith("."):
            continue
        record, problem = read_entry(path)
        name, _, digest = path.name.rpartition("-")
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        created = record.get("created") or datetime.fromtimestamp(
            path.stat().st_mtime, UTC
        ).isoformat(timespec="seconds")
        out.append(
            Status(
                path,
                name or path.name,
                digest,
                str(record.get("method", "?")),
                size,
                str(created),
                str(record.get("harness_version", "?")),
                problem,
            )
        )
    return out


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def list_entries(root: Path) -> int:
    entries = scan(root)
    if not entries:
        print(f"no cache entries in {root}")
        return 0
    head = ("name", "key", "method", "size", "created", "harness", "status")
    rows = [
        (s.name, s.key, s.method, _size(s.size), s.created, s.version, s.state) for s in entries
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
    for row in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])
    extra = [(QUARANTINE, list((root / QUARANTINE).glob("*"))), (STAGING, _staging(root))]
    for what, found in extra:
        if found:
            print(f"{len(found)} folder(s) in {what}* (bnn-harness cache prune removes them)")
    return 0


def _staging(root: Path) -> list[Path]:
    return sorted(root.glob(STAGING + "*")) if root.is_dir() else []


def verify(root: Path) -> int:
    """0 when every entry checks out, 1 (naming each bad one) otherwise."""
    entries = scan(root)
    bad = [s for s in entries if s.problem is not None]
    for s in bad:
        print(f"bad: {s.path.name}: {s.problem}")
    print(f"{len(entries)} entries in {root}, {len(bad)} bad")
    return 1 if bad else 0


def prune(root: Path, older_than_days: float | None = None) -> int:
    """Deletes bad entries, the quarantine and leftover staging (and old entries, if asked).

    Unlike a read, this deletes: it is what a user runs to reclaim the space.
    """
    cutoff = None if older_than_days is None else time.time() - older_than_days * 86400
    removed = 0
    for s in scan(root):
        reason = s.problem
        if reason is None and cutoff is not None and s.path.stat().st_mtime < cutoff:
            reason = f"older than {older_than_days:g} days"
        if reason is not None:
            shutil.rmtree(s.path, ignore_errors=True)
            print(f"removed {s.path.name}: {reason}")
            removed += 1
    for path in sorted((root / QUARANTINE).glob("*")) if (root / QUARANTINE).is_dir() else []:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
        print(f"removed {QUARANTINE}/{path.name}")
        removed += 1
    for path in _staging(root):
        reason = staging_leftover(path)
        if reason is not None:
            shutil.rmtree(path, ignore_errors=True)
            print(f"removed {path.name}: {reason}")
            removed += 1
    print(f"{removed} removed from {root}")
    return 0


def command(action: str, root: Path, older_than_days: float | None = None) -> int:
    """`bnn-harness cache ACTION`: list, verify or prune the cache under root."""
    if action == "list":
        return list_entries(root)
    if action == "verify":
        return verify(root)
    return prune(root, older_than_days)
