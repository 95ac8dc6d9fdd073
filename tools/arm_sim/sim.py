"""An emulated aarch64 board on this machine: `python tools/arm_sim/sim.py start|stop|status`.

What it builds, once, under `.arm-sim/` (git-ignored; `ARM_SIM_DIR` moves it):
- an aarch64 Python 3.11 from Debian's arm64 packages, fetched with a private APT config
  (its own state, cache and sources; the machine's apt setup is left as it is) and unpacked
  with `dpkg -x` into `sysroot/`;
- TVM's runtime from PyPI's aarch64 wheels, installed with `pip --target` into `site/`
  (`libtvm_compiler.so` deleted: a device only loads and runs modules).
Every .deb and wheel is pinned by version and checked against `sha256.txt` next to this
file; `sim.py lock` rewrites that file (after a Debian point release removes a version).

`start` runs `tools/arm_sim/rpc_server.py` with that Python under Debian's `qemu-user` on
127.0.0.1 (port `ARM_SIM_PORT`, default 9090), writes its PID to `.arm-sim/server.pid`,
and returns once an aarch64 module compiled here ran remotely with the right result.
`stop` ends the server by that PID. Emulated timings are not ARM timings: the harness
tags these runs `device=emulated` and computes no speedup from them.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
LOCK = HERE / "sha256.txt"
SERVER = HERE / "rpc_server.py"
HOST = "127.0.0.1"

DEBIAN = [
    "http://deb.debian.org/debian bookworm main",
    "http://deb.debian.org/debian bookworm-updates main",
    "http://deb.debian.org/debian-security bookworm-security main",
]
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
# python3.11-minimal and the standard library, and the C++ runtime TVM links against;
# apt resolves the rest. Tools a sysroot never runs (perl, dpkg, tar) are left out.
DEB_ROOTS = ["python3.11-minimal", "libpython3.11-stdlib", "libstdc++6"]
DEB_SKIP = {
    "dpkg",
    "install-info",
    "perl",
    "perl-base",
    "perl-modules-5.36",
    "libperl5.36",
    "libgdbm-compat4",
    "tar",
    "mailcap",
    "mime-support",
}
WHEELS = {
    "apache-tvm": "0.27.0.post1",
    "apache-tvm-ffi": "0.1.14.post0",
    "numpy": "2.4.6",
    "ml-dtypes": "0.6.0",
    "typing-extensions": "4.16.0",
}
PLATFORMS = ["manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"]
HOST_TOOLS = {"qemu-aarch64": "qemu-user", "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu"}


class SimError(Exception):
    """Printed as one line with what to do."""


def env_dir() -> Path:
    return Path(os.environ.get("ARM_SIM_DIR", ROOT / ".arm-sim")).resolve()


def port() -> int:
    return int(os.environ.get("ARM_SIM_PORT", "9090"))


def sysroot() -> Path:
    return env_dir() / "sysroot"


def site() -> Path:
    return env_dir() / "site"


def python_command(script: str | Path, *args: str) -> tuple[list[str], dict[str, str]]:
    """Command and environment that run `script` with the emulated aarch64 Python."""
    env = os.environ | {
        "QEMU_LD_PREFIX": str(sysroot()),
        "PYTHONPATH": str(site()),
        "PYTHONNOUSERSITE": "1",
        "TVM_USE_RUNTIME_LIB": "1",
        "BNN_DEVICE_KIND": "emulated",
    }
    env.pop("PYTHONHOME", None)
    python = sysroot() / "usr" / "bin" / "python3.11"
    return ["qemu-aarch64", str(python), str(script), *args], env


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        raise SimError(f"`{' '.join(cmd[:4])} ...` failed: {' | '.join(tail)}")
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- host tools -------------------------------------------------------------------------


def ensure_host_tools() -> None:
    """qemu-user and the cross compiler from Debian, installed only when missing and root."""
    missing = [pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SimError(
            f"missing Debian packages {' '.join(missing)}: run `sudo apt-get install "
            f"{' '.join(missing)}` (or this command as root)"
        )
    print(f"[arm-sim] apt-get install {' '.join(missing)}", flush=True)
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    _run(["apt-get", "update", "-qq"], env=env)
    _run(["apt-get", "install", "-y", "-qq", *missing], env=env)


# --- private apt ------------------------------------------------------------------------


def apt_env() -> dict[str, str]:
    """APT_CONFIG pointing at a config of our own: arm64, own state, cache and sources."""
    base = env_dir() / "apt"
    for sub in ("state/lists/partial", "cache/archives/partial", "etc/parts", "etc/sources"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "state/status").touch()
    (base / "etc/sources.list").write_text(
        "".join(f"deb [arch=arm64 signed-by={KEYRING}] {line}\n" for line in DEBIAN)
    )
    (base / "apt.conf").write_text(
        f"""APT::Architecture "arm64";
