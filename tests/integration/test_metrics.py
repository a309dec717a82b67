"""status --prometheus and --textfile on a real store after real backups (issue 15, item 4).

The output is checked by Prometheus's own linter (`promtool check metrics`),
and its samples against the store and the backups that made it.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BYTEBACK = Path(os.environ.get("BYTEBACK_UNDER_TEST") or REPO / "byteback.py").resolve()
SAMPLE_RE = re.compile(r'([a-z_]+)(?:\{(.*)\})? (\S+)')


def samples(text: str) -> dict:
    """{(name, 'label="v",...'): value} of a text exposition."""
    found = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name, labels, value = SAMPLE_RE.fullmatch(line).groups()
        found[(name, labels or "")] = float(value)
    return found


def promtool_check(text: str) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("needs promtool (Debian's prometheus package; ./build.sh test extracts it)")
    proc = subprocess.run(["promtool", "check", "metrics"], input=text, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True)
    assert (proc.returncode, proc.stdout) == (0, ""), proc.stdout + "\n" + text


@pytest.fixture(scope="module")
def backed_up(tmp_path_factory):
    if shutil.which("rsync") is None:
        pytest.skip("rsync not installed: apt-get install rsync")
    work = tmp_path_factory.mktemp("metrics")
    cfg, state, store, src = work / "cfg", work / "state", work / "store", work / "src"
    for d in (cfg, state, src):
        d.mkdir()
    (cfg / "server.conf").write_text("[server]\nmin_interval = 0\n")
    (src / "data").write_bytes(os.urandom(300_000))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BYTEBACK_")}
    env["BYTEBACK_STATE_DIR"] = str(state)

    def run(*args, check=True):
        proc = subprocess.run([sys.executable, str(BYTEBACK), "--config-dir", str(cfg), *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                              timeout=120)
        assert not check or proc.returncode == 0, proc.stderr
        return proc

    started = time.time()
    for host in ("alpha", "beta"):
        run("backup", "--source", str(src), "--destination", str(store), "--host", host)
    return run, store, started


def test_server_metrics_pass_promtool_and_match_the_store(backed_up):
    run, store, started = backed_up
    text = run("status", "--store", str(store), "--prometheus").stdout
    promtool_check(text)
    got = samples(text)
    where = f'store="{store}"'
    for host in ("alpha", "beta"):
        labels = f'{where},host="{host}"'
        assert got[("byteback_host_snapshots", labels)] == 1
        assert started - 60 <= got[("byteback_host_newest_snapshot_timestamp_seconds", labels)] <= time.time()
        assert 0 <= got[("byteback_host_oldest_snapshot_age_seconds", labels)] < time.time() - started + 60
        assert got[("byteback_host_suspicious", labels)] == 0
        assert got[("byteback_host_last_backup_added_bytes", labels)] >= 300_000
    st = os.statvfs(store)
    assert abs(got[("byteback_store_free_bytes", where)] - st.f_bavail * st.f_frsize) < 64 << 20
    assert got[("byteback_store_size_bytes", where)] == st.f_blocks * st.f_frsize
    assert ("byteback_store_prune_target_bytes", where) in got
    assert got[("byteback_suspicious_backups", where)] == 0
    assert got[("byteback_status", where)] == 0


def test_client_metrics_pass_promtool_and_describe_the_last_backup(backed_up):
    run, store, started = backed_up
    text = run("status", "--prometheus", check=False).stdout
    promtool_check(text)
    got = samples(text)
    assert started - 1 <= got[("byteback_last_success_timestamp_seconds", "")] <= time.time()
    assert 0 <= got[("byteback_last_success_duration_seconds", "")] < 120
    assert got[("byteback_last_success_sent_bytes", "")] >= 300_000
    assert got[("byteback_last_attempt_failed", "")] == 0
    assert got[("byteback_backup_running", "")] == 0


def test_textfile_is_written_whole_for_node_exporter(backed_up, tmp_path):
    run, store, started = backed_up
    proc = run("status", "--store", str(store), "--textfile", str(tmp_path))
    assert (proc.stdout, proc.stderr) == ("", "")
    assert os.listdir(tmp_path) == ["byteback-server.prom"]      # no temporary file left behind
    text = (tmp_path / "byteback-server.prom").read_text()
    promtool_check(text)
    assert samples(text).keys() == samples(run("status", "--store", str(store), "--prometheus").stdout).keys()
    run("status", "--textfile", str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["byteback-server.prom", "byteback.prom"]
