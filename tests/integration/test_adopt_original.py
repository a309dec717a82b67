"""setup-server taking over a store the original (Ruby) byteback made, for real.

The store is built by hand from the original's code: the backup user owns its
home, every host directory and every snapshot (byteback-setup-client-receive
creates them as that user; byteback-snapshot makes writable snapshots of
current); its prune keeps .disk_free_history and .byteback.pruning in the
home; authorized_keys holds

    command="byteback-receive",from="IP",environment="BYTEBACK_HOST=h" <key> byteback client key

and root's cron runs byteback-prune.  Then setup-server adopts it, and a month
of daily snapshots and prunes runs on the real btrfs.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from remote_env import Result, _root_dir, build_pyz  # noqa: E402
from sshd_env import _sigterm_as_interrupt, _skip_or_check, generate_key, server_environment  # noqa: E402

LEGACY_SNAPSHOTS = 30
MB = 1024 * 1024
BIG = 200 * MB        # legacy's data: 1.5 x it is more than the store has free


def btrfs(*args: str) -> str:
    return subprocess.run(["btrfs", *args], check=True, stdout=subprocess.PIPE,
                          universal_newlines=True).stdout


def is_read_only(path: Path) -> bool:
    return btrfs("property", "get", "-ts", str(path), "ro").strip() == "ro=true"


def snapshot_names(host_dir: Path) -> list:
    return sorted(p.name for p in host_dir.iterdir() if p.name[:1].isdigit())


def original_name(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M%z")       # byteback-snapshot's format


def make_original_host(store: Path, host: str, uid: int, gid: int, days: int, data: int) -> list:
    """<host>/current (a subvolume) and `days` daily writable snapshots, all the user's."""
    host_dir = store / host
    host_dir.mkdir()
    os.chown(host_dir, uid, gid)
    btrfs("subvolume", "create", str(host_dir / "current"))
    current = host_dir / "current"
    os.chown(current, uid, gid)
    with open(current / "big", "wb") as f:
        for _ in range(data // MB):
            f.write(os.urandom(MB))
    (current / "etc").mkdir()
    names = []
    now = dt.datetime.now().astimezone().replace(hour=3, minute=15, second=0, microsecond=0)
    for day in range(days, 0, -1):
        (current / "etc" / "motd").write_text(f"day {day}\n")
        os.sync()
        name = original_name(now - dt.timedelta(days=day))
        btrfs("subvolume", "snapshot", str(current), str(host_dir / name))
        names.append(name)
    return names


@pytest.fixture(scope="module")
def adopted():
    """An original store, previewed with --dry-run, then adopted by setup-server."""
    _skip_or_check()
    with _sigterm_as_interrupt(), server_environment(store_size="512M") as env:
        prog_dir, config = _root_dir("bbtest-prog-"), _root_dir("bbtest-srvcfg-")
        cron = Path("/etc/cron.d") / f"bbtest-original-prune-{secrets.token_hex(3)}"
        sudoers = Path("/etc/sudoers.d") / f"byteback-{env.user.name}"
        try:
            store, user = env.store, env.user
            os.chown(store, user.uid, user.gid)               # adduser --home: the user's own
            legacy = make_original_host(store, "legacy", user.uid, user.gid, LEGACY_SNAPSHOTS, BIG)
            db = make_original_host(store, "db_1", user.uid, user.gid, 2, MB)
            (store / ".disk_free_history").write_bytes(b"\x04\x08[\x00")    # Marshal of []
            (store / ".byteback.pruning").write_bytes(b"")
            keys = {}
            for host in ("legacy", "db_1"):
                keys[host] = generate_key(env.workdir / f"key-{host}", comment="byteback client key")
                env.authorize(f'command="byteback-receive",from="127.0.0.1",'
                              f'environment="BYTEBACK_HOST={host}" {keys[host].public}')
            for path in [store / ".ssh", user.authorized_keys, store / ".disk_free_history",
                         store / ".byteback.pruning"]:
                os.chown(path, user.uid, user.gid)
            # Never runs (31 February); only there to be found.
            cron.write_text("0 4 31 2 * root /usr/bin/byteback-prune --prune\n")
            pyz = build_pyz(prog_dir)
            program = prog_dir / "installed" / "byteback.pyz"
            os.makedirs(program.parent, mode=0o755)

            def setup(*extra: str) -> Result:
                argv = [str(pyz), "--config-dir", str(config), "setup-server", "--store", str(store),
                        "--user", user.name, "--install-path", str(program),
                        "--cron-file", str(config / "cron.d-byteback-prune"), *extra]
                p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   universal_newlines=True, timeout=300)
                return Result(argv, p.returncode, p.stdout, p.stderr).check()

            keys_before = user.authorized_keys.read_text()
            preview = setup("--dry-run")
            after_preview = {
                "keys": user.authorized_keys.read_text(),
                "owners": [os.lstat(store / "legacy" / n).st_uid for n in legacy],
                "writable": [not is_read_only(store / "legacy" / n) for n in legacy],
                "history": (store / ".byteback").exists(),
                "pruning": (store / ".byteback.pruning").exists(),
            }
            first = setup()
            second = setup()
            yield {"env": env, "store": store, "legacy": legacy, "db": db, "keys": keys,
                   "keys_before": keys_before, "preview": preview, "after_preview": after_preview,
                   "first": first, "second": second, "program": program, "config": config,
                   "cron": cron}
        finally:
            cron.unlink(missing_ok=True)
            if sudoers.exists():
                sudoers.unlink()
            for path in (prog_dir, config):
                shutil.rmtree(path, ignore_errors=True)


