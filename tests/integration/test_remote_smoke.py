"""The remote path end to end, at its simplest: set up, back up, snapshot."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from remote_env import byteback_remote  # noqa: E402,F401  (fixture)


def test_setup_client_twice_adds_one_line(byteback_remote):
    again = byteback_remote.run(
        "setup-client", "--destination", byteback_remote.env.destination,
        "--port", str(byteback_remote.env.port), "--hostname", "client1",
        "--server-program", str(byteback_remote.program),
        "--server-config-dir", str(byteback_remote.server_config),
        env={"SSH_AUTH_SOCK": str(byteback_remote.env.agent.sock)}).check()
    assert "already set up" in again.stdout
    lines = byteback_remote.env.user.authorized_keys.read_text().splitlines()
    forced = [l for l in lines if "receive --host client1" in l]
    assert len(forced) == 1, lines
    assert forced[0].startswith('restrict,from="127.0.0.1",command="')


def test_backup_makes_a_readonly_snapshot(byteback_remote, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "file").write_text("hello\n")
    byteback_remote.backup("--source", str(src)).check()
    names = byteback_remote.snapshots()
    assert len(names) == 1
    snap = byteback_remote.host_dir / names[0]
    assert (snap / str(src).lstrip("/") / "file").read_text() == "hello\n"
    assert snap.stat().st_uid == 0
    # Inside the interval the server refuses a second snapshot, and says so.
    refused = byteback_remote.backup("--source", str(src), "--retry-number", "1")
    assert refused.returncode == 1
    assert "minimum interval" in refused.stderr
    assert byteback_remote.snapshots() == names
