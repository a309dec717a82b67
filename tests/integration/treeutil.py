"""Make awkward file trees and compare two of them exactly (for backup tests).

``generate_tree(root)`` builds what a real machine holds and a backup tool
gets wrong: files of many sizes, deep and empty directories, symlinks
(relative, absolute, dangling, to directories, with odd targets), hard-link
groups, odd names (spaces, a newline, a tab, non-UTF-8 bytes, wildcards, a
leading dash, a 255-byte name), odd modes (0600, 0750, 0444, 0000, sticky),
owners (as root), a FIFO, ``user.*`` xattrs, and mtimes with nanoseconds
(old, pre-2038 and post-2038 ones too).

``scan(root)`` records every entry below root; ``diff(expected, actual)``
lists every difference as one readable line (content, type and mode, owner,
mtime, symlink target, xattrs, hard-link group); ``assert_same`` fails with
that list.  ``change_tree`` makes the small changes of a day's work.

Paths are bytes throughout, so names that are not UTF-8 survive untouched.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import os
import random
import stat
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

PathLike = Union[str, bytes, Path]

IS_ROOT = os.geteuid() == 0
# Owners handed out as root: root, a daemon, ordinary users, nobody.
UIDS = (0, 1, 1000, 1234, 65534)
GIDS = (0, 4, 1000, 4321, 65534)
NOBODY = 65534
# Nanosecond-precise mtimes, mostly 2020-2023, plus one in 1980 and one after 2038.
BASE_MTIME_NS = 1_600_000_000 * 10 ** 9
SPECIAL_MTIMES_NS = (315_532_800 * 10 ** 9 + 1,              # 1980-01-01, plus 1 ns
                     (2 ** 31 + 86_400) * 10 ** 9 + 999_999_999)  # 2038-01-20
# The fake-super xattr rsync uses to keep owner and mode without root.
FAKE_SUPER_XATTR = b"user.rsync.%stat"


def _b(path: PathLike) -> bytes:
    return os.fsencode(path)


def show(path: bytes) -> str:
    """A path as one unambiguous printable word (newlines and bad bytes escaped)."""
    return repr(path)[1:]


# === Generating ===============================================================

class TreeInfo(NamedTuple):
    """What generate_tree made, for tests that want to poke at particular entries."""
    root: bytes
    files: List[bytes]          # regular files, relative to root
    hardlink_groups: List[List[bytes]]
    total_bytes: int


def _write(path: bytes, size: int, rng: random.Random) -> None:
    # Fresh random bytes, never a repeated block, which a filesystem or rsync's
    # delta could store or send cheaply; urandom is fast enough for tens of MB.
    # (rng is taken so every writer looks alike; contents need no seed.)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            chunk = min(left, 1 << 20)
            f.write(os.urandom(chunk))
            left -= chunk


def _setxattr(path: bytes, name: bytes, value: bytes) -> bool:
    """Set a user xattr; False where the filesystem does not support them."""
    try:
        os.setxattr(path, name, value, follow_symlinks=False)
        return True
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
        raise


def generate_tree(root: PathLike, *, seed: int = 0, small_files: int = 200,
                  big_files: Sequence[int] = (1 << 20, 300_001), owners: Optional[bool] = None,
                  odd: bool = True) -> TreeInfo:
    """Fill root (created if missing) with an awkward tree.

    Names, sizes, modes, owners and mtimes are the same for the same seed;
    contents are random bytes (os.urandom), so nothing compresses or dedupes.

    small_files: how many small files to scatter over the directories.
    big_files:   sizes of a few larger files.
    owners:      chown entries to various uids/gids (default: when root).
    odd:         include the odd names, modes, symlinks, FIFO and hard links.
    """
    owners = IS_ROOT if owners is None else owners
    rng = random.Random(seed)
    root = _b(root)
    os.makedirs(root, exist_ok=True)
    j = os.path.join

    dirs = [b"docs", b"docs/deep/er/still/deeper", b"docs/empty", b"data", b"hard"]
    if odd:
        dirs += [b"with space", b"new\nline dir", b"\xff\xfe bytes \xe9 dir", b"ro-dir",
                 b"private", b"sticky", b"group-only"]
    for d in dirs:
        os.makedirs(j(root, d), exist_ok=True)

    files: List[bytes] = []
    sizes = [0, 1, 17, 511, 4095, 4096, 4097, 65536, 100_003]
    fill_dirs = [d for d in dirs if d not in (b"docs/empty", b"ro-dir")] + [b""]
    for n in range(small_files):
        d = fill_dirs[n % len(fill_dirs)]
        size = sizes[n % len(sizes)] if n < len(sizes) else rng.choice((0, 10, 300, 2000, 9000))
        name = j(d, b"f%04d.txt" % n) if d else b"f%04d.txt" % n
        _write(j(root, name), size, rng)
        files.append(name)
    for n, size in enumerate(big_files):
        name = b"data/big-%02d.bin" % n
        _write(j(root, name), size, rng)
        files.append(name)

    groups: List[List[bytes]] = []
    xattr_ok = True
    if odd:
        odd_names = [b"file with spaces.txt", b"new\nline", b"tab\there", b"\xff\xfe\xfd-not-utf8",
                     b"caf\xc3\xa9 \xe2\x9c\x93 utf8", b"-starts-with-dash", b"star*quest?[brack]",
                     b"back\\slash", b" leading space", b"trailing space ", b".hidden",
                     b"..dots..", b"L" * 251 + b".txt", b"with space/inner\nnewline \xff",
                     b"new\nline dir/plain", b"\xff\xfe bytes \xe9 dir/x", b"ro-dir/inside",
                     b"private/secret", b"sticky/shared", b"group-only/g"]
        for name in odd_names:
            _write(j(root, name), rng.randrange(0, 3000), rng)
        files += odd_names
        # Hard-link groups, across directories, one of them read-only.
        _write(j(root, b"hard/one"), 5000, rng)
        os.link(j(root, b"hard/one"), j(root, b"hard/two"))
        os.link(j(root, b"hard/one"), j(root, b"docs/hard-three"))
        _write(j(root, b"hard/x"), 123, rng)
        os.link(j(root, b"hard/x"), j(root, b"with space/hard x \xff"))
        groups = [[b"docs/hard-three", b"hard/one", b"hard/two"], [b"hard/x", b"with space/hard x \xff"]]
        files += [n for g in groups for n in g]
        # Symlinks: relative, up and out, absolute, dangling, to a directory, odd targets.
        links = {b"link-rel": b"docs/f0000.txt", b"docs/deep/link-up": b"../../with space",
                 b"link-abs": b"/etc/hostname", b"link-dangling": b"does/not/exist",
                 b"link-dir": b"docs", b"link-odd": b"\xff\xfe\xfd-not-utf8",
                 b"link-newline": b"new\nline", b"docs/link-self": b"link-self",
                 b"link-long": b"x/" * 400}
        for name, target in links.items():
            os.symlink(target, j(root, name))
        os.mkfifo(j(root, b"fifo"), 0o640)
        # xattrs: text, binary with NUL, empty, large; on files, a directory, the root.
        xattrs = {b"docs/f0000.txt": {b"user.comment": b"hello"},
                  b"new\nline": {b"user.bin": b"\x00\x01\xff", b"user.empty": b""},
                  b"hard/one": {b"user.group": b"shared by three names"},
                  b"data/big-00.bin" if big_files else files[-1]:
                      {b"user.large": bytes(range(256)) * 8},
                  b"docs": {b"user.dir": b"on a directory"},
                  b"": {b"user.root": b"on the root"}}
        for name, attrs in xattrs.items():
            for key, value in attrs.items():
                xattr_ok = _setxattr(j(root, name) if name else root, key, value) and xattr_ok

    # Owners (as root), then modes (chown clears set-id bits), then mtimes.
    if owners:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = j(dirpath, name)
                os.chown(path, rng.choice(UIDS), rng.choice(GIDS), follow_symlinks=False)
        if odd:
            os.chown(j(root, b"hard/one"), NOBODY, NOBODY)
    if odd:
        modes = {b"file with spaces.txt": 0o600, b"new\nline": 0o750, b"tab\there": 0o444,
                 b"-starts-with-dash": 0o640, b"star*quest?[brack]": 0o400,
                 b"back\\slash": 0o755, b"hard/one": 0o444, b"private/secret": 0o600,
                 b"ro-dir/inside": 0o444, b"group-only/g": 0o040 if IS_ROOT else 0o640,
                 b"caf\xc3\xa9 \xe2\x9c\x93 utf8": 0o000 if IS_ROOT else 0o400,
                 b"private": 0o700, b"sticky": 0o1777, b"group-only": 0o750,
                 b"docs/deep": 0o711, b"with space": 0o2755, b"ro-dir": 0o555}
        for name, mode in modes.items():
            os.chmod(j(root, name), mode)
    set_mtimes(root, rng)
    total = sum(os.lstat(j(root, f)).st_size for f in set(files))
    info = TreeInfo(root, files, groups, total)
    if odd and not xattr_ok:
        raise OSError(errno.ENOTSUP, f"user xattrs are not supported below {root!r}")
    return info


def set_mtimes(root: bytes, rng: random.Random) -> None:
    """Give every entry (symlinks too, the root last) a distinct nanosecond mtime."""
    special = list(SPECIAL_MTIMES_NS)
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            path = os.path.join(dirpath, name)
            ns = special.pop() if special and not os.path.islink(path) and name.endswith(b".txt") \
                else BASE_MTIME_NS + rng.randrange(0, 10 ** 17)
            os.utime(path, ns=(ns, ns), follow_symlinks=False)
    ns = BASE_MTIME_NS + rng.randrange(0, 10 ** 17)
    os.utime(root, ns=(ns, ns))


def add_big_files(root: PathLike, count: int, size: int, subdir: bytes = b"bulk") -> int:
    """Add count files of size random bytes under root/subdir; return the bytes added."""
    started_ns = time.time_ns()
    d = os.path.join(_b(root), subdir)
    os.makedirs(d, exist_ok=True)
    rng = random.Random(count)
    for n in range(count):
        _write(os.path.join(d, b"bulk-%03d.bin" % n), size, rng)
    _age_recent_mtimes(_b(root), started_ns, rng)
    return count * size


def _writable(path: bytes) -> bool:
    return os.access(path, os.W_OK) and os.access(os.path.dirname(path) or b".", os.W_OK)


def _bump_mtime(path: bytes, seconds: int = 3600) -> None:
    st = os.lstat(path)
    ns = st.st_mtime_ns + seconds * 10 ** 9 + 7
    os.utime(path, ns=(ns, ns), follow_symlinks=False)


# Files change_tree changes by name (the random picks must leave them alone).
_USED_BY_NAME = {b"docs/f0000.txt", b"docs/f0001.txt"}


def change_tree(root: PathLike, *, seed: int = 1, fraction: float = 0.01,
                break_hardlink: bool = False) -> List[str]:
    """Make the small changes of a day's work to a tree from generate_tree; return what changed.

    About `fraction` of the regular files get new content (some at the same
    size with only the mtime telling), plus one of each other kind of change:
    append, delete a file and a directory, add files, chmod, chown (root),
    xattr changed, symlink retargeted, rename, file turned into a directory,
    a new hard link, content changed through a hard link (every name sees it).
    break_hardlink also replaces one name of a hard-link group by a separate
    file with other content (the others keep the old content).
    """
    rng = random.Random(seed)
    root = _b(root)
    j = os.path.join
    changes: List[str] = []
    started_ns = time.time_ns()
    regular = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            path = j(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and _writable(path) \
                    and b"big-" not in name and b"/docs/deep/er/" not in path \
                    and os.path.relpath(path, root) not in _USED_BY_NAME:
                regular.append(path)
    regular.sort()
    count = max(3, int(len(regular) * fraction))
    picked = rng.sample(regular, count + 8)
    chosen, spare = picked[:count], picked[count:]
    for path in chosen:
        size = os.lstat(path).st_size
        _write(path, size if size else 10, rng)           # same size: only mtime tells
        _bump_mtime(path)
        changes.append(f"rewrote {show(os.path.relpath(path, root))}")

    def rel(p: bytes) -> str:
        return show(os.path.relpath(p, root))

    p = spare.pop()
    with open(p, "ab") as f:
        f.write(b"appended\n")
    changes.append(f"appended to {rel(p)}")
    p = spare.pop()
    os.unlink(p)
    changes.append(f"deleted {rel(p)}")
    d = j(root, b"docs/deep/er/still")
    for dirpath, dirnames, filenames in os.walk(d, topdown=False):
        for name in filenames:
            os.unlink(j(dirpath, name))
        for name in dirnames:
            os.rmdir(j(dirpath, name))
    os.rmdir(d)
    changes.append(f"deleted directory {rel(d)}")
    newdir = j(root, b"new dir \xe9")
    os.mkdir(newdir, 0o750)
    for name in (b"added one", b"added\nnewline two"):
        _write(j(newdir, name), rng.randrange(1, 5000), rng)
    changes.append(f"added {rel(newdir)} with 2 files")
    p = spare.pop()
    os.chmod(p, 0o604)
    changes.append(f"chmod 0604 {rel(p)}")
    if IS_ROOT:
        p = spare.pop()
        st = os.lstat(p)
        os.chown(p, st.st_uid + 7, st.st_gid + 11)
        changes.append(f"chown {rel(p)}")
    p = spare.pop()
    _setxattr(p, b"user.changed", b"new attribute")
    changes.append(f"added an xattr to {rel(p)}")
    p = j(root, b"link-rel")
    os.unlink(p)
    os.symlink(b"docs/f0001.txt", p)
    changes.append(f"retargeted {rel(p)}")
    src, dst = spare.pop(), j(root, b"renamed \xe9.txt")
    os.rename(src, dst)
    changes.append(f"renamed {rel(src)} to {rel(dst)}")
    p = spare.pop()
    os.unlink(p)
    os.mkdir(p)
    _write(j(p, b"now a dir"), 100, rng)
    changes.append(f"turned {rel(p)} into a directory")
    os.link(j(root, b"docs/f0000.txt"), j(root, b"data/new hard link"))
    changes.append("hard-linked docs/f0000.txt as data/new hard link")
    # Content changed in place through a hard link: every name sees the new data.
    p = j(root, b"hard/x")
    with open(p, "r+b") as f:
        f.write(os.urandom(50))
    _bump_mtime(p)
    changes.append("rewrote hard/x in place (all its names change)")
    if break_hardlink:
        p = j(root, b"hard/two")
        tmp = p + b".tmp"
        _write(tmp, 7777, rng)
        st = os.lstat(j(root, b"hard/one"))
        os.utime(tmp, ns=(st.st_mtime_ns + 10 ** 9, st.st_mtime_ns + 10 ** 9))
        os.replace(tmp, p)
        changes.append("replaced hard/two by a separate file (hard/one, docs/hard-three keep theirs)")
    _age_recent_mtimes(root, started_ns, rng)
    return changes


def _age_recent_mtimes(root: bytes, since_ns: int, rng: random.Random) -> None:
    """Move mtimes set by the changes (directories, new entries) a day into the past.

    rsync leaves an mtime alone when it is already in the same second as the
    source's (it compares nanoseconds only across seconds), so a backup taken
    within a second of a change would differ from the source by nanoseconds.
    That is rsync's rule, not byteback's business: keep changes out of "now".
    """
    day_ago = since_ns - 86_400 * 10 ** 9
    paths = []
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        paths += [os.path.join(dirpath, n) for n in filenames + dirnames]
    for path in paths + [root]:
        if os.lstat(path).st_mtime_ns >= since_ns - 2 * 10 ** 9:
            ns = day_ago + rng.randrange(0, 10 ** 12)
            os.utime(path, ns=(ns, ns), follow_symlinks=False)


# === Scanning and comparing ====================================================

class Entry(NamedTuple):
    """Everything about one entry that a backup must keep."""
    kind: str                   # file, dir, symlink, fifo, socket, char, block
    mode: int                   # permission bits incl. set-id and sticky (no type)
    uid: int
    gid: int
    mtime_ns: int
    size: Optional[int]         # regular files only
    sha256: Optional[str]       # regular files only
    target: Optional[bytes]     # symlinks only
    xattrs: Tuple[Tuple[bytes, bytes], ...]   # user.* only, sorted
    links: Tuple[bytes, ...]    # other names of the same inode inside the tree


Manifest = Dict[bytes, Entry]

_KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
          stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket", stat.S_IFCHR: "char",
          stat.S_IFBLK: "block"}


def _hash(path: bytes) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY)
    with os.fdopen(fd, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read(path: bytes) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _xattrs(path: bytes) -> Dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            return {}
        raise
    out = {}
    for name in names:
        if name.startswith("user."):
            out[name.encode()] = os.getxattr(path, name, follow_symlinks=False)
    return out


def scan(root: PathLike, *, fake_super: bool = False) -> Manifest:
    """Every entry below root (root itself as b'.'), keyed by its path relative to root.

    fake_super: the tree was written by rsync --fake-super (not root), so take
    type, mode and owner from the user.rsync.%stat xattr where one is present
    (a symlink is then a file holding its target, a FIFO an empty file).
    """
    root = _b(root)
    raw = {}
    inodes: Dict[Tuple[int, int], List[bytes]] = {}
    paths = [b"."]
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for name in dirnames + filenames:
            paths.append(os.path.normpath(os.path.join(rel_dir, name)))
    for rel in paths:
        path = os.path.join(root, rel) if rel != b"." else root
        st = os.lstat(path)
        mode, uid, gid = st.st_mode, st.st_uid, st.st_gid
        xattrs = _xattrs(path)
        if fake_super:
            fake = xattrs.pop(FAKE_SUPER_XATTR, None)
            if fake is not None:           # "100644 0,0 1234:4321": mode rdev uid:gid
                fmode, _rdev, owner = fake.decode().split()
                mode = int(fmode, 8)
                uid, gid = (int(x) for x in owner.split(":"))
            for name in [n for n in xattrs if n.startswith(b"user.rsync.")]:
                del xattrs[name]
        kind = _KINDS.get(stat.S_IFMT(mode), "unknown")
        real_reg = stat.S_ISREG(st.st_mode)
        if real_reg and kind == "file" and st.st_nlink > 1:
            inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
        raw[rel] = dict(
            kind=kind, mode=stat.S_IMODE(mode), uid=uid, gid=gid, mtime_ns=st.st_mtime_ns,
            size=st.st_size if kind == "file" else None,
            sha256=_hash(path) if kind == "file" and real_reg else None,
            target=(os.readlink(path) if stat.S_ISLNK(st.st_mode) else
                    _read(path) if kind == "symlink" and real_reg else None),  # fake-super
            xattrs=tuple(sorted(xattrs.items())), links=())
    for names in inodes.values():
        if len(names) > 1:
            for rel in names:
                raw[rel]["links"] = tuple(sorted(n for n in names if n != rel))
    return {rel: Entry(**fields) for rel, fields in raw.items()}


def _fmt(field: str, value) -> str:
    if field == "mode":
        return f"{value:04o}"
    if field == "mtime_ns":
        secs, ns = divmod(value, 10 ** 9)
        try:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(secs))
        except (OverflowError, OSError, ValueError):
            when = "?"
        return f"{value} ({when}.{ns:09d} UTC)"
    if field == "sha256" and value:
        return value[:16] + "…"
    if field == "links":
        return "[" + ", ".join(show(v) for v in value) + "]"
    if field == "target" and value is not None:
        return show(value)
    if field == "xattrs":
        return "{" + ", ".join(f"{show(k)}: {show(v)}" for k, v in value) + "}"
    return repr(value)


def diff(expected: Manifest, actual: Manifest, *, check_owner: bool = True,
         check_symlink_owner: bool = True, limit: int = 60) -> List[str]:
    """One readable line per difference between two manifests (empty when equal)."""
    lines = []
    for rel in sorted(set(expected) | set(actual)):
        e, a = expected.get(rel), actual.get(rel)
        if a is None:
            lines.append(f"{show(rel)}: missing (a {e.kind} in the expected tree)")
            continue
        if e is None:
            lines.append(f"{show(rel)}: unexpected {a.kind}")
            continue
        for field in Entry._fields:
            if field in ("uid", "gid") and (not check_owner or
                                            (e.kind == "symlink" and not check_symlink_owner)):
                continue
            if field == "mode" and e.kind == "symlink":
                continue                    # Linux ignores a symlink's mode
            ev, av = getattr(e, field), getattr(a, field)
            if ev != av:
                lines.append(f"{show(rel)}: {field} expected {_fmt(field, ev)}, got {_fmt(field, av)}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more differences"]
    return lines


def assert_same(expected: Manifest, actual: Manifest, what: str = "tree", **kwargs) -> None:
    """Fail with a readable list of differences unless the manifests match."""
    problems = diff(expected, actual, **kwargs)
    assert not problems, f"{what} differs from what was expected ({len(problems)} lines):\n  " + \
        "\n  ".join(problems)


def summary(manifest: Manifest) -> Dict[str, int]:
    """Counts that show a generated tree really has what it should (a test's sanity check)."""
    kinds: Dict[str, int] = {}
    for entry in manifest.values():
        kinds[entry.kind] = kinds.get(entry.kind, 0) + 1

    def bad_utf8(p: bytes) -> bool:
        try:
            p.decode("utf-8")
            return False
        except UnicodeDecodeError:
            return True
    kinds["non_utf8_names"] = sum(1 for p in manifest if bad_utf8(p))
    kinds["newline_names"] = sum(1 for p in manifest if b"\n" in p)
    kinds["hard_linked"] = sum(1 for e in manifest.values() if e.links)
    kinds["with_xattrs"] = sum(1 for e in manifest.values() if e.xattrs)
    kinds["dangling_symlinks"] = sum(1 for p, e in manifest.items() if e.kind == "symlink"
                                     and e.target == b"does/not/exist")
    kinds["owners"] = len({(e.uid, e.gid) for e in manifest.values()})
    kinds["modes"] = len({e.mode for e in manifest.values() if e.kind != "symlink"})
    kinds["bytes"] = sum(e.size or 0 for e in manifest.values())
    return kinds


def snapshot_time(name: str) -> dt.datetime:
    """The moment a snapshot's name gives (minutes or seconds, with its offset)."""
    for fmt in ("%Y-%m-%dT%H:%M%z", "%Y-%m-%dT%H:%M:%S%z"):
        with contextlib.suppress(ValueError):
            return dt.datetime.strptime(name, fmt)
    raise AssertionError(f"{name!r} is not a snapshot name")


def wait_out_second(names: Sequence[str]) -> None:
    """Wait until the clock is past the second of the newest of these snapshot names: names
    carry seconds at most, and a backup can take less than one, so a second backup at once
    would need a name that exists and the server would refuse it."""
    if names:
        newest = max(map(snapshot_time, names))
        while dt.datetime.now(dt.timezone.utc).replace(microsecond=0) <= newest:
            time.sleep(0.05)