def server(adopted, *args: str) -> Result:
    argv = [str(adopted["program"]), "--config-dir", str(adopted["config"]), *args]
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=300)
    return Result(argv, p.returncode, p.stdout, p.stderr)


def test_dry_run_says_what_it_would_do_and_changes_nothing(adopted):
    out = adopted["preview"].stdout
    assert "holds the original byteback's backups: this would adopt them" in out
    assert f"would:     {LEGACY_SNAPSHOTS} snapshots of host legacy: root-owned and read-only" in out
    assert "would:     2 snapshots of host db_1: root-owned and read-only" in out
    assert "would:     converted  the original key of host db_1 (from 127.0.0.1)" in out
    assert f"{adopted['cron']}:1 runs the original's byteback-prune" in out
    assert out.rstrip().endswith("dry run: nothing changed")
    seen = adopted["after_preview"]
    assert seen["keys"] == adopted["keys_before"]
    assert seen["owners"] != [0] * LEGACY_SNAPSHOTS and all(seen["writable"])
    assert not seen["history"] and seen["pruning"]


def test_every_inherited_snapshot_is_root_owned_and_read_only(adopted):
    store = adopted["store"]
    for host, names in (("legacy", adopted["legacy"]), ("db_1", adopted["db"])):
        assert snapshot_names(store / host) == names           # none lost, none renamed
        for name in names:
            st = os.lstat(store / host / name)
            assert (st.st_uid, st.st_gid) == (0, 0) and is_read_only(store / host / name), name
        st = os.lstat(store / host)
        assert (st.st_uid, oct(st.st_mode & 0o7777)) == (0, "0o750")   # DESIGN 3: no renames
        assert os.lstat(store / host / "current").st_uid == adopted["env"].user.uid
    # The backup user can no longer write into, or rename, an old snapshot.
    user = adopted["env"].user
    old = store / "legacy" / adopted["legacy"][0]
    for argv in (["touch", str(old / "planted")], ["mv", str(old), str(store / "legacy" / "gone")],
                 ["btrfs", "property", "set", "-ts", str(old), "ro", "false"]):
        assert adopted["env"].run_as_user(argv).returncode != 0, argv
    assert is_read_only(old) and not (old / "planted").exists()
    assert user.uid != 0