APT::Architectures {{ "arm64"; }};
Dir::State "{base}/state";
Dir::State::Lists "{base}/state/lists";
Dir::State::status "{base}/state/status";
Dir::Cache "{base}/cache";
Dir::Etc::sourcelist "{base}/etc/sources.list";
Dir::Etc::sourceparts "{base}/etc/sources";
Dir::Etc::parts "{base}/etc/parts";
Dir::Etc::preferencesparts "{base}/etc/parts";
Acquire::Languages "none";
"""
    )
    return os.environ | {"APT_CONFIG": str(base / "apt.conf")}


def read_lock() -> list[dict[str, str]]:
    rows = []
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            digest, kind, name, version, filename = line.split()
            rows.append(
                {"sha256": digest, "kind": kind, "name": name, "version": version, "file": filename}
            )
    return rows


def _checked(path: Path, row: dict[str, str]) -> None:
    if not path.exists():
        raise SimError(f"{row['kind']} {row['name']}={row['version']} was not downloaded")
    got = sha256(path)
    if got != row["sha256"]:
        path.unlink()
        raise SimError(
            f"sha256 mismatch for {path.name}: expected {row['sha256']}, got {got}; "
            "the file was deleted (re-run, or `sim.py lock` if the pin changed on purpose)"
        )


def fetch_debs(rows: list[dict[str, str]], env: dict[str, str]) -> Path:
    debs = env_dir() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    want = [r for r in rows if r["kind"] == "deb" and not (debs / r["file"]).exists()]
    if want:
        _run(["apt-get", "update", "-qq"], env=env)
        try:
            _run(
                ["apt-get", "download", *[f"{r['name']}={r['version']}" for r in want]],
                env=env,
                cwd=debs,
            )
        except SimError as err:
            raise SimError(
                f"{err}. A pinned version may have left the Debian archive: refresh the pins "
                "with `python tools/arm_sim/sim.py lock` and review the diff"
            ) from err
    for r in rows:
        if r["kind"] == "deb":
            _checked(debs / r["file"], r)
    return debs


def pip_platform_args() -> list[str]:
    args = ["--only-binary=:all:", "--no-deps", "--python-version", "3.11"]
    args += ["--implementation", "cp", "--abi", "cp311", "--abi", "abi3", "--abi", "none"]
    for p in PLATFORMS:
        args += ["--platform", p]
    return args


def fetch_wheels(rows: list[dict[str, str]]) -> Path:
    wheels = env_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    reqs = wheels / "requirements.txt"
    reqs.write_text(
        "".join(
            f"{r['name']}=={r['version']} --hash=sha256:{r['sha256']}\n"
            for r in rows
            if r["kind"] == "wheel"
        )
    )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run(
        [
            *pip,
            "download",
            "--require-hashes",
            "-r",
            str(reqs),
            "-d",
            str(wheels),
            *pip_platform_args(),
        ]
    )
    for r in rows:
        if r["kind"] == "wheel":
            _checked(wheels / r["file"], r)
    return wheels


def build(force: bool = False) -> Path:
    """The sysroot and runtime, built once per lock file (a stamp records which)."""
    ensure_host_tools()
    root = env_dir()
    stamp = root / "built.sha256"
    lock_hash = sha256(LOCK)
    if not force and stamp.exists() and stamp.read_text().strip() == lock_hash:
        return root
    start = time.perf_counter()
    print(f"[arm-sim] building the aarch64 environment in {root}", flush=True)
    rows = read_lock()
    debs = fetch_debs(rows, apt_env())
    shutil.rmtree(sysroot(), ignore_errors=True)
    sysroot().mkdir(parents=True)
    for r in rows:
        if r["kind"] == "deb":
            _run(["dpkg", "-x", str(debs / r["file"]), str(sysroot())])
    wheels = fetch_wheels(rows)
    shutil.rmtree(site(), ignore_errors=True)
    files = [str(wheels / r["file"]) for r in rows if r["kind"] == "wheel"]
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--disable-pip-version-check",
            "-q",
            "install",
            "--no-index",
            "--target",
            str(site()),
            *pip_platform_args(),
            *files,
        ]
    )
    for lib in site().glob("tvm/lib/libtvm_*.so"):
        if lib.name != "libtvm_runtime.so":  # compiler, CUDA and extras: not on a device
            lib.unlink()
    for wheel in files:  # verified and installed; the debs stay for `dpkg -x` re-runs
        Path(wheel).unlink()
    shutil.rmtree(root / "apt" / "state" / "lists", ignore_errors=True)  # 120 MB of indexes
    for cache in (root / "apt" / "cache").glob("*.bin"):  # and 70 MB of apt's caches of them
        cache.unlink()
    stamp.write_text(lock_hash + "\n")
    print(
        f"[arm-sim] built in {time.perf_counter() - start:.1f} s, {disk_mb(root):.0f} MB",
        flush=True,
    )
    return root


def disk_mb(path: Path) -> float:
    return (
        sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) / 1e6
    )


def lock() -> None:
    """Pin today's Debian versions and the wheel versions above, with their sha256."""
    env = apt_env()
    _run(["apt-get", "update", "-qq"], env=env)
    out = _run(
        [
            "apt-cache",
            "depends",
            "--recurse",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
            *DEB_ROOTS,
        ],
        env=env,
    ).stdout
    names = sorted({ln for ln in out.splitlines() if ln and not ln.startswith((" ", "<"))})
    names = [n for n in names if n not in DEB_SKIP]
    lines = ["# sha256  kind  name  version  file  (written by `python tools/arm_sim/sim.py lock`)"]
    with tempfile.TemporaryDirectory() as tmp:
        _run(["apt-get", "download", *names], env=env, cwd=tmp)
        for deb in sorted(Path(tmp).glob("*.deb")):
            name, version, _ = deb.stem.split("_")
            version = version.replace("%3a", ":")
            lines.append(f"{sha256(deb)}  deb  {name}  {version}  {deb.name}")
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "-q",
                "download",
                "-d",
                tmp,
                *pip_platform_args(),
                *[f"{k}=={v}" for k, v in WHEELS.items()],
            ]
        )
        for whl in sorted(Path(tmp).glob("*.whl")):
            name = whl.name.split("-")[0].replace("_", "-").lower()
            lines.append(f"{sha256(whl)}  wheel  {name}  {WHEELS[name]}  {whl.name}")
    LOCK.write_text("\n".join(lines) + "\n")
    print(f"[arm-sim] wrote {LOCK} ({len(lines) - 1} files)")


