"""A throwaway PostgreSQL 15 server on loopback, for the sweep tests (two workers sharing one study).

    with PostgresServer() as url:     # postgresql://postgres@127.0.0.1:PORT/optuna (psycopg 3)
        ...

Runs ``initdb`` / ``pg_ctl`` from ``$NORMABLATE_PG_BIN`` or ``/usr/lib/postgresql/15/bin`` (or ``pg_ctl`` on
PATH). PostgreSQL refuses to run as root, so as root the cluster belongs to the ``postgres`` user (via
``runuser``); otherwise it runs as the current user. The data directory, socket and log live in a fresh
``/tmp/nb-pg-*`` folder (pytest's tmp dirs are private to root, which ``postgres`` cannot enter) and are removed
on exit.
"""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from .helpers import free_port

CANDIDATES = [os.environ.get("NORMABLATE_PG_BIN", ""), "/usr/lib/postgresql/15/bin"]


def pg_bin() -> Path | None:
    for c in CANDIDATES:
        if c and (Path(c) / "pg_ctl").exists() and (Path(c) / "initdb").exists():
            return Path(c)
    found = shutil.which("pg_ctl")
    return Path(found).parent if found and (Path(found).parent / "initdb").exists() else None


def unavailable_reason() -> str | None:
    """Why the PostgreSQL tests cannot run here (None: they can)."""
    if pg_bin() is None:
        return "PostgreSQL server binaries not found (set NORMABLATE_PG_BIN or install postgresql-15)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to own the cluster"
        if shutil.which("runuser") is None:
            return "running as root and 'runuser' is missing"
    try:
        import psycopg  # noqa: F401  (SQLAlchemy 2 maps postgresql:// to psycopg 3)
    except ImportError:
        return "psycopg (3) is not installed (pip install -e '.[test]')"
    return None


class PostgresServer:
    def __init__(self, dbname: str = "optuna") -> None:
        self.bin = pg_bin()
        self.dbname = dbname
        self.root = Path(tempfile.mkdtemp(prefix="nb-pg-"))
        self.data = self.root / "data"
        self.port = 0
        self.url = ""

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=120)

    def start(self) -> str:
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self.root.chmod(0o700)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        last = None
        for _ in range(5):  # a free port can be taken between the check and the bind: try another
            self.port = free_port()
            opts = (f"-k {self.root} -p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off "
                    f"-c max_connections=100")
            r = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-o", opts, "-w", "-t", "60",
                          "start", check=False)
            if r.returncode == 0:
                self.opts = opts
                break
            last = r.stderr + (self.root / "log").read_text() if (self.root / "log").exists() else r.stderr
        else:
            raise RuntimeError(f"PostgreSQL did not start: {last}")
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", self.dbname)
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/{self.dbname}"  # the README's form (psycopg 3)
        return self.url

    def pause(self) -> None:
        """Stop the server (an outage: clients lose their connections), keeping its data and port."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def resume(self) -> None:
        """Start it again on the same port after ``pause``."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-o", self.opts, "-w", "-t", "60",
                  "start")

    def stop(self) -> None:
        if self.data.exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        for _ in range(20):
            try:
                shutil.rmtree(self.root)
                return
            except OSError:
                time.sleep(0.2)

    def __enter__(self) -> str:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
