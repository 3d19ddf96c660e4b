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

Faults the user can act on end the command with one line naming the file or server and the next step (exit 2,
``StorageError``): a corrupt SQLite file or journal, a full disk, a database server still unreachable after the
patience. A journal file is checked before anything is appended (``check_journal``): a torn or garbage tail (a
crash or a full disk mid-append) is cut off after a backup copy is kept; damage before the last complete record is
refused; a live writer does the same, under the journal lock, to a record a sibling worker left torn when it was
killed mid-append, rather than glue its own onto it; both hold ``flock`` on the file under Optuna's symlink lock
(``_journal_lock``: Optuna's alone can be taken over). While a process uses a journal, a file replaced or cut short under it (a ``git stash`` or ``checkout`` of
a tracked journal, a copy or sync tool writing over it) stops that process before it reads or writes another
record (``JournalReplaced``): Optuna's file backend reads on from byte offsets, so it would otherwise go on blind,
writing claims and failures against a log it no longer sees (this happened once to a findings study).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..errors import NormablateError

DEFAULT_DB = "optuna.db"
T = TypeVar("T")
log = logging.getLogger(__name__)


class StorageError(NormablateError):
    """The study's storage cannot be used as it is (corrupt file, full disk, unreachable server). The message names
    the file or server and what to do; the CLI prints it as one line and exits 2."""


class JournalReplaced(StorageError):
    """The journal file a process was using was replaced or cut short under it (see the module doc)."""


class NoStorage(StorageError):
    """``open_storage(..., create=False)``: the storage file does not exist (so it holds no study)."""


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


def display_url(url: str) -> str:
    """``url`` as printed: a database URL's password is masked (``postgresql://u:***@host/db``)."""
    if "://" not in url or url.startswith("sqlite"):
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001  (not a URL SQLAlchemy reads: nothing to mask)
        return url


def _record(line: bytes) -> dict | None:
    """One journal line's record, or None where it is not a complete one: a complete record ends with a newline
    and ``json.loads`` gives an operation (a JSON object with ``op_code``). Optuna's own reader only skips a bad
    *last* line and fails on any other (``JSONDecodeError``; ``UnicodeDecodeError`` for binary bytes)."""
    if not line.endswith(b"\n"):
        return None
    try:
        rec = json.loads(line)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return None
    return rec if isinstance(rec, dict) and "op_code" in rec else None


def _lines(data: bytes):
    """``data``'s lines, each with its newline (only ``\\n``, as Optuna's reader splits); a last piece without one
    too. One at a time (a journal's first replay reads the whole file)."""
    i, n = 0, len(data)
    while i < n:
        j = data.find(b"\n", i)
        j = n if j < 0 else j + 1
        yield data[i:j]
        i = j


def _scan(data: bytes, path: Path) -> tuple[int, int | None]:
    """(end of the last complete record of journal bytes ``data``, offset of the first bad byte after it or None).
    Raises ``StorageError`` naming the offset when a bad line comes before a complete record (damage inside the
    file)."""
    good_end, first_bad, offset = 0, None, 0
    for line in _lines(data):
        if _record(line) is not None:
            if first_bad is not None:
                raise StorageError(
                    f"journal {str(path)!r} is damaged: the record at byte {first_bad} does not parse and "
                    f"complete records follow it, so it was left as it is and nothing was written; restore the "
                    f"file from a backup, or move it aside and start the study again")
            good_end = offset + len(line)
        elif first_bad is None:
            first_bad = offset
        offset += len(line)
    return good_end, first_bad


def _good_end(fd: int, size: int, path: Path, *, whole: bool = False) -> int:
    """The end of the last complete record of the journal open as ``fd`` (its first ``size`` bytes), where only a
    torn or garbage tail follows it: ``size`` when the file is whole. Damage inside the file, or no complete record
    in a file that is not empty (not a journal, a binary file), is refused (``StorageError``). Cheap in the usual
    case unless ``whole``: only the last line is read when it is a complete record."""
    if size == 0:
        return 0
    if not whole and os.pread(fd, 1, size - 1) == b"\n":
        start = _last_line_end(fd, size - 1)
        if _record(_pread_all(fd, size - start, start)) is not None:
            return size
    good_end, first_bad = _scan(_pread_all(fd, size, 0), path)
    if good_end == 0:
        raise StorageError(f"{str(path)!r} is not an Optuna journal (no complete record in its {size} bytes: another "
                           f"kind of file, or a journal whose first record was torn; the first bad byte is at offset "
                           f"{first_bad}), so it was left as it is; pass another file to --storage, or move this one "
                           f"aside")
    return good_end


