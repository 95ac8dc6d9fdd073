"""Trained posteriors on disk, keyed by a hash of what affects training.

A sweep over batch sizes, backends or bit widths then trains once. Writes go to a
temporary directory renamed into place, so parallel jobs never see half a posterior.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.api import Posterior


def key(parts: dict[str, Any]) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def fit_or_load(
    root: Path, name: str, parts: dict[str, Any], fit: Callable[[], Posterior]
) -> tuple[Posterior, bool]:
    """The cached posterior (and True) or a freshly fitted one (and False)."""
    target = root / f"{name}-{key(parts)}"
    if (target / "meta.json").exists():
        return Posterior.load(target), True
    posterior = fit()
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
    posterior.save(staging)
    (staging / "key.json").write_text(json.dumps(parts, indent=2, sort_keys=True, default=str))
    try:
        staging.rename(target)
    except OSError:  # another job finished first; theirs is as good as ours
        shutil.rmtree(staging, ignore_errors=True)
    return posterior, False
