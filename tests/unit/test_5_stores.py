"""Section 5: /proc/mounts parsing, and the hardlink store on real directories in tmp_path."""
from __future__ import annotations

import json
import os
import stat

import pytest

import byteback
from byteback import ByteBackError
from unit_helpers import FakeRunner, at

PROC_MOUNTS = r"""sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
/dev/vda1 / ext4 rw,relatime 0 0
/dev/vdb /srv btrfs rw,relatime,space_cache=v2,subvolid=5,subvol=/ 0 0
/dev/vdc /srv/byteback btrfs rw,relatime 0 0
tmpfs /run tmpfs rw,nosuid,nodev 0 0
/dev/sdb1 /media/My\040Disk vfat rw 0 0
/dev/sdc1 /mnt/tab\011and\134back ext4 rw 0 0
server:/export /mnt/nfs nfs4 rw 0 0
short line
"""


def test_parse_mounts_unescapes_octal_fields():
    mounts = byteback.parse_mounts(PROC_MOUNTS)
    assert mounts == [
        ("/sys", "sysfs"), ("/proc", "proc"), ("/", "ext4"), ("/srv", "btrfs"),
        ("/srv/byteback", "btrfs"), ("/run", "tmpfs"), ("/media/My Disk", "vfat"),
        ("/mnt/tab\tand\\back", "ext4"), ("/mnt/nfs", "nfs4"),
    ]


@pytest.mark.parametrize("path,fstype", [
    ("/", "ext4"),
    ("/home/alice", "ext4"),
    ("/srv", "btrfs"),
    ("/srv/byteback/web1", "btrfs"),
    ("/srvx/data", "ext4"),                 # a prefix of a name is not a parent
    ("/media/My Disk/photos", "vfat"),
    ("/media/My", "ext4"),
    ("/mnt/nfs", "nfs4"),
    ("/run/lock", "tmpfs"),
])
def test_filesystem_type_takes_the_longest_matching_mount(path, fstype):
    assert byteback.filesystem_type(path, byteback.parse_mounts(PROC_MOUNTS)) == fstype


def test_filesystem_type_the_last_of_two_mounts_on_one_point_wins():
    mounts = [("/", "ext4"), ("/srv", "ext4"), ("/srv", "btrfs")]      # mounted over
    assert byteback.filesystem_type("/srv/b", mounts) == "btrfs"


def test_filesystem_type_without_mounts_is_unknown():
    assert byteback.filesystem_type("/srv", []) == "unknown"


# -- tree_size --

def test_tree_size_counts_hard_links_once_and_never_follows_symlinks(tmp_path):
    root = tmp_path / "tree"
    (root / "sub").mkdir(parents=True)
    (root / "a").write_bytes(b"x" * 100)
    (root / "sub" / "b").write_bytes(b"y" * 30)
    (root / "linked").write_bytes(b"z" * 7)
    os.link(root / "linked", root / "sub" / "linked-again")
    outside = tmp_path / "outside"
    outside.write_bytes(b"o" * 1000)
    (root / "sym").symlink_to(outside)
    (root / "symdir").symlink_to(tmp_path)
    total, unique = byteback.tree_size(root)
    assert total == 137
    assert unique == 130           # the hard-linked file is not new data of this tree


# -- HardlinkStore on real directories --

def test_snapshots_lists_only_finished_snapshot_directories(tiny, tmp_path):
    store = tiny.store
    web = tiny.root / "web1"
    for name in ("2014-03-24T12:00+0000", "2026-01-02T03:15+0000", "2026-01-01T03:15:30Z"):
        (web / name).mkdir(parents=True)
    (web / "current").mkdir()
    (web / ".incomplete-2026-01-03T03:15+0000").mkdir()
    (web / ".deleting-2025-01-03T03:15+0000").mkdir()
    (web / "2026-01-04T03:15+0000").write_text("a file, not a snapshot")
    (web / "2026-01-05T03:15+0000").symlink_to(tmp_path)
    (web / "notes").mkdir()
    assert [s.name for s in store.snapshots("web1")] == [
        "2014-03-24T12:00+0000", "2026-01-01T03:15:30Z", "2026-01-02T03:15+0000"]
    assert store.snapshots("web1")[0].when == at(2014, 3, 24, 12, 0)
    assert store.snapshots("nobody") == []


def test_snapshots_of_all_hosts_sorted_by_host_then_time(tiny):
    tiny.add_snapshot("web2", at(2026, 1, 1, 3, 0))
    tiny.add_snapshot("web1", at(2026, 1, 2, 3, 0))
    tiny.add_snapshot("web1", at(2026, 1, 1, 3, 0))
    assert [(s.host, s.name) for s in tiny.store.snapshots()] == [
        ("web1", "2026-01-01T03:00+0000"), ("web1", "2026-01-02T03:00+0000"),
        ("web2", "2026-01-01T03:00+0000")]