def test_each_host_gets_its_newest_snapshot_as_baseline(adopted):
    store = adopted["store"]
    for host, names in (("legacy", adopted["legacy"]), ("db_1", adopted["db"])):
        (entry,) = json.loads((store / ".byteback" / "history" / f"{host}.json").read_text())["backups"]
        show = btrfs("subvolume", "show", str(store / host / names[-1]))
        created = int(show.split("Gen at creation:")[1].split()[0])
        assert entry["snapshot"] == names[-1] and entry["baseline"] and entry["generation"] == created


def test_the_originals_state_is_removed_with_a_word_and_its_cron_job_reported(adopted):
    out, store = adopted["first"].stdout, adopted["store"]
    assert not (store / ".disk_free_history").exists() and not (store / ".byteback.pruning").exists()
    assert f"adopted    removed {store / '.byteback.pruning'}: the original prune's state" in out
    assert f"WARNING: {adopted['cron']}:1 runs the original's byteback-prune" in out


def test_original_key_lines_become_restricted_ones_and_the_old_stay_commented(adopted):
    lines = (adopted["store"] / ".ssh" / "authorized_keys").read_text().splitlines()
    for host, key in adopted["keys"].items():
        body = key.public.split()[1]
        mine = [l for l in lines if body in l]
        assert len(mine) == 2, mine
        assert mine[0].startswith("# byteback: the original's line") and 'BYTEBACK_HOST=' + host in mine[0]
        assert mine[1] == (f'restrict,from="127.0.0.1",command="{adopted["program"]} --config-dir '
                           f'{adopted["config"]} receive --host {host}" {" ".join(key.public.split()[:2])}')
    st = os.lstat(adopted["store"] / ".ssh" / "authorized_keys")
    assert (st.st_uid, oct(st.st_mode & 0o777)) == (0, "0o644")


def test_a_second_run_changes_nothing(adopted):
    out = adopted["second"].stdout
    assert "nothing changed: this server was already set up" in out
    assert "adopting them" not in out and "converted" not in out
    lines = (adopted["store"] / ".ssh" / "authorized_keys").read_text().splitlines()
    assert sum("receive --host legacy" in l for l in lines) == 1


def test_a_month_of_daily_backups_keeps_every_inherited_snapshot(adopted):
    store, legacy = adopted["store"], adopted["legacy"]
    current = store / "legacy" / "current"
    free = shutil.disk_usage(store).free
    # Sharp: measured as a full copy, legacy's first backup would ask prune
    # for more room than the store has, and prune would delete its history.
    assert 1.5 * BIG > free, (BIG, free)
    for day in range(30):
        with open(current / f"day-{day}", "wb") as f:
            f.write(os.urandom(MB))
        server(adopted, "snapshot", "--host", "legacy", "--force").check()
        time.sleep(1.1)       # --force still names snapshots by the clock's second
    names = snapshot_names(store / "legacy")
    assert names[:LEGACY_SNAPSHOTS] == legacy, "an inherited snapshot was deleted"
    assert len(names) == LEGACY_SNAPSHOTS + 30
    backups = json.loads((store / ".byteback" / "history" / "legacy.json").read_text())["backups"]
    assert backups[0]["baseline"] and len(backups) == 31
    first = backups[1]
    assert "first" not in first and first["added"] < 8 * MB, first     # measured from the baseline
    assert snapshot_names(store / "db_1") == adopted["db"]


def test_setup_host_accepts_the_original_client_key_beside_its_old_commented_line(adopted):
    for host, key in adopted["keys"].items():
        argv = [str(adopted["program"]), "--config-dir", str(adopted["config"]), "setup-host",
                "--host", host, "--client-address", "127.0.0.1"]
        p = subprocess.run(argv, input=key.public + "\n", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True, timeout=60)
        Result(argv, p.returncode, p.stdout, p.stderr).check()
        assert f"host {host} is already set up with this key; nothing changed" in p.stdout


