"""A byteback server and client set up for real, through byteback's own commands.

On top of sshd_env's server environment (btrfs store, server user, sshd,
administrator key in an agent) this runs the built ``byteback.pyz``:
``setup-server`` as root, then ``setup-client`` with the administrator's
agent, exactly as the README tells an administrator to.  Tests then drive
``backup``, ``restore`` and friends as a client would, and look at the store
as the server sees it.

Use::

    from remote_env import byteback_remote      # module-scoped fixture
    def test_x(byteback_remote):
        byteback_remote.backup("--source", str(tree)).check()
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from sshd_env import ServerEnv, _sigterm_as_interrupt, _skip_or_check, server_environment  # noqa: E402
from treeutil import wait_out_second  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CLIENT_HOST = "client1"


@dataclass
class Result:
    """A finished byteback run, with a check() that shows its output on failure."""
    argv: List[str]
    returncode: int
    stdout: str
    stderr: str

    def check(self, code: int = 0) -> "Result":
        assert self.returncode == code, (
            f"{' '.join(self.argv)} exited {self.returncode}, expected {code}\n"
            f"--- stdout ---\n{self.stdout[-4000:]}\n--- stderr ---\n{self.stderr[-4000:]}")
        return self


def build_pyz(out_dir: Path) -> Path:
    """Build byteback.pyz from this checkout into out_dir with the project's build.sh."""
    env = dict(os.environ, BYTEBACK_OUT_DIR=str(out_dir))
    subprocess.run([str(REPO / "build.sh")], env=env, check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL, timeout=120)
    return out_dir / "byteback.pyz"


@dataclass
class RemoteByteback:
    """A server set up by setup-server and a client set up by setup-client."""
    env: ServerEnv
    pyz: Path                 # the client's copy
    program: Path             # the server's installed copy (what authorized_keys runs)
    server_config: Path       # the server's --config-dir
    client_config: Path       # the client's --config-dir
    client_state: Path        # BYTEBACK_STATE_DIR of the client
    host: str = CLIENT_HOST

    @property
    def store(self) -> Path:
        return self.env.store

    @property
    def host_dir(self) -> Path:
        return self.env.store / self.host

    def run(self, *args: str, env: Optional[dict] = None, timeout: float = 300,
            config_dir: Optional[Path] = None) -> Result:
        """Run the client's byteback.pyz with the client config dir and state."""
        if args[:1] == ("backup",):
            self._next_second(args[args.index("--host") + 1] if "--host" in args[:-1] else self.host)
        argv = [str(self.pyz), "--config-dir", str(config_dir or self.client_config), *args]
        run_env = dict(os.environ, BYTEBACK_STATE_DIR=str(self.client_state))
        run_env.pop("SSH_AUTH_SOCK", None)     # backups must not lean on an agent
        run_env.update(env or {})
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, errors="replace", env=run_env,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        return Result(argv, proc.returncode, proc.stdout, proc.stderr)

    def _next_second(self, host: str) -> None:
        host_dir = self.env.store / host
        wait_out_second([p.name for p in host_dir.iterdir() if p.name[:1].isdigit()] if host_dir.is_dir() else [])

    def backup(self, *args: str, **kwargs) -> Result:
        """`byteback backup --host client1 --retry-delay 1 ...`: quick retries in tests."""
        return self.run("backup", "--host", self.host, "--retry-delay", "1", *args, **kwargs)

    def server(self, *args: str) -> Result:
        """Run the installed server program as root, with the server config dir."""
        argv = [str(self.program), "--config-dir", str(self.server_config), *args]
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, errors="replace", timeout=300)
        return Result(argv, proc.returncode, proc.stdout, proc.stderr)

    def set_server_conf(self, **settings: str) -> None:
        """Rewrite server.conf (the store line kept) with these settings."""
        lines = ["[server]", f"store = {self.store}"]
        lines += [f"{key} = {value}" for key, value in settings.items()]
        (self.server_config / "server.conf").write_text("\n".join(lines) + "\n")

    def setup_client(self, config: Path, host: str) -> None:
        """setup-client of another host, with its own config dir, by the administrator's agent."""
        self.run("setup-client", "--destination", self.env.destination, "--port", str(self.env.port),
                 "--hostname", host, "--server-program", str(self.program),
                 "--server-config-dir", str(self.server_config),
                 env={"SSH_AUTH_SOCK": str(self.env.agent.sock)}, config_dir=config).check()

    def snapshots(self, host: Optional[str] = None) -> List[str]:
        """Names of the finished snapshots of the client (or of `host`), oldest first."""
        host_dir = self.host_dir if host is None else self.env.store / host
        return sorted(p.name for p in host_dir.iterdir() if p.name[:1].isdigit())

    def client_key(self) -> Path:
        return self.client_config / "key"


def _root_dir(prefix: str, mode: int = 0o755) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(path, mode)
    return path


@contextlib.contextmanager
def remote_byteback(store_size: str = "512M", receiver: str = "fakesuper") -> Iterator[RemoteByteback]:
    """A server environment plus setup-server and setup-client, torn down afterwards.

    receiver: setup-server's --receiver (the suites written for the shared
    user's fake-super receiver keep it; test_userns_receiver uses userns)."""
    with server_environment(store_size=store_size) as env:
        dirs = [_root_dir("bbtest-prog-"), _root_dir("bbtest-srvcfg-"),
                _root_dir("bbtest-clicfg-", 0o700), _root_dir("bbtest-state-", 0o700)]
        prog_dir, server_config, client_config, state = dirs
        sudoers = Path("/etc/sudoers.d") / f"byteback-{env.user.name}"
        try:
            pyz = build_pyz(prog_dir)
            program = prog_dir / "installed" / "byteback.pyz"
            os.makedirs(program.parent, mode=0o755)
            remote = RemoteByteback(env, pyz, program, server_config, client_config, state)
            setup = subprocess.run(
                [str(pyz), "--config-dir", str(server_config), "setup-server", "--store", str(env.store),
                 "--user", env.user.name, "--install-path", str(program), "--receiver", receiver,
                 "--cron-file", str(server_config / "cron.d-byteback-prune")],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
            Result(setup.args, setup.returncode, setup.stdout, setup.stderr).check()
            remote.run("setup-client", "--destination", env.destination, "--port", str(env.port),
                       "--hostname", CLIENT_HOST, "--server-program", str(program),
                       "--server-config-dir", str(server_config),
                       env={"SSH_AUTH_SOCK": str(env.agent.sock)}).check()
            yield remote
        finally:
            with contextlib.suppress(FileNotFoundError):
                sudoers.unlink()
            for path in dirs:
                shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def byteback_remote() -> Iterator[RemoteByteback]:
    """Module-scoped: one server and one set-up client for the tests of a module."""
    _skip_or_check()
    with _sigterm_as_interrupt(), remote_byteback() as remote:
        yield remote
