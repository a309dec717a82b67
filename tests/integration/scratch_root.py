"""A scratch copy of this machine to change freely: overlayfs over /, in a private mount namespace.

The test machine's own root filesystem is the read-only lower layer; every
change (a package purged or installed with the real dpkg and apt-get, files a
backup writes) lands in a temporary upper directory, and is gone with it.  So
a test can uninstall rsync, or install the built .deb, with the real tools,
and leave the machine as it was.  Needs root, unshare(1) and overlayfs.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, Optional

# Mounted inside the new namespace before chroot: the overlay, then the kernel
# filesystems the tools need.  A policy-rc.d that says no keeps any package's
# maintainer scripts from starting a service (the usual rule for a chroot).
_ENTER = r'''
set -e
root="$1"; shift
mount -t overlay overlay -o "lowerdir=/,upperdir=$BB_UPPER,workdir=$BB_WORK" "$root"
mount --rbind /dev "$root/dev"
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys" 2>/dev/null || true
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"
exec chroot "$root" "$@"
'''


def skip_reason() -> Optional[str]:
    """Why this machine cannot make a scratch root, or None."""
    if os.geteuid() != 0:
        return "needs root: mounts an overlay of / in a private mount namespace"
    if shutil.which("unshare") is None or shutil.which("chroot") is None:
        return "needs unshare and chroot (util-linux, coreutils)"
    if "overlay" not in Path("/proc/filesystems").read_text():
        try:
            subprocess.run(["modprobe", "overlay"], check=False, capture_output=True)
        except OSError:
            pass
        if "overlay" not in Path("/proc/filesystems").read_text():
            return "needs overlayfs in the kernel (modprobe overlay)"
    return None


def overlay_base(prefix: str) -> Path:
    """A fresh directory that can hold an overlay's upper and work directories.

    An overlayfs cannot be an upper layer itself: where /tmp is on one (a
    container's root), a tmpfs is mounted on the directory; remove_base undoes it.
    """
    base = Path(tempfile.mkdtemp(prefix=prefix))
    fstype = subprocess.run(["stat", "-f", "-c", "%T", str(base)], stdout=subprocess.PIPE,
                            universal_newlines=True, check=True).stdout.strip()
    if fstype == "overlayfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4G,mode=0755", "tmpfs", str(base)], check=True)
    return base


def remove_base(base: Path) -> None:
    if os.path.ismount(base):
        subprocess.run(["umount", "-l", str(base)], check=False)
    shutil.rmtree(base, ignore_errors=True)


class ScratchRoot:
    """Run commands as root in a throw-away copy-on-write view of this machine."""

    def __init__(self) -> None:
        self.base = overlay_base("byteback-scratch-root.")
        for name in ("upper", "work", "merged"):
            (self.base / name).mkdir()

    def run(self, script: str, *, env: Optional[Dict[str, str]] = None, timeout: float = 600,
            stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
        """Run a bash script inside the scratch root (as root, no terminal); capture its output."""
        clean = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                 "LC_ALL": "C.UTF-8", "HOME": "/root", **(env or {})}
        outer = dict(clean, BB_UPPER=str(self.base / "upper"), BB_WORK=str(self.base / "work"))
        return subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "bash", "-c", _ENTER, "enter",
             str(self.base / "merged"), "env", "-i", *(f"{k}={v}" for k, v in clean.items()),
             "bash", "-c", script],
            env=outer, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            universal_newlines=True, timeout=timeout)

    def path(self, inside: str) -> Path:
        """Where a file the scratch root changed is kept (the upper layer)."""
        return self.base / "upper" / inside.lstrip("/")

    def remove(self) -> None:
        remove_base(self.base)
