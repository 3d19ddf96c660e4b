"""Where a study lives: SQLite by default, any SQLAlchemy URL (PostgreSQL, MySQL), or an Optuna journal file.

    None                              -> sqlite:///<log_dir>/optuna.db   (zero set-up)
    journal:PATH | PATH.log | PATH.journal -> JournalStorage(JournalFileBackend(PATH))  (NFS-friendly, no server)
    PATH.db | PATH.sqlite             -> sqlite:///PATH
    postgresql://user@host:port/db    -> RDBStorage (several machines share it)

SQLite with several processes: every transaction starts with ``BEGIN IMMEDIATE`` and waits up to 60 s for the
write lock. With pysqlite's default deferred transactions, a read that turns into a write fails at once with
"database is locked" when another process writes at the same moment (the busy timeout does not apply to that
lock upgrade); taking the write lock up front makes concurrent workers queue instead of fail. Trials last
seconds to hours while a storage call lasts milliseconds, so the serialisation costs nothing measurable.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

DEFAULT_DB = "optuna.db"
T = TypeVar("T")


def default_url(log_dir: str | Path) -> str:
    return f"sqlite:///{Path(log_dir) / DEFAULT_DB}"


def normalize_url(url: str | None, log_dir: str | Path = "lightning_logs") -> str:
    """The canonical storage string (what gets printed and handed to workers)."""
    if url is None or url == "":
        return default_url(log_dir)
    if url.startswith("journal:"):
        return url
    if url.endswith((".log", ".journal")) and "://" not in url:
        return "journal:" + url
    if url.endswith((".db", ".sqlite", ".sqlite3")) and "://" not in url:
        return f"sqlite:///{url}"
    return url


def check_url(url: str) -> None:
    """Refuse a storage string that cannot work, before anything is opened: a journal with no path, something that
    is neither a journal nor a URL, an unknown database scheme, a database driver that is not installed."""
    from ..errors import ConfigError

    forms = "sqlite:///PATH.db, PATH.db, journal:PATH, PATH.log, postgresql://user@host/db"
    if url.startswith("journal:"):
        if not url[len("journal:"):].strip():
            raise ConfigError(f"--storage {url!r}: a journal storage needs a file path, e.g. journal:lightning_logs/"
                              f"optuna.log")
        return
    if "://" not in url:
        raise ConfigError(f"--storage {url!r} is neither a database URL nor a storage file; valid forms: {forms}")
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        u = make_url(url)
        dialect = u.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as e:
        scheme = url.split("://", 1)[0]
        raise ConfigError(f"--storage {url!r}: unknown database scheme {scheme!r} ({type(e).__name__}); valid forms: "
                          f"{forms}") from None
    try:
        dialect.import_dbapi()
    except ImportError as e:
        raise ConfigError(f"--storage {url!r}: the database driver is not installed ({e}); for PostgreSQL: "
                          f"pip install 'normablate[postgres]'") from None
    if u.get_backend_name() == "sqlite" and u.database in (None, ""):
        raise ConfigError(f"--storage {url!r}: an SQLite URL needs a file, e.g. sqlite:///lightning_logs/optuna.db")


def _sqlite_immediate(engine) -> None:
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, record):  # noqa: ARG001
        dbapi_conn.isolation_level = None  # let the "begin" hook below issue BEGIN itself

    @event.listens_for(engine, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened during RDBStorage's own set-up predate the hooks


def open_storage(url: str | None, log_dir: str | Path = "lightning_logs"):
    """An Optuna storage object for ``url`` (see the module doc); creates folders for file storages."""
    import optuna

    url = normalize_url(url, log_dir)
    check_url(url)
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url[len("journal:"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        db = url.split(":///", 1)[-1]
        if db and db != ":memory:":
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        kwargs = {"connect_args": {"timeout": 60}}
    else:
        kwargs = {"pool_pre_ping": True}
    storage = retry(lambda: optuna.storages.RDBStorage(url, engine_kwargs=kwargs))
    if url.startswith("sqlite"):
        _sqlite_immediate(storage.engine)
    return storage


def retry(fn: Callable[[], T], tries: int = 8, delay: float = 0.5) -> T:
    """Call ``fn``, retrying transient storage errors (locked SQLite, a dropped database connection)."""
    import optuna
    from sqlalchemy.exc import OperationalError

    for i in range(tries):
        try:
            return fn()
        except (optuna.exceptions.StorageInternalError, OperationalError):
            if i == tries - 1:
                raise
            time.sleep(delay * (1.5 ** i))
    raise AssertionError("unreachable")