def check_journal(path: str | Path) -> int:
    """Make a journal file safe to append to; returns the bytes dropped (0 when the file is whole).

    Hand-written because Optuna's ``JournalFileBackend`` appends straight after whatever the file ends with: after
    a torn write (a crash or a full disk mid-append) the next record is glued to the torn one, and from then on
    every read fails. Here, a tail after the last complete record (``_record``) that is not one is cut off, under
    the journal lock (``_journal_lock``), after the file is copied to ``PATH.bak-<UTC time>``; one line on stderr
    names the file and the bytes dropped. A bad record with complete ones after it, or a non-empty file with no
    complete record at all (not a journal, or a binary file), is refused (``StorageError``) and nothing is written.
    A first look is taken without the lock (the usual case, a whole file, costs no lock); anything wrong in it may be
    a live writer's half-written line, so every decision is taken on a second look under the lock, where no writer
    is mid-record."""
    path = Path(path)
    if path.is_dir():
        raise StorageError(f"{str(path)!r} is a folder, not a journal file; pass a file path to --storage")
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return 0
    try:
        size = os.fstat(fd).st_size
        try:
            if _scan(_pread_all(fd, size, 0), path)[1] is None:
                return 0
        except StorageError:
            pass  # (decided under the lock)
        with _journal_lock(fd, path):
            size = os.fstat(fd).st_size
            good_end = _good_end(fd, size, path, whole=True)
            if good_end < size:
                _cut_tail(path, fd, good_end, size)
            return size - good_end
    finally:
        os.close(fd)


def _journal_lock(fd: int, path: Path, symlink_lock=None):
    """The journal's write lock, held by every append and every cut: ``flock`` on the open file, then Optuna's
    symlink lock (``symlink_lock``, or a new one on ``path``), which is what plain Optuna processes writing the same
    file take. Both because Optuna's symlink lock alone can be taken over: a lock left by a writer killed while
    holding it is broken by its waiters once the journal has not changed for 30 s, and a waiter past that grace
    breaks every later holder's lock too, so several writers may hold it at once (appends survive that, each one
    write; a cut does not). ``flock`` is released by the kernel when its holder dies, so it cannot go stale and is
    never taken over; it excludes writers on this machine, and on others where the file system supports it (NFS
    with its lock service); plain Optuna writers do not take it. A journal removed while this waits is refused
    (``FileNotFoundError``), where Optuna's own wait would spin."""
    import fcntl

    @contextlib.contextmanager
    def held():
        t0, pause, warned = time.monotonic(), 0.001, False
        while True:  # (polled: a holder that is stopped, not dead, keeps it; say so, and give up after the patience)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - t0
                if waited > patience():
                    raise StorageError(
                        f"journal {str(path)!r}: another process has held its lock for {waited:.0f} s (stopped or "
                        f"hung: Ctrl-Z, a suspended job, a hung file system?); resume or end it, then run the same "
                        f"command again (NORMABLATE_STORAGE_PATIENCE sets how long to wait)") from None
                if waited > 10 and not warned:
                    print(f"journal {str(path)!r}: waiting for its lock, held by another process for {waited:.0f} s "
                          f"(stopped or hung?)", file=sys.stderr, flush=True)
                    warned = True
                time.sleep(pause)
                pause = min(pause * 2, 0.5)
        try:
            lock = symlink_lock or _symlink_lock_class()(str(path))
            lock.acquire()
            try:
                yield
            finally:
                try:
                    lock.release()
                except RuntimeError:  # (a plain Optuna process broke it after its grace period)
                    log.warning("journal lock of %s was broken by another process while held", path)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    return held()


_SYMLINK_LOCK: type | None = None