def qp(text: str) -> str:
    """Ruby's [s].pack("M") as byteback-restore sends it: soft breaks dropped, spaces =20."""
    return "".join(chr(b) if 33 <= b <= 126 and b != ord("=") else f"={b:02X}" for b in text.encode())


def test_an_original_clients_commands_back_up_list_and_restore_through_the_guard(adopted, tmp_path):
    """bin/byteback-backup's and bin/byteback-restore's exact command lines, as host db_1."""
    env, store, key = adopted["env"], adopted["store"], adopted["keys"]["db_1"]
    src = env.workdir / "original-client"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "motd").write_text("hello from the original client\n")
    (src / "My Files").mkdir()
    (src / "My Files" / "a b.txt").write_text("spaces\n")
    rsh = env.rsync_rsh(key)
    login = f"{env.user.name}@{env.host}:"
    ping = env.ssh("byteback-receive --ping --verbose", key=key)
    assert ping.returncode == 0, ping.stderr
    push = subprocess.run(["rsync", "--archive", "--numeric-ids", "--delete-excluded", "--delete-during",
                           "--inplace", "--relative", "--timeout", "10800", "--rsh", rsh, "--verbose",
                           "--rsync-path", "rsync --fake-super", str(src), login],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    assert push.returncode == 0, push.stderr
    assert (store / "db_1" / "current" / str(src).lstrip("/") / "My Files" / "a b.txt").is_file()
    before = snapshot_names(store / "db_1")
    complete = env.ssh("byteback-receive --complete", key=key)
    assert complete.returncode == 0, complete.stderr
    (new,) = set(snapshot_names(store / "db_1")) - set(before)
    wanted = f"{src}/My Files/a b.txt"
    listing = env.ssh(f"byteback-receive --snapshot * --list {qp(wanted)}", key=key)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].split()[:2] == ["snapshot", "mode"] and len(lines) == 2, listing.stdout
    assert lines[1].startswith(new) and lines[1].endswith(wanted) and " -rw-" in lines[1]
    missing = env.ssh(f"byteback-receive --snapshot {new} --list {qp(str(src) + '/nothing*')}", key=key)
    assert missing.returncode == 0 and missing.stdout.startswith("** Sorry.  There were no files matching:")
    def original_restore(path: str, snapshot: str, *flags: str) -> subprocess.CompletedProcess:
        out = tmp_path / secrets.token_hex(3)
        out.mkdir()
        p = subprocess.run(["rsync", "--archive", "--numeric-ids", "--inplace", "--relative", "--compress",
                            "--timeout", "300", "--rsh", rsh, "--rsync-path",
                            f"byteback-restore --fake-super --snapshot {snapshot}", *flags,
                            login + qp(path), "."],
                           cwd=out, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True, timeout=120)
        assert p.returncode == 0, p.stderr
        return out
    motd = f"{src}/etc/motd"
    for snapshot in ("*", new):
        out = original_restore(motd, snapshot)
        assert (out / motd.lstrip("/")).read_text() == "hello from the original client\n"
    # A name rsync must encode (a space: '=20') is not the name the client
    # asked for; rsync >= 3.2.5 accepts it only with --trust-sender.
    out = original_restore(wanted, "*", "--trust-sender")
    assert (out / wanted.lstrip("/")).read_text() == "spaces\n"
    out = original_restore(motd, "* --all", "--trust-sender")        # every version: ./<snapshot>/path
    assert (out / new / motd.lstrip("/")).is_file()
    for refused in ("byteback-receive --restore /etc", "byteback-snapshot --root /", "sh -c id",
                    "byteback-receive --snapshot * --list /etc/=2E=2E/=2E=2E/x"):
        p = env.ssh(refused, key=key)
        assert p.returncode == 1 and "byteback: refused:" in p.stderr, (refused, p.stderr)
