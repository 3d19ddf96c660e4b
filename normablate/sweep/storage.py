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

Outages: every call a worker makes to a database storage goes through ``RetryingStorage``, which retries a
connection-level failure (server down or restarting, dropped connection, locked SQLite) with exponential backoff
(0.5 s, x1.5, at most 10 s apart) for up to ``$NORMABLATE_STORAGE_PATIENCE`` seconds (default 600), then gives up
with the original error. ``pool_pre_ping`` replaces the dead pooled connections once the server is back. A write
whose reply was lost may be applied twice; the sweep's duplicate handling (one COMPLETE trial per grid point)
counts such a point once.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

DEFAULT_DB = "optuna.db"
T = TypeVar("T")
log = logging.getLogger(__name__)


def patience() -> float:
    """Seconds a storage call keeps retrying through an outage (``$NORMABLATE_STORAGE_PATIENCE``, default 600)."""
    return float(os.environ.get("NORMABLATE_STORAGE_PATIENCE", "600"))


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
    storage = retry(lambda: _rdb_storage(url, kwargs))
    if url.startswith("sqlite"):
        _sqlite_immediate(storage.engine)
    return retrying(storage)


def _rdb_storage(url: str, kwargs: dict[str, Any]):
    """``RDBStorage(url)``; workers starting together on a fresh database (a Slurm array) race to create Optuna's
    tables, and the losers get a duplicate-type/table error: the schema then exists, so trying again succeeds."""
    import optuna
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except (IntegrityError, ProgrammingError):
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def transient(e: BaseException) -> bool:
    """A connection-level storage failure (worth retrying), not a logical error (a duplicate, a finished trial).

    Looks through the cause chain: while a server is down, SQLAlchemy may report the lost connection as the cause
    of an Optuna ``StorageInternalError``, or a later call on the same session as ``PendingRollbackError`` (the
    transaction the lost connection broke was not rolled back yet); both are retried. A logical error that left a
    pending rollback shows up again as itself on the retry, and is raised then."""
    import optuna
    from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError, PendingRollbackError

    conn = (OperationalError, InterfaceError, DisconnectionError, ConnectionError, PendingRollbackError)
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, conn):
            return True
        if isinstance(e, optuna.exceptions.StorageInternalError):
            cause = e.__cause__ or e.__context__
            if cause is None or "connection" in str(cause).lower():
                return True
        e = e.__cause__ or e.__context__
    return False


def retry(fn: Callable[[], T], tries: int | None = None, delay: float = 0.5, max_delay: float = 10.0) -> T:
    """Call ``fn``, retrying transient storage errors (see ``transient``) with backoff for up to ``patience()``
    seconds (or ``tries`` attempts)."""
    deadline = time.monotonic() + patience()
    i = 0
    while True:
        try:
            return fn()
        except Exception as e:
            if not transient(e) or time.monotonic() >= deadline or (tries is not None and i >= tries - 1):
                raise
            if i == 2:
                log.warning("storage unavailable (%s); retrying for up to %.0f s", str(e).splitlines()[0][:200],
                            deadline - time.monotonic())
            time.sleep(min(max_delay, delay * 1.5 ** i))
            i += 1


def retrying(storage):
    """``storage`` with every public call retried through outages (``retry``); other attributes pass through."""
    cls = _retrying_class()
    if isinstance(storage, cls):
        return storage
    obj = cls.__new__(cls)
    obj._inner = storage
    return obj


_RETRYING: type | None = None


def _retrying_class() -> type:
    global _RETRYING
    if _RETRYING is None:
        import optuna

        base = optuna.storages.BaseStorage

        def wrap(name: str):
            def method(self, *args, **kwargs):
                return retry(lambda: getattr(self._inner, name)(*args, **kwargs))

            method.__name__ = name
            return method

        ns = {n: wrap(n) for n in dir(base) if not n.startswith("_") and callable(getattr(base, n))}
        def passthrough(self, name: str):
            inner = self.__dict__.get("_inner")
            if inner is None:
                raise AttributeError(name)
            return getattr(inner, name)

        ns["__getattr__"] = passthrough
        ns["__doc__"] = "An Optuna storage whose calls survive transient outages (storage.retry)."
        _RETRYING = type("RetryingStorage", (base,), ns)
    return _RETRYING