def _symlink_lock_class() -> type:
    """Optuna's ``JournalFileSymlinkLock`` (the same lock file, the same grace period before a lock left by a
    writer that died is broken) with a wait that stops, with ``FileNotFoundError``, when the journal is removed
    meanwhile: Optuna's reads the lock's time through the link and, the journal gone, retries without sleeping,
    forever."""
    global _SYMLINK_LOCK
    if _SYMLINK_LOCK is None:
        from optuna.storages.journal import JournalFileSymlinkLock

        class SymlinkLock(JournalFileSymlinkLock):
            def acquire(self) -> bool:
                pause, since, mtime = 0.001, time.monotonic(), None
                while True:
                    try:
                        os.symlink(self._lock_target_file, self._lock_file)
                        return True
                    except FileExistsError:
                        pass
                    now = os.stat(self._lock_target_file).st_mtime  # (FileNotFoundError: the journal is gone)
                    if now != mtime:  # the journal changed: its lock holder is alive
                        mtime, since = now, time.monotonic()
                    elif self.grace_period is not None and time.monotonic() - since > self.grace_period:
                        log.warning("journal lock %s held for %ss with no change to the journal: breaking it",
                                    self._lock_file, self.grace_period)
                        with contextlib.suppress(RuntimeError):  # (another waiter broke it first)
                            self.release()
                        since, pause = time.monotonic(), 0.001
                        continue
                    time.sleep(pause)
                    pause = min(pause * 2, 1.0)

        _SYMLINK_LOCK = SymlinkLock
    return _SYMLINK_LOCK


def _cut_tail(path: Path, fd: int, good_end: int, size: int) -> None:
    """Cut the journal open as ``fd`` back to ``good_end`` (the end of its last complete record), after the bytes cut
    off are kept in ``PATH.bak-<UTC time>`` (a new name, never another backup's; only those bytes, so that a nearly
    full disk, where torn writes come from, has room for them); one line on stderr. The caller holds the journal
    lock; a file at the path that is no longer the one ``fd`` opened, or no longer ``size`` bytes long, is not cut
    (``StorageError``)."""
    dropped = _pread_all(fd, size - good_end, good_end)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    for n in range(1000):
        backup = path.with_name(f"{path.name}.bak-{stamp}" + (f"-{n}" if n else ""))
        try:
            with open(backup, "xb") as out:
                try:
                    out.write(dropped)
                    out.flush()
                except OSError:
                    os.unlink(backup)  # (a partial backup would only fill the disk further)
                    raise
            break
        except FileExistsError:
            continue
    with open(path, "r+b") as f:
        st, mine = os.fstat(f.fileno()), os.fstat(fd)
        if (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino) or st.st_size != size:
            os.unlink(backup)
            raise StorageError(f"journal {str(path)!r} was replaced or written to while its torn tail was being cut "
                               f"(by a process not under its lock?), so it was not cut; run the same command again")
        f.truncate(good_end)
        f.flush()
        os.fsync(f.fileno())
    print(f"journal {str(path)!r}: dropped {size - good_end} bytes of an incomplete or garbage tail after the last "
          f"complete record (byte {good_end}); those bytes are kept in {str(backup)!r}", file=sys.stderr,
          flush=True)


