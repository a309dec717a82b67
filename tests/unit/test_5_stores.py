"""Section 5: /proc/mounts parsing, and the hardlink store on real directories in tmp_path."""
from __future__ import annotations

import errno
import json
import os
import stat
import struct

import pytest

import byteback
from byteback import ByteBackError
from unit_helpers import at

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


def test_a_dirty_marker_replaces_a_planted_dangling_symlink(tiny, tmp_path):
    """mark_dirty writes a new file without a rename (one fsync); a name the backup user
    planted at its path, which it does not follow, is still replaced by the marker."""
    store = tiny.store
    path = store.dirty_path("web1")
    path.parent.mkdir(parents=True)
    target = tmp_path / "elsewhere"
    path.symlink_to(target)
    store.mark_dirty("web1", at(2026, 1, 1, 3, 0))
    assert not path.is_symlink() and path.is_file() and not target.exists()
    assert store.dirty_since("web1") == at(2026, 1, 1, 3, 0)


def test_write_new_json_writes_a_file_that_was_not_there(tmp_path):
    path = tmp_path / "run" / "marker"
    byteback.write_new_json(path, {"since": "x"}, mode=0o640)
    assert json.loads(path.read_text()) == {"since": "x"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


@pytest.mark.parametrize("content", ["", "{", "[]", '{"since": 5}', '{"since": "yesterday"}', '{"x": 1}'])
def test_a_garbled_dirty_marker_reads_as_none(tiny, content):
    path = tiny.store.dirty_path("web1")
    path.parent.mkdir(parents=True)
    path.write_text(content)
    assert tiny.store.dirty_since("web1") is None


@pytest.mark.parametrize("content", ["", "{", '{"since": "yesterday"}'])
def test_a_garbled_dirty_marker_is_written_anew(tiny, content):
    """A marker half written (a crash, a full disc) or garbled would otherwise stand, read
    as none, through a push that is then cut: the next one would not know it resumes."""
    path = tiny.store.dirty_path("web1")
    path.parent.mkdir(parents=True)
    path.write_text(content)
    tiny.store.mark_dirty("web1", at(2026, 1, 1, 3, 0))
    assert tiny.store.dirty_since("web1") == at(2026, 1, 1, 3, 0)


def test_write_new_json_leaves_nothing_when_it_cannot_write(tmp_path, monkeypatch):
    """A full disc: the new file goes again, not left empty where a reader takes it as none."""
    path = tmp_path / "run" / "marker"

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(byteback.os, "fsync", full)
    with pytest.raises(OSError):
        byteback.write_new_json(path, {"since": "x"})
    assert not os.path.lexists(path)


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


@pytest.mark.skipif(os.geteuid() != 0, reason="handing a tree to another owner needs root")
@pytest.mark.parametrize("as_root,owner", [(True, 0), (False, 4321)])
def test_a_hardlink_snapshot_is_roots_only_in_a_store_that_acts_as_root(tmp_path, as_root, owner):
    store = byteback.HardlinkStore(tmp_path, as_root=as_root)
    current = store.prepare_host("web1")
    os.chown(current, 4321, 4321)          # as a client's upload leaves it
    store.take_snapshot("web1", "2026-01-02T03:15+0000", None)
    assert os.lstat(tmp_path / "web1" / "2026-01-02T03:15+0000").st_uid == owner
    assert os.lstat(store.current("web1")).st_uid == (4321 if as_root else 0)


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
    store = byteback.open_store(tmp_path, euid=1000)
    assert isinstance(store, byteback.HardlinkStore) and not store.as_root
    store = byteback.open_store(tmp_path, euid=0)
    assert isinstance(store, byteback.BtrfsStore) and store.kind == "btrfs" and store.as_root


@pytest.mark.parametrize("euid", [0, 1000])
def test_open_store_decides_once_whether_the_store_acts_as_root(tmp_path, monkeypatch, euid):
    monkeypatch.setattr(byteback, "_read_mounts", lambda: [("/", "ext4")])
    store = byteback.open_store(tmp_path, euid=euid)
    assert isinstance(store, byteback.HardlinkStore) and store.as_root == (euid == 0)


# -- Measuring a btrfs backup from the kernel's binary tree-search records --
#
# Hand-made buffers in the layout of linux/btrfs.h and btrfs_tree.h: a record
# header (transid, objectid, offset, type, len) and the item's bytes.

def _record(transid, objectid, kind, item, offset=0):
    return struct.pack("<3Q2I", transid, objectid, offset, kind, len(item)) + item


def _inode(transid, size, mode=0o100644):
    # generation, transid, size, nbytes, block_group, nlink, uid, gid, mode, then the rest
    return struct.pack("<QQQQQIIII", 1, transid, size, size, 0, 1, 0, 0, mode) + bytes(104)


def _name_item(transid, name: bytes, data: bytes = b""):
    # btrfs_dir_item: location key (17), transid, data_len, name_len, type; then name, data
    return bytes(17) + struct.pack("<QHHB", transid, len(data), len(name), 1) + name + data


def _extent(generation, bytenr, disc_bytes, kind=1):
    return (struct.pack("<QQBBHB", generation, disc_bytes, 0, 0, 0, kind)
            + struct.pack("<4Q", bytenr, disc_bytes, 0, disc_bytes))


def _inline(generation, data: bytes):
    return struct.pack("<QQBBHB", generation, len(data), 0, 0, 0, 0) + data


FORGED = b"x\ninode 1 file offset 0 len 1000000000000000 disk start 0 offset 0 gen 9 flags NONE y"


def _tally(records, since, count=None):
    tally = byteback.SubvolumeTally(since)
    last = tally.add(b"".join(records), len(records) if count is None else count)
    return tally.usage(), last


def test_a_search_buffer_ends_at_a_record_longer_than_the_buffer():
    records = [_record(7, 257, 1, _inode(7, 10)), _record(7, 257, 12, b"\x01\x02", offset=256),
               struct.pack("<3Q2I", 7, 258, 0, 1, 999) + _inode(7, 5000)]
    usage, last = _tally(records, 0, count=5)
    assert last == (257, 12, 256) and usage.size == 10


def test_tally_counts_what_changed_since_and_never_reads_names_as_sizes():
    old, new = 100, 200
    records = [
        _record(old, 256, 1, _inode(old, 0, mode=0o040755)),            # the root directory, old
        _record(new, 256, 84, _name_item(new, FORGED)),                 # a new name in it: metadata only
        _record(new, 256, 96, _name_item(old, b"old-name")),            # an old entry in a rewritten leaf
        _record(new, 257, 1, _inode(new, 4096)),                        # a new file of 4096 bytes
        _record(new, 257, 12, b"\x00" * 10 + FORGED),                   # its back reference (the name)
        _record(new, 257, 24, _name_item(new, b"user.big", b"z" * 15000)),   # a 15 KB xattr
        _record(new, 257, 108, _extent(new, 1 << 20, 4096)),            # its data
        _record(old, 258, 1, _inode(old, 1000)),                        # an old file ...
        _record(old, 258, 108, _extent(old, 2 << 20, 4096)),            # ... and its old extent
        _record(new, 259, 1, _inode(new, 4096)),                        # a new reflinked copy:
        _record(new, 259, 108, _extent(old, 2 << 20, 4096)),            # the extent keeps its generation
        _record(new, 260, 1, _inode(new, 8192)),                        # two new extents, one shared
        _record(new, 260, 108, _extent(new, 1 << 20, 4096), offset=0),
        _record(new, 260, 108, _extent(new, 3 << 20, 8192), offset=4096),
        _record(new, 260, 108, _extent(new, 0, 4096), offset=12288),    # a hole: no data
        _record(new, 261, 1, _inode(new, 3)),
        _record(new, 261, 108, _inline(new, b"abc")),
    ]
    unchanged = {0, 2, 7, 8, 10}                                        # by place in the list above
    overhead = byteback.BTRFS_ITEM_OVERHEAD
    item_bytes = [len(r) - 32 + overhead for r in records]
    usage, last = _tally(records, since=new)
    assert last == (261, 108, 0)
    assert usage.size == 4096 + 1000 + 4096 + 8192 + 3          # regular files only, directories not
    assert usage.data == 4096 + 8192                            # each new extent once; the forged name adds nothing
    assert usage.generation == new
    assert usage.metadata == sum(n for i, n in enumerate(item_bytes) if i not in unchanged)
    assert usage.metadata > 15000                               # the xattr counts
    everything, _ = _tally(records, since=0)                    # a first backup: all of it is new
    assert everything.data == 4096 + 4096 + 8192
    assert everything.metadata == sum(item_bytes)


def test_a_tally_carries_an_inode_across_buffers():
    tally = byteback.SubvolumeTally(5)
    tally.add(_record(5, 300, 1, _inode(5, 0)), 1)
    tally.add(_record(5, 300, 12, b"\x00" * 20) + _record(1, 301, 12, b"\x00" * 20), 2)
    assert tally.usage().metadata == (160 + 20 + 2 * byteback.BTRFS_ITEM_OVERHEAD)


def test_tally_of_many_empty_files_with_big_xattrs_is_not_zero():
    """Issue 8 class 2: thousands of empty files each with a 15 KB xattr used 212 MB, counted 0."""
    records = [r for i in range(1000) for r in (
        _record(9, 300 + i, 1, _inode(9, 0)), _record(9, 300 + i, 24, _name_item(9, b"user.x", b"q" * 15000)))]
    usage, _ = _tally(records, since=9)
    assert usage.data == 0 and usage.size == 0
    assert usage.metadata >= 1000 * 15000


@pytest.mark.parametrize("spaces,copies", [
    ([(1, 8 << 20, 0), (34, 8 << 20, 0), (36, 50 << 20, 0), (1 << 49, 5 << 20, 0)], (1, 2)),  # single, DUP
    ([(17, 1, 0), (20, 1, 0)], (2, 2)),                                                      # RAID1 both
    ([(5, 1, 0)], (1, 1)),                                                                   # mixed groups
    ([(1 | 512, 1, 0), (4 | 1024, 1, 0)], (3, 4)),                                           # RAID1C3, C4
    ([], (1, 1)),
])
def test_profile_copies(spaces, copies):
    assert byteback.profile_copies(spaces) == copies


@pytest.mark.parametrize("backups,since", [
    ([], 0),
    ([{"added": 1}], 0),                                     # adopted or hardlink history: all is new
    ([{"generation": 40}, {"added": 3}], 41),
    ([{"generation": 40}, {"generation": 52}], 53),
    ([{"generation": "soon"}], 1),                           # garbage counts as 0, never a crash
])
def test_written_since_takes_the_newest_recorded_generation(backups, since):
    assert byteback.written_since(byteback.last_measured(backups)) == since


# -- whether a btrfs current needs unshare_current's walk --

@pytest.mark.parametrize("backups,resumed,needed", [
    ([], False, True),                                         # nothing known yet
    ([{"linked": 0}], False, False),                           # no hard links at the last snapshot
    ([{"linked": 0}], True, True),                             # an unfinished run wrote since
    ([{"linked": 3}], False, False),                           # the snapshot after it finds a changed one
    ([{"linked": 3}], True, True),
    ([{"linked": 0}, {"size": 2}], False, True),               # only the newest counts
    ([{"size": 2}, {"linked": 2}], False, False),
    ([{"size": 5}], False, True),                              # recorded before "linked" existed
    ([{"linked": "0"}], False, True), ([{"linked": False}], False, True), ([{"linked": None}], False, True),
])
def test_unshare_walk_needed_by_a_client_that_copies_again(backups, resumed, needed):
    assert byteback.unshare_walk_needed(backups, resumed, again=True) is needed


@pytest.mark.parametrize("backups,resumed,needed", [
    ([], False, True),
    ([{"linked": 0}], False, False),                           # no hard links: nothing to refuse
    ([{"linked": 0}], True, True),
    ([{"linked": 3}], False, True),                            # a refusal would fail its backup
    ([{"linked": 0}, {"linked": 1}], False, True),             # only the newest counts
    ([{"linked": 2}, {"linked": 0}], False, False),
    ([{"size": 5}], False, True),
    ([{"linked": "0"}], False, True), ([{"linked": False}], False, True), ([{"linked": None}], False, True),
])
def test_unshare_walk_needed_by_a_client_that_does_not_know_again(backups, resumed, needed):
    assert byteback.unshare_walk_needed(backups, resumed, again=False) is needed


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


def test_tally_counts_every_name_of_a_shared_inode():
    linked = struct.pack("<QQQQQIIII", 1, 5, 7, 7, 0, 3, 0, 0, 0o100644) + bytes(104)   # nlink 3
    usage, _ = _tally([_record(5, 300, 1, linked), _record(5, 301, 1, _inode(5, 2))], since=0)
    assert usage.linked == 3 and usage.size == 9


def _linked_inode(made, written, nlink, mode=0o100644):
    return struct.pack("<QQQQQIIII", made, written, 7, 7, 0, nlink, 0, 0, mode) + bytes(104)


def test_tally_counts_the_old_shared_inodes_a_run_wrote():
    """What BtrfsStore.take_snapshot refuses: an inode names of the last snapshot share, written since."""
    records = [
        _record(20, 300, 1, _linked_inode(3, 20, 2)),       # old, linked, written: counted
        _record(9, 301, 1, _linked_inode(3, 9, 2)),         # old, linked, untouched
        _record(20, 302, 1, _linked_inode(15, 20, 3)),      # made by this run (a new group, or unshared)
        _record(20, 303, 1, _linked_inode(3, 20, 1)),       # old, written, one name only
        _record(20, 304, 1, _linked_inode(3, 20, 2, mode=0o120777)),   # a hard-linked symlink counts too
    ]
    usage, _ = _tally(records, since=10)
    assert [inode.inode for inode in usage.shared] == [300, 304]
    assert _tally(records, since=0)[0].shared == ()            # a first backup: nothing is old


def _shared(*items, since=10, made=3, nlink=2, written=20, mtime=500, uid=0):
    """The SharedInode the tally makes of inode 300 with these xattr/extent records after it."""
    inode = (struct.pack("<QQQQQIIII", made, written, 7, 7, 0, nlink, uid, 0, 0o100644)
             + bytes(80) + struct.pack("<QI", mtime, 0) + bytes(12))
    usage, _ = _tally([_record(written, 300, 1, inode)]
                      + [_record(written, 300, kind, item, offset) for kind, item, offset in items], since)
    (shared,) = usage.shared or (None,)
    return shared


def _before(*items, made=3, nlink=2, mtime=500, uid=0):
    """The same inode as the last snapshot holds it (nothing there is written since)."""
    inode = (struct.pack("<QQQQQIIII", made, 5, 7, 7, 0, nlink, uid, 0, 0o100644)
             + bytes(80) + struct.pack("<QI", mtime, 0) + bytes(12))
    reader = byteback.InodeReader()
    records = [_record(5, 300, 1, inode)] + [_record(5, 300, kind, item, offset) for kind, item, offset in items]
    reader.take(b"".join(records), len(records))
    return reader.inode


OLD_EXTENT = (108, _extent(4, 1 << 20, 4096), 0)
OLD_XATTR = (24, _name_item(4, b"user.rsync.%stat", b"100644 0,0 0:0"), 77)


@pytest.mark.parametrize("now,before,changed", [
    # Only names added or removed (rsync -H linking one more, --delete, a package upgrade): not counted.
    (dict(), dict(), False),
    (dict(nlink=3), dict(), False), (dict(), dict(nlink=3), False),
    # The data rewritten through it (a file split off from its group, written in place): counted.
    (dict(items=[(108, _extent(20, 2 << 20, 4096), 0), OLD_XATTR]), dict(), True),
    (dict(items=[(108, _inline(20, b"new"), 0), OLD_XATTR]), dict(items=[(108, _inline(4, b"old"), 0), OLD_XATTR]),
     True),
    # An xattr set by name (fake-super's owner and mode), even replaced in place with its old transid.
    (dict(items=[OLD_EXTENT, (24, _name_item(20, b"user.rsync.%stat", b"100600 0,0 0:0"), 77)]), dict(), True),
    (dict(items=[OLD_EXTENT, (24, _name_item(4, b"user.rsync.%stat", b"100600 0,0 0:0"), 77)]), dict(), True),
    (dict(items=[OLD_EXTENT]), dict(), True),                              # an xattr removed
    # Its stat set by name: mtime, owner.
    (dict(mtime=501), dict(), True), (dict(uid=1000), dict(), True),
    # It had one name at the last snapshot: rsync -H linked the others after writing it.
    (dict(items=[(108, _extent(20, 2 << 20, 4096), 0)]), dict(nlink=1), False),
    # Not the same inode there (another made at another time), or none: counted.
    (dict(), dict(made=2), True), (dict(), None, True),
])
def test_a_shared_inode_counts_only_if_more_than_its_names_changed(now, before, changed):
    """What BtrfsStore.take_snapshot refuses with 'again:', and what it lets through."""
    items = now.pop("items", [OLD_EXTENT, OLD_XATTR])
    mine = _shared(*items, **now)
    theirs = None if before is None else _before(*before.pop("items", [OLD_EXTENT, OLD_XATTR]), **before)
    assert byteback.shared_inode_changed(mine, theirs) is changed


def test_a_shared_inode_remembers_its_items_across_buffers():
    """The tally is fed buffer by buffer: an inode's extents may come in the next one."""
    inode = (struct.pack("<QQQQQIIII", 3, 20, 7, 7, 0, 2, 0, 0, 0o100644) + bytes(104))
    tally = byteback.SubvolumeTally(10)
    tally.add(_record(20, 300, 1, inode), 1)
    tally.add(b"".join([_record(20, 300, 108, _extent(4, 1 << 20, 4096)), _record(20, 301, 1, _inode(20, 2)),
                        _record(20, 301, 108, _extent(20, 2 << 20, 4096))]), 3)
    (shared,) = tally.usage().shared
    assert not shared.written
    assert shared.items == _before((108, _extent(4, 1 << 20, 4096), 0), nlink=2).items
    assert shared.items != _before((108, _extent(4, 1 << 20, 4096), 0), (108, _extent(20, 2 << 20, 4096), 0)).items


# A full measure passes over the items of leaves written before `since` (the search
# header's transid is the leaf's generation): in such a leaf only sizes and linked names
# count, and a shared inode read just before it still takes its items into its digest.
# The same items in a leaf written since must give the same tally.
OLD_LEAF, NEW_LEAF, SINCE = 5, 20, 10
LEAVES = [
    (OLD_LEAF, 256, 1, _inode(4, 6, mode=0o040755), 0),          # a directory with a size: never counted
    (OLD_LEAF, 257, 1, _linked_inode(2, 4, 3), 0),               # a linked file, untouched: 3 names
    (OLD_LEAF, 258, 1, _inode(4, 100), 0),
    (OLD_LEAF, 258, 108, _extent(4, 5 << 20, 4096), 0),
    (NEW_LEAF, 300, 1, _linked_inode(3, 20, 2), 0),              # an old shared inode written (chmod) ...
    (OLD_LEAF, 300, 24, _name_item(4, b"user.rsync.%stat", b"100644 0,0 0:0"), 77),   # ... whose xattr
    (OLD_LEAF, 300, 108, _extent(4, 1 << 20, 4096), 0),          # and extents sit in old leaves
    (OLD_LEAF, 300, 108, _extent(4, 2 << 20, 4096), 4096),
    (NEW_LEAF, 301, 1, _inode(20, 50), 0),
    (NEW_LEAF, 301, 108, _extent(20, 3 << 20, 4096), 0),
    (OLD_LEAF, 302, 1, _linked_inode(2, 4, 2), 0),               # another linked file, after a new leaf
]


def _leaves(leaves, as_new=False):
    return [_record(NEW_LEAF if as_new else leaf, objectid, kind, item, offset)
            for leaf, objectid, kind, item, offset in leaves]


def _shared_view(usage):
    return [(s.inode, s.made, s.nlink, s.stat, s.items, s.written) for s in usage.shared]


def test_a_full_measure_passes_over_old_leaves_and_counts_the_same():
    skipping, _ = _tally(_leaves(LEAVES), since=SINCE)
    reading, _ = _tally(_leaves(LEAVES, as_new=True), since=SINCE)     # no leaf is old: every item read
    assert skipping.size == reading.size == 100 + 7 + 7 + 50 + 7        # regular files only
    assert skipping.linked == reading.linked == 3 + 2 + 2
    assert (skipping.data, skipping.metadata, skipping.generation) == (
        reading.data, reading.metadata, reading.generation)
    assert [s.inode for s in skipping.shared] == [300]
    assert _shared_view(skipping) == _shared_view(reading)
    assert skipping.shared[0].items == _before(*[(kind, item, offset) for _, objectid, kind, item, offset in LEAVES
                                                 if objectid == 300 and kind != 1]).items
    first, _ = _tally(_leaves(LEAVES), since=0)                         # nothing old: no leaf passed over
    assert (first.size, first.linked) == (skipping.size, skipping.linked)


def test_unshare_gives_every_name_of_a_shared_inode_its_own(tiny):
    """All names, the last one left on the old inode too: rsync may link the others back to it."""
    current = tiny.store.prepare_host("web1")
    (current / "a").write_bytes(b"shared\n")
    os.link(current / "a", current / "b")
    (current / "c").write_bytes(b"alone\n")
    assert tiny.store.unshare_current("web1") == 2
    # Not on btrfs: no reflink, so the names go and rsync sends them again.
    assert sorted(os.listdir(current)) == ["c"]


def _dir_inode(transid):
    return _inode(transid, 6, mode=0o040755)


def test_a_quiet_tally_lists_the_directories_a_run_wrote_and_nothing_else():
    tally = byteback.QuietTally(10)
    records = [_record(20, 256, 1, _dir_inode(20)), _record(20, 257, 1, _inode(5, 100)),   # file untouched
               _record(20, 258, 1, _dir_inode(9)), _record(20, 259, 1, _dir_inode(12))]
    last = tally.add(b"".join(records), len(records))
    assert tally.quiet and tally.directories == [256, 259] and last == (259, 1, 0)
    assert tally.usage().size == 100          # the tally it is counts as any does


def _made_inode(made, transid, size, mode=0o100644, nlink=1):
    return struct.pack("<QQQQQIIII", made, transid, size, size, 0, nlink, 0, 0, mode) + bytes(104)


def test_a_quiet_tally_lists_the_inodes_a_run_wrote():
    # rsync --inplace rewriting a file (its inode item and an extent written), a file made,
    # a symlink made, one left with no name: each listed; an inode not written is not.
    tally = byteback.QuietTally(10)
    records = [_record(20, 256, 1, _dir_inode(20)), _record(20, 300, 1, _made_inode(3, 20, 4096)),
               _record(20, 300, 108, _extent(20, 1 << 20, 4096)), _record(20, 301, 1, _made_inode(3, 20, 50, nlink=2)),
               _record(20, 302, 1, _made_inode(3, 5, 70)), _record(20, 303, 1, _made_inode(12, 20, 9)),
               _record(20, 304, 1, _inode(20, 0, mode=0o120777)), _record(20, 305, 1, _made_inode(3, 20, 1, nlink=0))]
    assert tally.add(b"".join(records), len(records)) == (305, 1, 0)
    assert tally.quiet and tally.directories == [256]
    assert tally.files == {300, 301, 303, 304, 305}
    assert tally.usage().data == 4096


def test_a_quiet_tally_stops_at_data_of_an_inode_it_did_not_see_written():
    tally = byteback.QuietTally(10)
    records = [_record(20, 256, 1, _dir_inode(20)), _record(20, 300, 108, _extent(20, 4096, 4096)),
               _record(20, 400, 1, _dir_inode(20))]
    assert tally.add(b"".join(records), len(records)) is None      # the search ends there
    assert not tally.quiet and tally.directories == [256]


@pytest.mark.parametrize("inode, n", [(_made_inode(3, 20, 10), 2), (_dir_inode(20), 2)], ids=["files", "directories"])
def test_a_quiet_tally_gives_up_past_its_limits(inode, n):
    tally = byteback.QuietTally(10, limit=n, file_limit=n)
    records = [_record(20, 300 + i, 1, inode) for i in range(n + 1)]
    assert tally.add(b"".join(records), len(records)) is None and not tally.quiet


def test_an_inode_counts_as_a_measure_counts_it():
    assert byteback.inode_counts((100, 1, 0o100644)) == (100, 0)
    assert byteback.inode_counts((100, 3, 0o100644)) == (100, 3)
    assert byteback.inode_counts((100, 0, 0o100644)) == (0, 0)          # open, unlinked
    assert byteback.inode_counts((7, 1, 0o120777)) == byteback.inode_counts(None) == (0, 0)




def test_a_directory_s_changed_names_are_those_one_side_has_and_the_other_has_not():
    before = {2: b"kept", 3: b"removed", 4: b"old item"}
    now = {2: b"kept", 4: b"new item", 5: b"added"}
    assert sorted(byteback.changed_names(now, before)) == [
        (False, b"old item"), (False, b"removed"), (True, b"added"), (True, b"new item")]
    assert list(byteback.changed_names(before, dict(before))) == []


def test_a_dir_item_says_what_it_names():
    item = struct.pack("<QBQQHHB", 300, 1, 0, 20, 0, 4, 1) + b"name"
    assert byteback.dir_entry(item) == (300, 1, 1)
    assert byteback.dir_entry(item[:20]) is None          # too short to be one


def test_a_directory_item_changed_in_its_access_time_alone_keeps_its_names():
    """QuietTally leaves out a directory whose inode item differs from the newest snapshot's
    in its access time (relatime's, at rsync's reading) and transid alone; any other field,
    the sequence that each name added, removed or renamed raises above all, keeps it."""
    import struct
    before = bytearray(byteback.INODE_ITEM_BYTES)
    struct.pack_into("<QQQQQIIIIQQQ", before, 0, 7, 40, 6, 0, 0, 1, 0, 0, 0o40755, 0, 0, 2)
    for at in (124, 136, 148):
        struct.pack_into("<QI", before, at, 1_796_346_201, 573_213_626)
    before = bytes(before)

    def changed(at: int, fmt: str, value) -> bytes:
        now = bytearray(before)
        struct.pack_into(fmt, now, at, value)
        return bytes(now)
    same = byteback.same_names_as_before
    assert same(before, before)
    assert same(changed(112, "<Q", 1_796_346_999), before)       # atime
    assert same(changed(8, "<Q", 41), before)                    # transid
    assert not same(changed(72, "<Q", 4), before)                # sequence: a name renamed
    assert not same(changed(16, "<Q", 8), before)                # size: a name added
    assert not same(changed(124, "<Q", 1_796_346_202), before)   # ctime
    assert not same(changed(136, "<I", 1), before)               # mtime
    assert not same(changed(0, "<Q", 8), before)                 # generation: another inode, same number
    assert not same(before, None)
    assert not same(before[:120], before[:120])                  # not a whole item


def _dir_item(made, transid, atime=0):
    """A directory's whole inode item (INODE_ITEM_BYTES) made in transaction `made`."""
    item = bytearray(_made_inode(made, transid, 6, mode=0o040755))
    struct.pack_into("<Q", item, 112, atime)
    return bytes(item)


def test_a_quiet_tally_asks_the_snapshot_only_of_directories_older_than_the_run():
    """A directory the run made (its generation since `since`) is in no snapshot: it is listed,
    its number not looked up (one tree search each); an older one whose item changed in its
    access time alone is left out."""
    asked = []
    snapshot = {256: _dir_item(3, 5), 257: _dir_item(3, 5)}

    def before(inode):
        asked.append(inode)
        return snapshot.get(inode)
    tally = byteback.QuietTally(10, before=before)
    records = [_record(20, 256, 1, _dir_item(3, 20, atime=99)),     # read by rsync: atime alone
               _record(20, 257, 1, _dir_item(12, 20)),              # made by this run, number reused
               _record(20, 258, 1, _dir_item(20, 20))]              # made by this run
    assert tally.add(b"".join(records), len(records)) == (258, 1, 0)
    assert tally.quiet and tally.directories == [257, 258]
    assert asked == [256]


def test_a_quiet_tally_compares_a_directory_item_only_as_long_as_its_record():
    """A directory item shorter than a whole one is never compared with the bytes that follow
    it in the search buffer (the next record), however those read: it is listed."""
    whole = _dir_item(3, 20, atime=99)
    short = _record(20, 256, 1, whole[:100])
    follows = _record(20, 300, 1, _made_inode(12, 20, 9))
    snapshot = whole[:100] + follows[:byteback.INODE_ITEM_BYTES - 100]   # what a 160-byte slice would read
    tally = byteback.QuietTally(10, before=lambda inode: snapshot if inode == 256 else None)
    assert tally.add(short + follows, 2) == (300, 1, 0)
    assert tally.quiet and tally.directories == [256] and tally.files == {300}


def _flagged_dir(flags):
    item = bytearray(_dir_item(3, 20))
    struct.pack_into("<Q", item, 64, flags)
    return bytes(item)


def test_a_tally_lists_the_directories_written_whose_access_time_is_still_written(monkeypatch):
    """Directories written since `since` whose inode flags lack BTRFS_INODE_NOATIME, and
    nothing else: not one not written since, not a file, not a directory that has it, not a
    short item; None past UNTIMED_LIMIT (keep_directories_timeless then walks)."""
    noatime = byteback.BTRFS_INODE_NOATIME

    def directory(transid, flags):
        item = bytearray(_dir_item(3, transid))
        struct.pack_into("<Q", item, 64, flags)
        return bytes(item)
    records = [_record(20, 256, 1, directory(20, 0)), _record(20, 257, 1, directory(20, noatime)),
               _record(20, 258, 1, directory(20, noatime >> 1 | noatime << 1)),     # other flags only
               _record(20, 259, 1, directory(5, 0)),                                # not written since
               _record(20, 260, 1, _made_inode(3, 20, 10)),                         # a file
               _record(20, 261, 1, directory(20, 0)[:100])]                         # not a whole item
    assert _tally(records, since=10)[0].untimed == (256, 258)
    monkeypatch.setattr(byteback, "UNTIMED_LIMIT", 2)
    assert _tally(records, since=10)[0].untimed == (256, 258)
    quiet = byteback.QuietTally(10)             # the snapshot's quiet measure lists the same
    quiet.add(b"".join(records), len(records))
    assert quiet.usage().untimed == (256, 258)
    monkeypatch.setattr(byteback, "UNTIMED_LIMIT", 1)
    assert _tally(records, since=10)[0].untimed is None
