"""The README's first command, on a machine without rsync (issue 15, item 1).

A fresh Debian has no rsync.  The test makes one: a scratch copy-on-write
root of this machine (scratch_root.py) in which the real dpkg purges rsync.
Then it types the README's first command, read from README.md as it stands,
the way a newcomer would: as an ordinary user (told the one command to ask
for), as root from a script or cron (told, never installed unasked), and as
root as the README says, which installs rsync with the real apt-get and backs up.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

import scratch_root

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def readme_first_command() -> str:
    """The first line of the first sh block under "Try it" in README.md."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Try it"):]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return block.splitlines()[0]


@pytest.fixture(scope="module")
def no_rsync():
    reason = scratch_root.skip_reason()
    if reason:
        pytest.skip(reason)
    root = scratch_root.ScratchRoot()
    try:
        purge = root.run("dpkg --purge --force-depends rsync && ! command -v rsync")
        assert purge.returncode == 0, purge.stdout + purge.stderr
        yield root
    finally:
        root.remove()


def test_the_readme_command_is_the_backup_with_its_install_flag():
    words = shlex.split(readme_first_command())
    assert words[:3] == ["python3", "byteback.py", "backup"]
    assert "--install-missing" in words


def test_an_ordinary_user_is_told_the_one_command_to_ask_for(no_rsync):
    command = readme_first_command()
    proc = no_rsync.run(
        f"mkdir -p /tmp/newcomer && chown nobody /tmp/newcomer && cd {shlex.quote(str(REPO))} && "
        f"setpriv --reuid=nobody --regid=nogroup --clear-groups env HOME=/tmp/newcomer "
        f"bash -c {shlex.quote(command)}")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr == ("byteback: rsync is not installed; install it with: "
                           "sudo apt-get install rsync\n")
    assert not no_rsync.path("/tmp/newcomer/byteback-store").exists()


def test_root_without_the_flag_and_without_a_terminal_installs_nothing(no_rsync):
    command = readme_first_command().replace(" --install-missing", "")
    proc = no_rsync.run(f"cd {shlex.quote(str(REPO))} && HOME=/tmp/cron-home && "
                        f"mkdir -p $HOME && {command}; echo rc=$?; command -v rsync || echo no-rsync")
    assert proc.stderr == ("byteback: rsync is not installed; install it with: apt-get install rsync "
                           "(or run this again with --install-missing)\n")
    assert proc.stdout == "rc=1\nno-rsync\n"


def test_the_readme_command_installs_rsync_and_backs_up_as_root(no_rsync):
    proc = no_rsync.run(f"cd {shlex.quote(str(REPO))} && export HOME=/tmp/fresh-root && mkdir -p $HOME && "
                        f"{readme_first_command()}", timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "byteback: installed rsync (apt-get install -y rsync)" in proc.stderr
    check = no_rsync.run("dpkg-query -W -f='${Status}' rsync && command -v rsync")
    assert check.stdout == "install ok installed/usr/bin/rsync\n"
    snapshots = list(no_rsync.path("/tmp/fresh-root/byteback-store").glob("*/2*/usr/share/doc"))
    assert len(snapshots) == 1, snapshots
    copied = snapshots[0] / "rsync" / "copyright"
    assert copied.read_bytes() == no_rsync.path("/usr/share/doc/rsync/copyright").read_bytes()


def test_at_a_terminal_root_is_asked_and_a_yes_installs(no_rsync):
    # The README's command on a small source: the question is what this test is about.
    command = readme_first_command().replace(" --install-missing", "").replace(
        "--source /usr/share/doc ", "--source /usr/share/doc/dpkg ")
    assert "/usr/share/doc/dpkg" in command
    purge = no_rsync.run("dpkg --purge --force-depends rsync && ! command -v rsync")
    assert purge.returncode == 0, purge.stdout + purge.stderr
    # script(1) gives the command a terminal; its input is the person's answer.
    proc = no_rsync.run(f"cd {shlex.quote(str(REPO))} && export HOME=/tmp/asked-root && mkdir -p $HOME && "
                        f"echo y | script -qec {shlex.quote(command)} /dev/null", timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "byteback: rsync is not installed; run 'apt-get install -y rsync' now? [y/N]" in proc.stdout
    check = no_rsync.run("command -v rsync")
    assert check.stdout == "/usr/bin/rsync\n"
    assert len(list(no_rsync.path("/tmp/asked-root/byteback-store").glob("*/2*/usr/share/doc/dpkg"))) == 1