def _sqlite_immediate(engine) -> None:
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, record):  # noqa: ARG001
        dbapi_conn.isolation_level = None  # let the "begin" hook below issue BEGIN itself

    @event.listens_for(engine, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened during RDBStorage's own set-up predate the hooks


def open_storage(url: str | None, log_dir: str | Path = "lightning_logs", *, create: bool = True):
    """An Optuna storage object for ``url`` (see the module doc); creates folders for file storages, or with
    ``create=False`` refuses (``StorageError``) a storage file that does not exist yet (nothing is created)."""
    url = normalize_url(url, log_dir)
    check_url(url)
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalStorage

        path = Path(url[len("journal:"):])
        if not create and not path.exists():
            raise NoStorage(f"no journal {str(path)!r}, so no studies there (no sweep has written there); check "
                            f"--storage")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            check_journal(path)
        except OSError as e:  # (a full disk while a torn tail's bytes are kept: name the journal)
            err = failure(e, url)
            if err is None:
                raise
            raise err from None
        try:  # (wrapped for its errors only: a full disk names the journal; nothing there is retried)
            return retrying(JournalStorage(_guarded_backend_class()(str(path))), url)
        except ValueError as e:  # (JSONDecodeError, UnicodeDecodeError: changed since check_journal read it)
            raise StorageError(f"journal {str(path)!r} cannot be read ({type(e).__name__}: {e}); restore it from a "
                               f"backup or move it aside") from None
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        db = url.split(":///", 1)[-1]
        if db and db != ":memory:":
            if not create and not Path(db).exists():
                raise NoStorage(f"no database {db!r}, so no studies there (no sweep has written there); check "
                                f"--storage")
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        kwargs = {"connect_args": {"timeout": 60}}
    else:
        kwargs = {"pool_pre_ping": True}
    storage = retry(lambda: _rdb_storage(url, kwargs), where=url)
    if url.startswith("sqlite"):
        _sqlite_immediate(storage.engine)
    return retrying(storage, url)


_GUARDED: type | None = None
_TAIL = 256  # bytes kept of the end of what a backend has read, to recognise its file by


def _pread_all(fd: int, n: int, offset: int) -> bytes:
    """``n`` bytes at ``offset`` (fewer only at the end of the file)."""
    parts, got = [], 0
    while got < n:
        b = os.pread(fd, n - got, offset + got)
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def _guarded_backend_class() -> type:
    """Optuna's ``JournalFileBackend`` with its reads and appends re-written to refuse a file replaced or cut short
    under it (``JournalReplaced``), and to cut a dead writer's torn record before appending.

    Optuna's backend remembers the byte offset of every record it has read and seeks there on the next read; if
    the file is swapped for another (a new inode) or truncated below those offsets, its reads silently return
    nothing from then on while its appends still land, so a worker would claim, fail and retry trials against a log
    it cannot see. Hand-written (Optuna's reader opens the path anew for each step and cannot be checked between
    them): every read and every append works on one open descriptor, and checks first that it is the file this
    backend opened (device and inode), that it still holds every byte read so far, and that the last bytes read are
    still where they were (an inode number is reused after a delete, and a copy over the file keeps it). A read
    takes the file's size, reads up to it at once, and compares the bytes of the records it read with a second read
    before it hands them on, so a copy written over the file meanwhile is refused too, not read half-and-half.

    Reading follows Optuna's format: one JSON record per line; a line not yet ended by a newline (a writer
    mid-record), or a last line that does not parse, is left for the next read; a bad line with more after it is
    damage (``StorageError`` naming the byte). An append checks the file, waits for the journal lock
    (``_journal_lock``; a journal removed meanwhile is refused), checks again under it, and cuts a torn or garbage
    tail after the last complete record as ``check_journal`` does (a writer killed mid-append: no one holding the
    lock can be writing it, and no reader passes a line without its newline or one that does not parse), instead of
    gluing its record onto it."""
    global _GUARDED
    if _GUARDED is None:
        from optuna.storages.journal import JournalFileBackend
        from optuna.storages.journal._file import get_lock_file

        class GuardedJournalFileBackend(JournalFileBackend):
            def __init__(self, file_path: str, lock_obj=None) -> None:
                super().__init__(file_path, lock_obj or _symlink_lock_class()(file_path))  # (and an empty file)
                st = os.stat(self._file_path)
                self._nb_file = (st.st_dev, st.st_ino)
                self._nb_seen, self._nb_tail = 0, b""  # end of the records read so far; its last <= _TAIL bytes

            def _nb_open(self, flags: int) -> int:
                try:  # (never O_CREAT: a file removed meanwhile is not made anew)
                    return os.open(self._file_path, flags)
                except FileNotFoundError:
                    self._nb_refuse(None)

            def _nb_check(self, fd: int) -> int:
                """The size of the open file ``fd``, after checking that it is this backend's file, unchanged, and
                still the file at the path."""
                st = os.fstat(fd)
                seen, tail = self._nb_seen, self._nb_tail
                same = (st.st_dev, st.st_ino) == self._nb_file and st.st_size >= seen
                if same and tail:
                    same = os.pread(fd, len(tail), seen - len(tail)) == tail
                if same:
                    try:
                        at = os.stat(self._file_path)
                    except FileNotFoundError:
                        self._nb_refuse(None)
                    same = (at.st_dev, at.st_ino) == self._nb_file
                if not same:
                    self._nb_refuse(st)
                return st.st_size

            def _nb_refuse(self, st) -> None:  # always raises
                seen = self._nb_seen
                now = ("it is gone" if st is None else f"it now holds {st.st_size} bytes"
                       + ("" if st.st_size < seen else ", not the records it read"))
                raise JournalReplaced(
                    f"journal {self._file_path!r} was replaced or cut short while this process used it (it had "
                    f"read {seen} bytes of records; {now}); stopped before reading or writing another record. "
                    f"Something outside the sweep changed the file (a git stash or checkout of a tracked journal, "
                    f"a copy or sync over it): put back the file as it was, or a later copy of it, and run the same "
                    f"command again (finished trials in it are kept)")

            def read_logs(self, log_number_from: int):
                offsets = self._log_number_offset  # log number -> byte offset of its line (Optuna's)
                n = log_number_from if log_number_from in offsets else 0
                start = offsets[n]
                fd = self._nb_open(os.O_RDONLY)
                try:
                    size = self._nb_check(fd)
                    data = _pread_all(fd, size - start, start)
                    records, end, bad = [], 0, None  # (end: of the last complete record, within data)
                    for line in _lines(data):
                        if bad is not None:  # a bad line with more after it: damage, unless the file changed
                            if _pread_all(fd, len(data), start) != data:
                                self._nb_refuse(os.fstat(fd))
                            raise StorageError(
                                f"journal {self._file_path!r} is damaged: the record at byte {start + bad} does not "
                                f"parse and more follows it; restore the file from a backup, or move it aside")
                        if not line.endswith(b"\n"):
                            break  # a writer mid-record: read it next time
                        rec = _record(line)
                        if rec is None:
                            bad = end
                            continue
                        end += len(line)
                        n += 1
                        offsets.setdefault(n, start + end)
                        if n > log_number_from:
                            records.append(rec)
                    if end:  # the bytes of those records, read again: a copy over the file meanwhile shows here
                        if _pread_all(fd, end, start) != data[:end]:
                            self._nb_refuse(os.fstat(fd))
                        if start + end > self._nb_seen:  # (its tail: from data, else before it, checked above)
                            self._nb_seen, keep = start + end, min(_TAIL, start + end)
                            self._nb_tail = data[end - keep:end] if keep <= end else _pread_all(
                                fd, keep, start + end - keep)
                finally:
                    os.close(fd)
                yield from records

            def append_logs(self, logs: list[dict[str, Any]]) -> None:
                data = ("\n".join(json.dumps(x, separators=(",", ":")) for x in logs) + "\n").encode("utf-8")
                path = Path(self._file_path)
                fd = self._nb_open(os.O_RDWR | os.O_APPEND)
                try:
                    self._nb_check(fd)  # (before the wait too: a removed journal is refused, not waited on)
                    with _journal_lock(fd, path, self._lock):
                        size = self._nb_check(fd)
                        end = size if size == self._nb_seen else _good_end(fd, size, path)  # (a tail a writer killed
                        # mid-record left: cut, not glued to; none when the file ends where this backend last read)
                        if end < size:
                            _cut_tail(path, fd, end, size)
                        view = memoryview(data)
                        while view:
                            view = view[os.write(fd, view):]
                        os.fsync(fd)
                except FileNotFoundError:  # (removed while this waited for the lock, or cut)
                    self._nb_refuse(None)
                finally:
                    os.close(fd)

        _GUARDED = GuardedJournalFileBackend
    return _GUARDED


def _last_line_end(fd: int, size: int) -> int:
    """The offset just past the last newline of the open file ``fd`` of ``size`` bytes (0 if it has none)."""
    pos = size
    while pos > 0:
        lo = max(0, pos - 65536)
        i = _pread_all(fd, pos - lo, lo).rfind(b"\n")
        if i >= 0:
            return lo + i + 1
        pos = lo
    return 0


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
    if isinstance(e, StorageError) or is_disk_full(e) or _corrupt(e):  # waiting does not fix these (a
        return False  # StorageError is a failure already waited for)
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


def _chain(e: BaseException | None):
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_disk_full(e: BaseException) -> bool:
    """A full disk anywhere in the cause chain: ``ENOSPC``/``EDQUOT``, or SQLite's "database or disk is full"."""
    return any((isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT))
               or "disk is full" in str(x).lower() for x in _chain(e))