def test_hosts_are_valid_names_of_real_directories(tiny, tmp_path):
    for name in ("web1", "db.example.com", ".byteback", "lost+found", "-x", "bad name"):
        (tiny.root / name).mkdir()
    (tiny.root / "file.example.com").write_text("")
    (tiny.root / "link.example.com").symlink_to(tmp_path)
    assert tiny.store.hosts() == ["db.example.com", "web1"]


def test_paths_are_derived_from_a_checked_host_name(tiny):
    assert tiny.store.current("web1") == tiny.root / "web1" / "current"
    assert tiny.store.history_path("web1") == tiny.root / ".byteback" / "history" / "web1.json"
    for bad in ("..", "../x", "a/b", "-x"):
        with pytest.raises(ByteBackError):
            tiny.store.current(bad)
        with pytest.raises(ByteBackError):
            tiny.store.history_path(bad)


def test_snapshot_path_refuses_a_name_that_is_not_a_snapshot(tiny):
    with pytest.raises(ByteBackError):
        tiny.store.snapshot_path(byteback.Snapshot("web1", "current", at(2026, 1, 1)))
    with pytest.raises(ByteBackError):
        tiny.store.snapshot_path(byteback.Snapshot("web1", "../web2/2026-01-01T00:00+0000", at(2026, 1, 1)))


def test_history_round_trip_and_missing_history(tiny):
    assert tiny.store.read_history("web1") == []
    tiny.store.write_history("web1", [{"added": 5}, {"added": 6}])
    assert tiny.store.read_history("web1") == [{"added": 5}, {"added": 6}]
    data = json.loads(tiny.store.history_path("web1").read_text())
    assert data["host"] == "web1"


def test_history_keeps_only_the_last_entries(tiny):
    tiny.store.write_history("web1", [{"n": i} for i in range(byteback.HISTORY_KEEP + 5)])
    kept = tiny.store.read_history("web1")
    assert len(kept) == byteback.HISTORY_KEEP
    assert kept[0] == {"n": 5} and kept[-1] == {"n": byteback.HISTORY_KEEP + 4}


@pytest.mark.parametrize("content", ['[]', '{"backups": "many"}', '{"backups": [1, 2]}', '"text"', '{}'])
def test_a_history_of_the_wrong_shape_is_one_line_naming_the_file(tiny, content):
    path = tiny.store.history_path("web1")
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(ByteBackError) as exc:
        tiny.store.read_history("web1")
    assert str(exc.value) == (f"{path} is not a byteback history; move it aside "
                              f"(mv {path} {path}.bad) and byteback will start it afresh")


def test_dirty_marker_is_kept_from_the_first_write(tiny):
    store = tiny.store
    assert store.dirty_since("web1") is None
    store.mark_dirty("web1", at(2026, 1, 1, 3, 0))
    store.mark_dirty("web1", at(2026, 1, 1, 4, 0))          # a retry: the first time stays
    assert store.dirty_since("web1") == at(2026, 1, 1, 3, 0)
    store.clear_dirty("web1")
    assert store.dirty_since("web1") is None
    store.clear_dirty("web1")                                # twice is fine


@pytest.mark.parametrize("content", ["", "{", "[]", '{"since": 5}', '{"since": "yesterday"}', '{"x": 1}'])
def test_a_garbled_dirty_marker_reads_as_none(tiny, content):
    path = tiny.store.dirty_path("web1")
    path.parent.mkdir(parents=True)
    path.write_text(content)
    assert tiny.store.dirty_since("web1") is None


def test_prepare_host_creates_host_and_current_and_refuses_a_symlinked_current(tiny, tmp_path):
    current = tiny.store.prepare_host("web1")
    assert current == tiny.root / "web1" / "current" and current.is_dir()
    assert tiny.store.prepare_host("web1") == current        # idempotent
    current.rmdir()
    current.symlink_to(tmp_path)
    with pytest.raises(ByteBackError, match="is a symlink"):
        tiny.store.prepare_host("web1")


def test_rsync_options_link_to_the_newest_snapshot_and_never_inplace(tiny):
    assert tiny.store.rsync_options("web1") == []
    tiny.add_snapshot("web1", at(2026, 1, 1, 3, 0))
    newest = tiny.add_snapshot("web1", at(2026, 1, 2, 3, 0))
    tiny.add_snapshot("web2", at(2026, 1, 3, 3, 0))
    options = tiny.store.rsync_options("web1")
    assert options == [f"--link-dest={tiny.root / 'web1' / newest.name}"]
    assert "--inplace" not in options


def test_delete_removes_the_snapshot_whole(tiny):
    snap = tiny.add_snapshot("web1", at(2026, 1, 1, 3, 0))
    keep = tiny.add_snapshot("web1", at(2026, 1, 2, 3, 0))
    path = tiny.root / "web1" / snap.name
    (path / "ro").mkdir()
    (path / "ro" / "f").write_text("x")
    os.chmod(path / "ro", 0o555)
    os.chmod(path, 0o555)
    tiny.store.delete(snap)
    assert sorted(os.listdir(tiny.root / "web1")) == [keep.name, "current"]


