"""build.sh makes a byte-identical zipapp (STYLE.md #18), tested as shiv does:
build twice from copies with different mtimes, modes, umask and file order."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD_SH = REPO / "build.sh"
SHEBANG = b"#!/usr/bin/env -S python3 -I -S\n"
# What the zipapp's __main__ calls last; a stand-in byteback.py needs it too.
END = "def end_process(code):\n    raise SystemExit(code)\n"
MAIN_PY = b"import byteback\nbyteback.end_process(byteback.main())\n"


def _build(src: Path, out: Path, *, umask: int, epoch: str | None = None) -> Path:
    """Run the real build.sh on tree `src`, writing out/byteback.pyz under `umask`."""
    env = dict(os.environ, BYTEBACK_SRC_DIR=str(src), BYTEBACK_OUT_DIR=str(out))
    env.pop("SOURCE_DATE_EPOCH", None)
    if epoch is not None:
        env["SOURCE_DATE_EPOCH"] = epoch
    subprocess.run(["bash", "-c", 'umask "$1" && exec "$0"', str(BUILD_SH), "%04o" % umask],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    return out / "byteback.pyz"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _vary(tree: Path, mtime: int, mode: int) -> None:
    """Give every file and directory in `tree` this mtime and file mode."""
    for path in sorted(tree.rglob("*"), reverse=True):
        if path.is_file():
            path.chmod(mode)
        os.utime(path, (mtime, mtime))


def _synthetic_tree(root: Path, reverse: bool) -> Path:
    """A small stand-in tree, files created in either order (readdir order differs)."""
    files = {
        "byteback.py": END + "def main():\n    print('hello from pyz')\n    return 3\n",
        "simulate/__init__.py": "",
        "simulate/engine.py": "import byteback\n",
        "simulate/report.py": "X = 1\n",
        "simulate/sub/__init__.py": "",
        "simulate/sub/deep.py": "Y = 2\n",
        "simulate/notes.txt": "not python: left out\n",
        "simulate/__pycache__/engine.cpython-311.pyc": "junk",
        "simulate/sub/__pycache__/deep.cpython-38.pyc": "junk",
        "__pycache__/byteback.cpython-311.pyc": "junk",
        "unrelated.py": "left out\n",
    }
    for name in sorted(files, reverse=reverse):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(files[name])
    return root


def test_synthetic_tree_builds_identically(tmp_path):
    a = _synthetic_tree(tmp_path / "a", reverse=False)
    b = _synthetic_tree(tmp_path / "b", reverse=True)
    _vary(a, 1_000_000_000, 0o600)
    _vary(b, 1_700_000_000, 0o755)
    pyz_a = _build(a, tmp_path / "out_a", umask=0o022)
    pyz_b = _build(b, tmp_path / "out_b", umask=0o077)
    assert _sha256(pyz_a) == _sha256(pyz_b)

    data = pyz_a.read_bytes()
    assert data.startswith(SHEBANG)
    assert pyz_a.stat().st_mode & 0o777 == 0o755
    assert pyz_b.stat().st_mode & 0o777 == 0o755
    with zipfile.ZipFile(pyz_a) as zf:
        names = zf.namelist()
        assert names == ["__main__.py", "byteback.py", "byteback.pyc",
                         "simulate/__init__.py", "simulate/__init__.pyc",
                         "simulate/engine.py", "simulate/engine.pyc",
                         "simulate/report.py", "simulate/report.pyc",
                         "simulate/sub/__init__.py", "simulate/sub/__init__.pyc",
                         "simulate/sub/deep.py", "simulate/sub/deep.pyc"]
        assert zf.read("__main__.py") == MAIN_PY
        for info in zf.infolist():
            assert info.date_time == (1980, 1, 1, 0, 0, 0)
            assert info.external_attr == 0o644 << 16
            assert info.compress_type == zipfile.ZIP_STORED
    # No temporary file left beside the result.
    assert sorted(p.name for p in (tmp_path / "out_a").iterdir()) == ["byteback.pyz"]


def test_built_pyz_runs_main_and_returns_its_code(tmp_path):
    pyz = _build(_synthetic_tree(tmp_path / "src", reverse=False), tmp_path / "out", umask=0o022)
    result = subprocess.run([sys.executable, str(pyz)], capture_output=True, text=True)
    assert (result.returncode, result.stdout) == (3, "hello from pyz\n")


def test_source_date_epoch_sets_every_timestamp(tmp_path):
    src = _synthetic_tree(tmp_path / "src", reverse=False)
    pyz = _build(src, tmp_path / "out", umask=0o022, epoch="1767225600")  # 2026-01-01 UTC
    with zipfile.ZipFile(pyz) as zf:
        assert {i.date_time for i in zf.infolist()} == {(2026, 1, 1, 0, 0, 0)}


def test_tree_without_simulate_builds(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "byteback.py").write_text(END + "def main():\n    return 0\n")
    pyz = _build(tmp_path / "src", tmp_path / "out", umask=0o022)
    with zipfile.ZipFile(pyz) as zf:
        assert zf.namelist() == ["__main__.py", "byteback.py", "byteback.pyc"]


def test_unknown_argument_prints_usage_and_exits_2():
    result = subprocess.run([str(BUILD_SH), "--frobnicate"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "usage:" in result.stderr


@pytest.mark.skipif(not (REPO / "byteback.py").exists(),
                    reason="byteback.py does not exist yet: nothing real to build")
def test_real_tree_builds_identically(tmp_path):
    copies = []
    for name, mtime, mode in (("a", 1_000_000_000, 0o600), ("b", 1_700_000_000, 0o755)):
        tree = tmp_path / name
        tree.mkdir()
        shutil.copy(REPO / "byteback.py", tree / "byteback.py")
        if (REPO / "simulate").is_dir():
            shutil.copytree(REPO / "simulate", tree / "simulate",
                            ignore=shutil.ignore_patterns("__pycache__"))
        _vary(tree, mtime, mode)
        copies.append(tree)
    pyz_a = _build(copies[0], tmp_path / "out_a", umask=0o022)
    pyz_b = _build(copies[1], tmp_path / "out_b", umask=0o077)
    assert _sha256(pyz_a) == _sha256(pyz_b)
    assert pyz_a.read_bytes().startswith(SHEBANG)
    with zipfile.ZipFile(pyz_a) as zf:
        names = zf.namelist()
        assert names == sorted(names)
        assert names[:3] == ["__main__.py", "byteback.py", "byteback.pyc"]
        assert not any("__pycache__" in n for n in names)
        simulate = REPO / "simulate"
        py_files = simulate.rglob("*.py") if simulate.is_dir() else []
        expected_simulate = sorted(p.relative_to(REPO).as_posix() + suffix for p in py_files
                                   if "__pycache__" not in p.parts for suffix in ("", "c"))
        assert names[3:] == expected_simulate


# --- bytecode: used by the Python that built it, skipped by any other --------

WHO_RUNS = END + "def main():\n    print(__spec__.origin.rsplit('/', 1)[-1])\n    return 0\n"


def _runs_from(python: str, pyz: Path) -> str:
    """Which entry of the archive `python` ran byteback from: byteback.pyc or byteback.py."""
    result = subprocess.run([python, str(pyz)], capture_output=True, text=True, check=True)
    return result.stdout.strip()


def _build_with(python: str, src: Path, out: Path) -> Path:
    env = dict(os.environ, BYTEBACK_SRC_DIR=str(src), BYTEBACK_OUT_DIR=str(out), PYTHON=python)
    subprocess.run([str(BUILD_SH)], env=env, check=True, stdout=subprocess.DEVNULL)
    return out / "byteback.pyz"


def _who_runs_tree(root: Path) -> Path:
    root.mkdir()
    (root / "byteback.py").write_text(WHO_RUNS)
    return root


def test_bytecode_is_unchecked_hash_based_of_this_source(tmp_path):
    import importlib.util
    pyz = _build_with(sys.executable, _who_runs_tree(tmp_path / "src"), tmp_path / "out")
    with zipfile.ZipFile(pyz) as zf:
        pyc, source = zf.read("byteback.pyc"), zf.read("byteback.py")
    assert pyc[:4] == importlib.util.MAGIC_NUMBER
    assert int.from_bytes(pyc[4:8], "little") == 0b01         # hash-based, unchecked
    assert pyc[8:16] == importlib.util.source_hash(source)
    assert _runs_from(sys.executable, pyz) == "byteback.pyc"


def test_bytecode_of_another_python_falls_back_to_the_source(tmp_path):
    """What another Python version sees: a magic number that is not its own."""
    pyz = _build_with(sys.executable, _who_runs_tree(tmp_path / "src"), tmp_path / "out")
    data = pyz.read_bytes()
    with zipfile.ZipFile(pyz) as zf:
        magic = zf.read("byteback.pyc")[:4]
    assert data.count(magic) == 1
    foreign = bytes([magic[0] ^ 0xFF]) + magic[1:]
    pyz.write_bytes(data.replace(magic, foreign))
    assert _runs_from(sys.executable, pyz) == "byteback.py"


def _other_python() -> str:
    """An installed interpreter of another minor version than this one, or ''."""
    import glob
    mine = "%d.%d" % sys.version_info[:2]
    for minor in ("3.8", "3.9", "3.10", "3.11", "3.12", "3.13"):
        # As build.sh looks for 3.8: pyenv's interpreters, then PATH (whose
        # pyenv shims exist even where they cannot run, hence the trial run).
        found = sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{minor}.*/bin/python3")))
        for path in found + [shutil.which("python" + minor) or ""]:
            if minor != mine and path and subprocess.run(
                    [path, "-c", "import sys; assert sys.version_info[:2] == (%s)" % minor.replace(".", ", ")],
                    capture_output=True).returncode == 0:
                return path
    return ""


@pytest.mark.skipif(not _other_python(), reason="no Python of another minor version installed "
                    "(build.sh test uses 3.8 where there is one)")
def test_a_zipapp_built_by_one_python_runs_on_another(tmp_path):
    pyz = _build_with(sys.executable, _who_runs_tree(tmp_path / "src"), tmp_path / "out")
    assert _runs_from(_other_python(), pyz) == "byteback.py"


def test_bytecode_is_reproducible_whatever_the_hash_seed(tmp_path):
    """Before Python 3.10 a set constant's bytecode lists its members in hash order
    (build.sh test runs this under 3.8 too): the build fixes the seed."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "byteback.py").write_text("NAMES = {'alpha', 'beta', 'gamma', 'delta', 'epsilon'}\n" +
                                     END + "def main():\n    return 'beta' in {'x', 'y', 'z', 'beta'}\n")
    digests = set()
    for seed in ("1", "2", "3"):
        env = dict(os.environ, BYTEBACK_SRC_DIR=str(src), BYTEBACK_OUT_DIR=str(tmp_path / seed),
                   PYTHONHASHSEED=seed, PYTHON=sys.executable)
        subprocess.run([str(BUILD_SH)], env=env, check=True, stdout=subprocess.DEVNULL)
        digests.add(_sha256(tmp_path / seed / "byteback.pyz"))
    assert len(digests) == 1


FLAGS_OF_ITS_START = (END + "import os, sys\ndef main():\n"
                      "    print(sys.flags.isolated, sys.flags.no_site, 'site' in sys.modules,\n"
                      "          os.getcwd() in sys.path, any('site-packages' in p for p in sys.path))\n"
                      "    return 0\n")


def test_the_zipapp_starts_its_python_isolated_and_without_site(tmp_path):
    """Run as the forced command and sudo run it (by its #! line): no PYTHON* variable
    of the caller's, no site-packages (nor their .pth files), no current directory."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "byteback.py").write_text(FLAGS_OF_ITS_START)
    pyz = _build(src, tmp_path / "out", umask=0o022)
    (tmp_path / "os.py").write_text("raise SystemExit('the caller\\'s os.py was imported')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path), PYTHONSTARTUP=str(tmp_path / "os.py"))
    result = subprocess.run([str(pyz)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, "1 1 False False False\n"), result.stderr