def _corrupt(e: BaseException) -> bool:
    """SQLite's answer for a damaged or foreign file."""
    text = " ".join(str(x).lower() for x in _chain(e))
    return "file is not a database" in text or "disk image is malformed" in text


def disk_full_message(e: BaseException, where: str = "") -> str:
    """One line for a full disk: the file (or storage) and what to do."""
    name = next((x.filename for x in _chain(e) if isinstance(x, OSError) and x.filename), None)
    at = repr(str(name)) if name else repr(where) if where else "the output folder"
    return (f"no space left on the disk holding {at}; free some space (or point --storage / trainer.log_dir "
            f"elsewhere), then run the same command again (finished trials and checkpoints are kept)")


def failure(e: BaseException, where: str) -> StorageError | None:
    """The ``StorageError`` (one line: file or server, next step) for a storage failure the user can act on, or
    None for anything else (a logical error such as a missing study, or a bug)."""
    if isinstance(e, StorageError):
        return e
    shown = display_url(where)
    if is_disk_full(e):
        db = where.split(":///", 1)[-1] if where.startswith("sqlite") else where.removeprefix("journal:")
        return StorageError(disk_full_message(e, db))
    if _corrupt(e):
        db = where.split(":///", 1)[-1]
        return StorageError(f"{db!r} is not a readable SQLite database (corrupt or another kind of file); restore it "
                            f"from a backup, or move it aside and run the sweep again to start a new study")
    if transient(e):
        first = next((str(x).strip().splitlines()[0][:200] for x in _chain(e) if str(x).strip()), type(e).__name__)
        if where.startswith("sqlite"):
            return StorageError(f"the SQLite database {where.split(':///', 1)[-1]!r} could not be used ({first}); "
                                f"check that its folder is on a local disk and no other program holds it, then run "
                                f"the same command again (finished trials are kept)")
        return StorageError(f"lost the database {shown} for {patience():.0f} s ({first}); check that the server is "
                            f"running and reachable, then run the same command again (finished trials are kept; "
                            f"NORMABLATE_STORAGE_PATIENCE sets how long to wait)")
    return None