# --- server -----------------------------------------------------------------------------


def pid_file() -> Path:
    return env_dir() / "server.pid"


def running_pid() -> int | None:
    try:
        pid = int(pid_file().read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    return pid


def check(timeout_s: float = 60.0) -> float:
    """Run a tiny aarch64 module on the server; returns the seconds it took (raises if wrong)."""
    import numpy as np
    import tvm
    from tvm import rpc, te
    from tvm.support.utils import tempdir

    start = time.perf_counter()
    n = 16
    a = te.placeholder((n,), name="a")
    b = te.compute((n,), lambda i: a[i] * 2.0 + 1.0, name="b")
    target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu"})
    lib = tvm.compile(te.create_prim_func([a, b]), target=target)
    tmp = tempdir()
    path = tmp.relpath("check.so")
    lib.export_library(path, cc="aarch64-linux-gnu-gcc")
    remote = rpc.connect(HOST, port(), session_timeout=int(timeout_s))
    try:
        remote.upload(path)
        fn = remote.load_module("check.so")
        dev = remote.cpu()
        x = np.arange(n, dtype="float32")
        y = tvm.runtime.empty((n,), "float32", dev)
        fn(tvm.runtime.tensor(x, dev), y)
        if not np.array_equal(y.numpy(), x * 2 + 1):
            raise SimError("the emulated server returned a wrong result")
    finally:
        del remote
        gc.collect()  # closes the session: the server takes one at a time
    return time.perf_counter() - start


def _listening() -> bool:
    try:
        socket.create_connection((HOST, port()), timeout=1).close()
    except OSError:
        return False
    return True


def start(timeout_s: float = 120.0) -> int:
    build()
    pid = running_pid()
    if pid is not None:
        print(f"[arm-sim] already running: pid {pid} on {HOST}:{port()}")
        return pid
    if _listening():
        raise SimError(f"port {port()} is taken by another program: set ARM_SIM_PORT")
    cmd, env = python_command(SERVER, HOST, str(port()))
    log = (env_dir() / "server.log").open("w")
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        cwd=env_dir(),
    )
    pid_file().write_text(f"{proc.pid} {port()}\n")
    deadline = time.monotonic() + timeout_s
    while not _listening():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop()
            log_tail = (env_dir() / "server.log").read_text().strip().splitlines()[-3:]
            raise SimError(f"the emulated RPC server did not start: {' | '.join(log_tail)}")
        time.sleep(0.3)
    seconds = check()
    print(f"[arm-sim] running: pid {proc.pid} on {HOST}:{port()} (check ran in {seconds:.1f} s)")
    return proc.pid


def stop() -> bool:
    pid = running_pid()
    if pid is None:
        pid_file().unlink(missing_ok=True)
        print("[arm-sim] not running")
        return False
    with contextlib.suppress(ProcessLookupError):  # its own session: server and forks
        os.killpg(pid, signal.SIGTERM)
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.killpg(pid, signal.SIGKILL)
    pid_file().unlink(missing_ok=True)
    print(f"[arm-sim] stopped pid {pid}")
    return True


def status() -> int:
    pid = running_pid()
    if pid is None:
        print("[arm-sim] not running")
        return 1
    info = {"pid": pid, "address": f"{HOST}:{port()}", "env": str(env_dir())}
    info["check_s"] = round(check(), 2)
    print("[arm-sim] running " + json.dumps(info))
    return 0


def main(argv: list[str]) -> int:
    actions = {"build": build, "start": start, "stop": stop, "status": status, "lock": lock}
    if len(argv) != 1 or argv[0] not in actions:
        print(f"usage: sim.py {'|'.join(actions)}", file=sys.stderr)
        return 2
    try:
        result = actions[argv[0]]()
    except SimError as err:
        print(f"[arm-sim] error: {err}", file=sys.stderr)
        return 1
    return result if isinstance(result, int) and argv[0] == "status" else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
