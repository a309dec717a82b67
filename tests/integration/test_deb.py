"""./build.sh deb (issue 15, item 2): the package builds byte-identical, passes lintian,
and installs and runs with the real dpkg, in a scratch copy of this machine.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import scratch_root

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
VERSION = re.search(r'^VERSION = "([^"]+)"', (REPO / "byteback.py").read_text(), re.M).group(1)
DEB_NAME = f"byteback_{VERSION}_all.deb"


def _build_deb(src: Path, out: Path, umask: int = 0o022) -> Path:
    if shutil.which("dpkg-deb") is None:
        pytest.skip("needs dpkg-deb (dpkg)")
    env = dict(os.environ, BYTEBACK_SRC_DIR=str(src), BYTEBACK_OUT_DIR=str(out))
    env.pop("SOURCE_DATE_EPOCH", None)
    proc = subprocess.run(["bash", "-c", 'umask "$1" && exec "$0" deb', str(REPO / "build.sh"), "%04o" % umask],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == f"built {out / DEB_NAME}"
    return out / DEB_NAME


def _tree_copy(dest: Path, mtime: int, mode: int) -> Path:
    dest.mkdir()
    for name in ("byteback.py", "LICENSE", "README.md"):
        shutil.copy(REPO / name, dest / name)
    shutil.copytree(REPO / "simulate", dest / "simulate", ignore=shutil.ignore_patterns("__pycache__"))
    for path in sorted(dest.rglob("*"), reverse=True):
        if path.is_file():
            path.chmod(mode)
        os.utime(path, (mtime, mtime))
    return dest


@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    return _build_deb(REPO, tmp_path_factory.mktemp("deb"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_package_is_byte_identical_whatever_the_mtimes_modes_and_umask(tmp_path, deb):
    a = _build_deb(_tree_copy(tmp_path / "a", 1_000_000_000, 0o600), tmp_path / "out_a", umask=0o077)
    b = _build_deb(_tree_copy(tmp_path / "b", 1_700_000_000, 0o644), tmp_path / "out_b", umask=0o022)
    assert _sha256(a) == _sha256(b) == _sha256(deb)
    assert sorted(p.name for p in (tmp_path / "out_a").iterdir()) == ["byteback.pyz", DEB_NAME]


def test_control_fields_contents_and_no_maintainer_scripts(deb):
    def field(name):
        return subprocess.run(["dpkg-deb", "-f", str(deb), name], stdout=subprocess.PIPE,
                              universal_newlines=True, check=True).stdout.strip()
    assert field("Package") == "byteback" and field("Version") == VERSION
    assert field("Architecture") == "all"
    assert field("Depends") == "python3 (>= 3.8), rsync, openssh-client"
    assert field("Recommends") == "btrfs-progs, sudo, openssh-server"
    control = subprocess.run(f"dpkg-deb --ctrl-tarfile {deb} | tar -t", shell=True, stdout=subprocess.PIPE,
                             universal_newlines=True, check=True).stdout.split()
    assert sorted(control) == ["./", "./control", "./md5sums"]        # no scripts, no conffiles
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], stdout=subprocess.PIPE, universal_newlines=True,
                             check=True).stdout
    files = sorted(line.split()[-1] for line in listing.splitlines() if not line.endswith("/"))
    assert files == ["./usr/bin/byteback", "./usr/share/doc/byteback/README.md.gz",
                     "./usr/share/doc/byteback/changelog.gz", "./usr/share/doc/byteback/copyright",
                     "./usr/share/man/man1/byteback.1.gz"]
    assert all(" root/root " in line for line in listing.splitlines())


def test_lintian_finds_nothing(deb):
    if shutil.which("lintian") is None:
        pytest.skip("needs lintian: apt-get install lintian (./build.sh test does)")
    proc = subprocess.run(["lintian", "--fail-on", "error,warning,info,pedantic", "--info", "--pedantic",
                           str(deb)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=600)
    tags = [l for l in proc.stdout.splitlines() if re.match(r"[EWIPX]: ", l)]
    assert (proc.returncode, tags) == (0, []), proc.stdout


@pytest.fixture(scope="module")
def installed(deb):
    reason = scratch_root.skip_reason()
    if reason:
        pytest.skip(reason)
    root = scratch_root.ScratchRoot()
    try:
        proc = root.run(f"dpkg -i {deb}")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        yield root
    finally:
        root.remove()


def test_the_installed_package_runs(installed):
    version = installed.run("byteback --version")
    assert (version.returncode, version.stdout) == (0, f"byteback {VERSION}\n")
    # A fresh client: no backup yet is CRITICAL, in Nagios's terms.
    status = installed.run("BYTEBACK_STATE_DIR=/tmp/state byteback status --nagios")
    assert (status.returncode, status.stdout) == (2, "BYTEBACK CRITICAL - last backup never|age=U;93600;180000\n")
    backup = installed.run("BYTEBACK_STATE_DIR=/tmp/state byteback backup --source /usr/share/doc/byteback "
                           "--destination /tmp/pkg-store --host pkgtest")
    assert (backup.returncode, backup.stdout, backup.stderr) == (0, "", "")
    snapshots = [p for p in installed.path("/tmp/pkg-store/pkgtest").iterdir() if p.name[:1].isdigit()]
    assert len(snapshots) == 1
    kept = snapshots[0] / "usr/share/doc/byteback/copyright"
    assert kept.read_bytes() == installed.path("/usr/share/doc/byteback/copyright").read_bytes()
    status = installed.run("BYTEBACK_STATE_DIR=/tmp/state byteback status --nagios")
    assert status.returncode == 0 and status.stdout.startswith("BYTEBACK OK - last backup "), status.stdout
    manual = installed.run("zcat /usr/share/man/man1/byteback.1.gz")
    assert ".SH INSTALL\\-CRON" in manual.stdout and "--install-missing" in manual.stdout.replace("\\-", "-")


def test_setup_server_from_the_package_names_the_packaged_program(installed):
    proc = installed.run("byteback setup-server --store /srv/byteback-pkg")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "wrote      /usr/local/bin/byteback.pyz" not in proc.stdout      # nothing copied beside the package
    sudoers = installed.path("/etc/sudoers.d/byteback").read_text()
    assert "NOPASSWD: /usr/bin/byteback snapshot --host *" in sudoers
    cron = installed.path("/etc/cron.d/byteback-prune").read_text()
    assert re.search(r"^\d+ \* \* \* \* root /usr/bin/byteback prune --if-idle$", cron, re.M), cron


def test_the_package_purges_cleanly(installed):
    proc = installed.run("dpkg --purge byteback && ! test -e /usr/bin/byteback && ! dpkg -s byteback")
    assert proc.returncode == 0, proc.stdout + proc.stderr