def retry(fn: Callable[[], T], tries: int | None = None, delay: float = 0.5, max_delay: float = 10.0,
          where: str | None = None) -> T:
    """Call ``fn``, retrying transient storage errors (see ``transient``) with backoff for up to ``patience()``
    seconds (or ``tries`` attempts). With ``where`` (the storage URL), a failure the user can act on (``failure``)
    is raised as a one-line ``StorageError``."""
    deadline = time.monotonic() + patience()
    i = 0
    while True:
        try:
            return fn()
        except Exception as e:
            if not transient(e) or time.monotonic() >= deadline or (tries is not None and i >= tries - 1):
                err = failure(e, where) if where is not None else None
                if err is not None and err is not e:
                    raise err from e
                raise
            if i == 2:
                log.warning("storage unavailable (%s); retrying for up to %.0f s", str(e).splitlines()[0][:200],
                            deadline - time.monotonic())
            time.sleep(min(max_delay, delay * 1.5 ** i))
            i += 1


def retrying(storage, url: str | None = None):
    """``storage`` with every public call retried through outages (``retry``); other attributes pass through.
    With ``url``, failures the user can act on are raised as ``StorageError`` naming it."""
    cls = _retrying_class()
    if isinstance(storage, cls):
        return storage
    obj = cls.__new__(cls)
    obj._inner = storage
    obj._where = url
    return obj


_RETRYING: type | None = None


def _retrying_class() -> type:
    global _RETRYING
    if _RETRYING is None:
        import optuna

        base = optuna.storages.BaseStorage

        def wrap(name: str):
            def method(self, *args, **kwargs):
                return retry(lambda: getattr(self._inner, name)(*args, **kwargs),
                             where=self.__dict__.get("_where"))

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
