"""Attacks on the userns receiver's root-side set-up (a security review; issue 8 class 9).

Real parts only, on the same server as test_userns_receiver (setup-server
--receiver userns on a btrfs loop store, a real sshd, real accounts and
/etc/subuid): what each test shows is in its docstring.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from sshd_env import run  # noqa: E402
from test_userns_receiver import userns  # noqa: E402,F401  (the module's fixture)

pytestmark = pytest.mark.integration


def _ranges(path: str) -> list:
    found = []
    for line in Path(path).read_text().splitlines():
        owner, first, count = line.split(":")
        found.append((owner, int(first), int(count)))
    return found


def test_hosts_set_up_at_the_same_time_get_ranges_of_their_own(userns, tmp_path):
    """setup-host of several clients at once (an administrator's parallel ssh or
    Ansible run of setup-client) must give each account ids no other holds: two
    hosts on one range are one kernel uid, whose namespace root can enter the
    other's session directory and, through /proc/<pid>/cwd of the other's
    running rsync, its host directory."""
    remote, _, _ = userns
    names = [f"par{i}" for i in range(4)]
    procs = []
    for name in names:
        key = tmp_path / name
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)])
        procs.append(subprocess.Popen(
            [str(remote.program), "--config-dir", str(remote.server_config), "setup-host", "--host", name,
             "--client-address", "127.0.0.1"], stdin=open(f"{key}.pub"), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, universal_newlines=True))
    results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
    for name, (code, out, err) in zip(names, results):
        assert code == 0, (name, out, err)
    accounts = {f"{remote.env.user.name}-{name}" for name in names}
    for path in ("/etc/subuid", "/etc/subgid"):
        entries = _ranges(path)
        ours = [e for e in entries if e[0] in accounts]
        assert {e[0] for e in ours} == accounts, path
        for owner, first, count in ours:
            for other, ofirst, ocount in entries:
                if other != owner:
                    assert first + count <= ofirst or ofirst + ocount <= first, \
                        f"{path}: {owner} {first}+{count} overlaps {other} {ofirst}+{ocount}"