def test_clean_leftovers_removes_half_made_and_half_deleted_snapshots(tiny):
    snap = tiny.add_snapshot("web1", at(2026, 1, 1, 3, 0))
    for name in (".incomplete-2026-01-02T03:00+0000", ".deleting-2025-12-01T03:00+0000"):
        (tiny.root / "web1" / name / "deep").mkdir(parents=True)
    removed = tiny.store.clean_leftovers()
    assert sorted(os.path.basename(p) for p in removed) == [
        ".deleting-2025-12-01T03:00+0000", ".incomplete-2026-01-02T03:00+0000"]
    assert sorted(os.listdir(tiny.root / "web1")) == [snap.name, "current"]


def test_open_store_refuses_what_is_not_a_directory(tmp_path):
    (tmp_path / "file").write_text("")
    for root in (tmp_path / "file", tmp_path / "missing"):
        with pytest.raises(ByteBackError) as exc:
            byteback.open_store(root)
        assert str(exc.value) == f"store {root} is not a directory; create it or fix the destination"


def test_open_store_can_create_the_store(tmp_path):
    store = byteback.open_store(tmp_path / "new" / "store", create=True)
    assert (tmp_path / "new" / "store").is_dir()
    assert store.root == tmp_path / "new" / "store"


def test_open_store_on_a_plain_filesystem_is_a_hardlink_store(tmp_path, monkeypatch):
    monkeypatch.setattr(byteback, "_read_mounts", lambda: [("/", "ext4")])
    store = byteback.open_store(tmp_path)
    assert isinstance(store, byteback.HardlinkStore) and store.kind == "hardlink"
    assert store.kind == "hardlink"


def test_open_store_on_btrfs_needs_root_for_the_btrfs_backend(tmp_path, monkeypatch):
    monkeypatch.setattr(byteback, "_read_mounts", lambda: [("/", "btrfs")])
    monkeypatch.setattr(byteback.os, "geteuid", lambda: 1000)
    assert isinstance(byteback.open_store(tmp_path), byteback.HardlinkStore)
    monkeypatch.setattr(byteback.os, "geteuid", lambda: 0)
    store = byteback.open_store(tmp_path)
    assert isinstance(store, byteback.BtrfsStore) and store.kind == "btrfs"


# -- BtrfsStore's parsing of btrfs output, with a FakeRunner --

def test_btrfs_generation_and_bytes_written_parse_find_new(tmp_path):
    runner = FakeRunner([
        "transid marker was 1234\n",
        "inode 257 file offset 0 len 4096 disk start 0 offset 0 gen 1200 flags NONE a\n"
        "inode 258 file offset 4096 len 100 disk start 0 offset 0 gen 1201 flags INLINE b\n"
        "transid marker was 1234\n",
    ])
    store = byteback.BtrfsStore(tmp_path, runner)
    assert store.generation(tmp_path / "web1" / "current") == 1234
    assert store.bytes_written_since(tmp_path / "web1" / "current", 1100) == 4196
    assert runner.calls == [
        (["btrfs", "subvolume", "find-new", str(tmp_path / "web1" / "current"), "9999999999"], False),
        (["btrfs", "subvolume", "find-new", str(tmp_path / "web1" / "current"), "1100"], False),
    ]


# -- whether a btrfs current needs unshare_current's walk --

@pytest.mark.parametrize("backups,resumed,needed", [
    ([], False, True),                                         # nothing known yet
    ([{"linked": 0}], False, False),                           # no hard links at the last snapshot
    ([{"linked": 0}], True, True),                             # an unfinished run wrote since
    ([{"linked": 3}], False, True),
    ([{"linked": 0}, {"linked": 2}], False, True),             # only the newest counts
    ([{"linked": 2}, {"linked": 0}], False, False),
    ([{"size": 5}], False, True),                              # recorded before "linked" existed
    ([{"linked": "0"}], False, True), ([{"linked": False}], False, True), ([{"linked": None}], False, True),
])
def test_unshare_walk_needed(backups, resumed, needed):
    assert byteback.unshare_walk_needed(backups, resumed) is needed


def test_tree_stats_counts_every_name_of_a_shared_inode(tmp_path):
    root = tmp_path / "tree"
    (root / "sub").mkdir(parents=True)
    (root / "a").write_bytes(b"x" * 10)
    (root / "b").write_bytes(b"y" * 5)
    os.link(root / "b", root / "sub" / "b2")
    os.link(root / "b", root / "sub" / "b3")
    (root / "sym").symlink_to(root / "a")
    assert byteback.tree_stats(root) == (15, 10, 3)
    (root / "sub" / "b2").unlink()
    (root / "sub" / "b3").unlink()
    assert byteback.tree_stats(root) == (15, 15, 0)
