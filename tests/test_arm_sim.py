"""tools/arm_sim: the pinned, hash-checked aarch64 environment and its RPC server."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from arm_sim_support import arm_board, sim  # noqa: F401  (session fixture)


def test_every_pinned_file_has_a_sha256_and_the_wheels_match_the_pins() -> None:
    module = sim()
    rows = module.read_lock()
    wheels = {r["name"]: r["version"] for r in rows if r["kind"] == "wheel"}
    debs = {r["name"] for r in rows if r["kind"] == "deb"}
    assert wheels == module.WHEELS
    assert {"python3.11-minimal", "libpython3.11-stdlib", "libc6", "libstdc++6"} <= debs
    assert not debs & module.DEB_SKIP
    for r in rows:
        assert re.fullmatch(r"[0-9a-f]{64}", r["sha256"]), r
        assert r["file"].endswith((".deb", ".whl")) and r["version"] in r["file"].replace(
            "%3a", ":"
        )


def test_a_file_with_the_wrong_hash_is_refused_and_deleted(tmp_path: Path) -> None:
    module = sim()
    bad = tmp_path / "numpy.whl"
    bad.write_bytes(b"not the pinned wheel")
    row = {"kind": "wheel", "name": "numpy", "version": "2.4.6", "sha256": "0" * 64}
    with pytest.raises(module.SimError, match="sha256 mismatch"):
        module._checked(bad, row)
    assert not bad.exists()


def test_the_private_apt_config_points_only_at_its_own_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ARM_SIM_DIR", str(tmp_path))
    env = sim().apt_env()
    conf = Path(env["APT_CONFIG"]).read_text()
    assert 'APT::Architecture "arm64"' in conf
    for line in conf.splitlines():
        if line.startswith("Dir::"):
            assert str(tmp_path) in line, line
    assert "arch=arm64" in (tmp_path / "apt/etc/sources.list").read_text()


@pytest.mark.slow
def test_the_emulated_server_runs_an_aarch64_module(arm_board) -> None:  # noqa: F811
    assert arm_board.running_pid() is not None
    assert arm_board.check() > 0  # a TE kernel built here, run there, compared exactly
    assert arm_board.build() == arm_board.env_dir()  # idempotent: the stamp matches
    assert not list(arm_board.site().glob("tvm/lib/libtvm_compiler.so"))
