"""SQLite persistence: the library's recorder extended with one-transaction writes.

Every write is one ``BEGIN IMMEDIATE`` transaction holding SQLite's write lock: it checks the
versions the decision was based on, appends the events to the library's ``stored_events``
table, inserts any key material, and applies the projections to the read models. So the
read models are always exactly as current as the stream, across processes, and a write
costs one commit. Connections keep a real statement cache and ``synchronous=FULL``.
"""

from __future__ import annotations

import functools
import os
import re
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, suppress
from typing import Any, Literal, TypeVar, cast
from uuid import UUID

from eventsourcing.persistence import (
    ConnectionPoolClosedError,
    IntegrityError,
    InterfaceError,
    PersistenceError,
    StoredEvent,
)
from eventsourcing.sqlite import (
    SQLiteAggregateRecorder,
    SQLiteApplicationRecorder,
    SQLiteConnection,
    SQLiteConnectionPool,
    SQLiteCursor,
    SQLiteDatastore,
    SQLiteFactory,
)
from eventsourcing.utils import Environment

from keyledger.errors import STORE_CLOSED, ShredIncomplete, StorageError
from keyledger.infrastructure import unit_writer
from keyledger.infrastructure.held_writes import (
    WRITE_OUTSIDE,
    HoldsWrites,
    PinnedReader,
    holding,
    in_savepoint,
)
from keyledger.infrastructure.lost_tables import settle_recreated
from keyledger.infrastructure.read_events import PendingRead
from keyledger.infrastructure.unit_writer import (
    check_expected,
    stale_version,
    write_reads,
    write_unit_rest,
)
from keyledger.infrastructure.write_unit import StaleStateError, WriteUnit
from keyledger.projections.schema import schema_statements, sqlite_index_statements

STATEMENT_CACHE_SIZE = 256


def _bind_none_and_bytes_directly() -> None:
    """Identity adapters for ``None`` and ``bytes`` in the sqlite3 module's registry.

    CPython's sqlite3 binds int, float, str and bytearray parameters directly, but looks
    every other one up in its adapter registry first; a miss there makes the protocol type
    raise, and then clear, an AttributeError: about 0.5 us per ``None`` or ``bytes``
    parameter, and a store binds several (its event's state, its catalog row's empty
    columns, its audit row's). An adapter found in the registry skips that. These return
    their argument unchanged (``{}.get(None)`` is None; ``bytes(b)`` is ``b`` itself), so
    no value bound anywhere in the process changes; an adapter registered already for
    either type, by the application or another library, is left in place.
    """
    protocol = sqlite3.PrepareProtocol
    if (type(None), protocol) not in sqlite3.adapters:
        nothing: dict[None, None] = {}
        sqlite3.register_adapter(type(None), nothing.get)
    if (bytes, protocol) not in sqlite3.adapters:
        sqlite3.register_adapter(bytes, bytes)


_bind_none_and_bytes_directly()
# _CLOSED_HERE: every cursor keyledger opens is closed where it was used, in the thread
# that owns its connection, also when an exception leaves. A cursor left to the garbage
# collector is finalised in whichever thread collects (an exception's traceback keeps its
# frame, and the frame the cursor, in a reference cycle); finalising a cursor whose
# statement is still in use resets it, which needs its connection's mutex. That
# connection's thread holds the mutex while it waits in BEGIN IMMEDIATE for the write
# lock; when the collecting thread was the one holding that lock, both waited until the
# busy timeout ran out ("database is locked", every writer stalled; found by a 32-thread
# stress review).
CLOSE_WAIT = 10.0  # how long close() waits for calls in progress before leaving it to them
T = TypeVar("T")


class KeyledgerSQLiteConnectionPool(SQLiteConnectionPool):
    """Opens connections with a statement cache, FULL durability and a busy timeout."""

    def _create_connection(self) -> SQLiteConnection:
        try:
            conn = sqlite3.connect(
                database=self.db_name,
                uri=True,
                check_same_thread=False,
                isolation_level=None,
                cached_statements=STATEMENT_CACHE_SIZE,
                timeout=self.lock_timeout or 30,
            )
        except (sqlite3.Error, TypeError) as e:
            raise InterfaceError(e) from e
        try:
            if not self.is_sqlite_memory_mode:
                _enter_wal_mode(conn, self.lock_timeout or 30)
                self.is_journal_mode_wal = True
            # A completed store or read must survive a power cut: fsync the WAL on commit.
            conn.execute("PRAGMA synchronous=FULL")
            # Destroyed key material must not linger in freed cells or free pages
            # (crypto-shredding): deleted content and freed pages are overwritten with zeros.
            conn.execute("PRAGMA secure_delete=ON")
        except sqlite3.Error as e:  # the first statement meets the file: not a database, say
            conn.close()
            raise InterfaceError(e) from e
        conn.row_factory = sqlite3.Row
        return KeyledgerSQLiteConnection(conn, max_age=self.max_age)


def _enter_wal_mode(conn: sqlite3.Connection, lock_timeout: float) -> None:
    """``PRAGMA journal_mode=WAL``, tried again while the file is locked, for up to the
    lock timeout. Switching a new file to WAL needs it to itself, and SQLite answers
    "database is locked" at once rather than waiting on the busy timeout: several
    processes opening a new file together failed within milliseconds (found by review).
    A file already in WAL mode answers without a lock."""
    deadline = time.monotonic() + lock_timeout
    pause = 0.001
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


class KeyledgerSQLiteConnection(SQLiteConnection):
    """The library's connection, with the sqlite3 connection it wraps in reach."""

    def __init__(self, sqlite_conn: sqlite3.Connection, max_age: float | None) -> None:
        super().__init__(sqlite_conn=sqlite_conn, max_age=max_age)
        self.raw = sqlite_conn


class KeyledgerSQLiteDatastore(SQLiteDatastore):
    """The library's datastore with keyledger's connection pool and per-thread writers."""

    def __init__(self, db_name: str, *, lock_timeout: int | None = None) -> None:
        # What close() (and so __del__) needs comes first: a failure below leaves an
        # object that is still collected quietly.
        self._all_writers: dict[int, KeyledgerSQLiteConnection] = {}
        self._writers_lock = threading.Lock()
        self._closed = False
        self._refusal = STORE_CLOSED  # why calls are refused once _closed is set
        # Set while a fork() waits for the calls in progress (see _before_fork); held by
        # the forking thread until the fork is done.
        self._forking = False
        self._fork_lock = threading.Lock()
        self._connections_closed = False  # (by close(), or by its last call's leave())
        # The calls using a connection now (see ``enter``): sqlite3 crashes the process
        # when a connection is closed under a statement another thread is running.
        self._start_afresh()
        # A file path, resolved once: connections opened later (a new thread's writer,
        # after a chdir) must open the same file, and SQLite puts the -wal and -shm
        # files beside the file a symlink names (both found by review).
        db_name = _resolved(db_name)
        _create_private(db_name)
        self.file = OpenedFile.at(db_name)
        if self.file_identity in _INHERITED_FILES:
            raise StorageError(forked_file(db_name))
        self.pool = _new_pool(db_name, lock_timeout)
        self.single_row_tracking = True
        self.originator_id_type: Literal["uuid", "text"] = "uuid"
        self._writers = threading.local()
        self.pinned = PinnedReader()  # (see held_writes)
        # (_all_writers, set first: every live thread's writer, by the id of its
        # _ThreadWriter; see thread_writer.)
        with _REGISTRY.lock:  # (complete: a fork from now on sees all it uses)
            _REGISTRY.datastores.add(self)

    def _start_afresh(self) -> None:
        """No call in progress: a new datastore, or one in a forked child, where the
        threads whose calls were in progress in the parent do not exist."""
        # The ident of each thread in a call that uses a connection (see ``enter``;
        # list.append and list.remove are atomic: no lock on every call).
        self._calls: list[int] = []
        self._closing_lock = threading.Lock()
        self._idle = threading.Event()
        self._close_left_to_last_user = False

    @property
    def file_identity(self) -> tuple[int, int] | None:
        """The (device, inode) of the file opened; None for a memory database."""
        return self.file.identity if self.file is not None else None

    def enter(self) -> None:
        """A call starts using this datastore's connections (``StorageError`` once it is
        closed); it must ``leave`` when it is done with them."""
        self._calls.append(threading.get_ident())  # (atomic: no lock on every call)
        if self._closed:  # (set before close() looks at the calls: it sees this one)
            self.leave()
            raise StorageError(self._refusal)
        if self._forking:  # (set before the fork looks at the calls: it sees this one)
            self._wait_for_the_fork()
        if self.file is not None and not self.file.in_place():
            self.leave()
            raise StorageError(self.file.gone())

    def check_log(self) -> None:
        """With a connection of this datastore open: ``StorageError`` when the file's
        write-ahead log or shared-memory file was deleted (see ``OpenedFile``)."""
        if self.file is not None and not self.file.has_log():
            raise StorageError(self.file.gone())

    def _wait_for_the_fork(self) -> None:
        """A call that starts while a fork() waits for the calls in progress starts after
        the fork; one nested in a call of its thread goes on (the fork waits for it)."""
        me = threading.get_ident()
        if _in_a_call(me, also_here=self):
            return
        self._calls.remove(me)
        with self._fork_lock:  # (held by the forking thread until the fork is done)
            pass
        self.enter()

    def leave(self) -> None:
        try:
            self._calls.remove(threading.get_ident())
        except ValueError:  # a call begun before a fork, ending in the child (whose
            return  # count started afresh): it was never counted here
        if not self._closed or self._calls:
            return
        self._idle.set()
        with self._closing_lock:
            closing = self._close_left_to_last_user
            self._close_left_to_last_user = False
        if closing:
            self._close_connections()

    @contextmanager
    def get_connection(self, *, commit: bool) -> Iterator[SQLiteConnection]:
        pinned = self.pinned.conn
        if pinned is not None:  # this thread holds a write transaction (held_writes)
            if commit:
                raise StorageError(WRITE_OUTSIDE)
            yield pinned
            return
        self.enter()
        try:
            with super().get_connection(commit=commit) as conn:
                yield conn
        finally:
            self.leave()

    @contextmanager
    def writer(self) -> Iterator[SQLiteConnection]:
        """A connection for one write transaction.

        On a file, each thread keeps its own writer connection: SQLite's ``BEGIN IMMEDIATE``
        already serialises writers (across processes too), so the pool's locks would only
        add cost. A shared-cache memory database goes through the pool, whose reader/writer
        interlock it needs.
        """
        if self.pool.is_sqlite_memory_mode:
            with self.get_connection(commit=True) as conn:
                yield conn
            return
        if self.pinned.conn is not None:  # this thread holds a write transaction
            raise StorageError(WRITE_OUTSIDE)
        self.enter()
        try:
            yield self.thread_writer()
        finally:
            self.leave()

    def thread_writer(self) -> KeyledgerSQLiteConnection:
        """This thread's own writer connection (files only: see ``writer``).

        It is closed when its thread ends (a server that starts a thread per request
        would otherwise keep two file descriptors open for every thread it ever ran),
        and when the datastore closes."""
        if self._closed:
            raise StorageError(self._refusal)
        holder: _ThreadWriter | None = getattr(self._writers, "holder", None)
        if holder is None:
            created = self.pool._create_connection()
            assert isinstance(created, KeyledgerSQLiteConnection)
            holder = self._writers.holder = _ThreadWriter(created)
            with self._writers_lock:
                self._all_writers[id(holder)] = created
            # The thread's locals go when it ends, and with them its only _ThreadWriter.
            # (The finalizer holds the registry, not the datastore: a datastore nobody
            # closed can still be collected while its writers' threads live on.)
            weakref.finalize(
                holder,
                _thread_ended,
                self._all_writers,
                self._writers_lock,
                id(holder),
                os.getpid(),
                self.file_identity,
            ).atexit = False
        return holder.conn

    def open_writers(self) -> int:
        """How many threads' writer connections are open (for tests and diagnostics)."""
        with self._writers_lock:
            return len(self._all_writers)

    def close(self) -> None:
        """Refuse new calls, wait (up to ``CLOSE_WAIT`` seconds) for the calls in progress,
        then close every connection. Calls still running then (a write waiting for another
        process's lock, say) keep theirs: the last of them to finish closes them."""
        with self._closing_lock:
            if self._closed:
                return
            self._closed = True
        # A call of this very thread (close() from a signal handler, or a callback) ends
        # only after close() returns: no wait for it, the call closes when it leaves.
        mine = threading.get_ident() in self._calls
        if self._calls and (mine or not self._idle.wait(CLOSE_WAIT)):
            with self._closing_lock:
                if self._calls:  # a call that leaves now finds the task under this lock
                    self._close_left_to_last_user = True
                    return
        self._close_connections()

    def _close_connections(self) -> None:
        # Counted: a fork waits for a close in progress, whose connections, half closed,
        # would leave a child SQLite's record of them (see _before_fork and _Closes).
        with _CLOSES.closing(self.file_identity):
            self._close_writers()
            if hasattr(self, "pool"):  # (none when the file could not be created)
                super().close()
            self._connections_closed = True

    # -- fork() ------------------------------------------------------------------------

    def _close_connections_for_fork(self) -> None:
        """Close every connection, to be opened again when next needed: a child then
        inherits no open connection to the file, and no SQLite lock bookkeeping."""
        self._close_writers()
        self._writers = threading.local()  # (each thread opens a new writer when it next writes)
        self.pool.close()
        self.pool = _new_pool(self.pool.db_name, self.pool.lock_timeout)

    def _close_writers(self) -> None:
        # Closed outside the lock: a signal handler or a finaliser can close this
        # datastore in the middle (found by review: a handler's close() deadlocked a fork).
        with self._writers_lock:
            writers = list(self._all_writers.values())
            self._all_writers.clear()
        for conn in writers:
            conn.close()

    def _refuse_in_child(self, reason: str) -> None:
        """In a child forked with connections to this datastore's file open (its own, or
        others'): refuse every call for ``reason`` (and never close them: that could roll
        back or checkpoint the parent's work). One its parent had closed says so still."""
        if not self._closed:
            self._refusal = reason
            self._closed = True


def _new_pool(db_name: str, lock_timeout: int | None) -> KeyledgerSQLiteConnectionPool:
    return KeyledgerSQLiteConnectionPool(
        db_name=db_name, lock_timeout=lock_timeout, pool_size=5, max_overflow=10
    )


FORKED_OPEN = (
    f"this service's SQLite connections were open when the process forked (another "
    f"thread's call did not end within {CLOSE_WAIT:g} s, or the fork came from inside a "
    f"keyledger call), and SQLite forbids a child to use them, or that file: fork "
    f"when no call is in progress (or before opening the service), or start the "
    f"process with spawn"
)


def forked_file(path: str) -> str:
    """Why a forked child may not open ``path``: see ``_INHERITED_FILES``."""
    return (
        f"this process was forked while its parent had connections to the SQLite "
        f"database {path} open, and SQLite forbids a child to use that file: the record "
        f"of the parent's locks it inherited would let the parent delete the log under "
        f"the child's writes; fork when no call is in progress (or before opening the "
        f"service), or start the process with spawn"
    )


# The files (device, inode) a forked child inherited open connections to: SQLite shares
# one record of a file's locks among a process's connections, so a connection the child
# opens beside the inherited ones would hold no real lock (see _before_fork).
_INHERITED_FILES: set[tuple[int, int]] = set()


class _Registry:
    """Every SQLite datastore of the process (a fork must see each, complete)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.datastores: weakref.WeakSet[KeyledgerSQLiteDatastore] = weakref.WeakSet()

    def all(self) -> list[KeyledgerSQLiteDatastore]:
        with self.lock:  # (a WeakSet changing while it is listed raises)
            return list(self.datastores)


_REGISTRY = _Registry()


def _in_a_call(ident: int, also_here: KeyledgerSQLiteDatastore | None = None) -> bool:
    """Whether thread ``ident`` is in a call of any datastore (in ``also_here``: in one
    besides the call it is starting)."""
    return any(
        datastore._calls.count(ident) > (datastore is also_here) for datastore in _REGISTRY.all()
    )


class _Closes:
    """The SQLite closes in progress in this process, by file. A fork waits (within its
    bound) for them to end; a forked child refuses the files its copy of them names,
    which are exactly those being closed at the instant of the fork.

    Nothing here waits for a fork, and the lock is reentrant: the collector can run a
    finaliser that closes a datastore wherever an allocation starts it, also while this
    lock is held or while the thread holds another lock a fork needs (a first version,
    in which a close started during a fork waited for it, deadlocked both ways: found by
    review)."""

    def __init__(self) -> None:
        self._changed = threading.Condition(threading.RLock())
        self._files: dict[tuple[int, int] | None, int] = {}

    @contextmanager
    def closing(self, identity: tuple[int, int] | None) -> Iterator[None]:
        with self._changed:
            self._files[identity] = self._files.get(identity, 0) + 1
        try:
            yield
        finally:
            with self._changed:
                left = self._files[identity] - 1
                if left:
                    self._files[identity] = left
                else:
                    del self._files[identity]
                self._changed.notify_all()

    def wait_until_none(self, deadline: float) -> None:
        """Wait (until ``deadline``) for the closes in progress to end."""
        with self._changed:
            while self._files and time.monotonic() < deadline:
                self._changed.wait(max(0.0, deadline - time.monotonic()))

    def in_progress(self) -> set[tuple[int, int]]:
        """The files being closed now (in a child: at the instant of the fork; read
        without the lock, which the fork may have copied held)."""
        return {identity for identity in list(self._files) if identity is not None}


_CLOSES = _Closes()


class _Fork(threading.local):
    """What this thread's fork() holds, and what its child must refuse."""

    held: list[KeyledgerSQLiteDatastore]
    left_open: list[KeyledgerSQLiteDatastore]

    def __init__(self) -> None:
        self.held, self.left_open = [], []


_FORK = _Fork()


def _before_fork() -> None:
    """Make a fork() safe for every SQLite file of the process: new calls wait, the calls
    in progress end (up to ``CLOSE_WAIT`` seconds in all), then every connection is
    closed.

    SQLite keeps the state of a process's connections to a file (its locks above all) in
    memory that a child inherits but must not use (https://sqlite.org/howtocorrupt.html,
    2.6): a child using inherited connections, or new ones beside that state, held no
    real lock on the file, so the parent's last close deleted the WAL under it and its
    commits were lost, and a child forked during another thread's write could never
    write (both found by review). With no connection open, there is no such state.

    A datastore whose connections cannot be closed in time (a call of another thread
    outlasts the wait, the forking thread is in a call of its own, another thread's
    fork holds it) stays as it is in the parent, and refuses every call in the child
    (``FORKED_OPEN``): losing a child's writes silently is what this prevents."""
    deadline = time.monotonic() + CLOSE_WAIT
    fork = _FORK
    fork.held, fork.left_open = [], []
    datastores = [d for d in _REGISTRY.all() if not d.pool.is_sqlite_memory_mode]
    for datastore in sorted(datastores, key=id):  # (two forking threads: one order)
        if datastore._closed:  # (looked at again once closes in progress have ended)
            continue
        if datastore._fork_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            datastore._forking = True
            fork.held.append(datastore)
        else:
            fork.left_open.append(datastore)
    me = threading.get_ident()
    waiting: list[KeyledgerSQLiteDatastore] = []
    for datastore in fork.held:
        (fork.left_open if me in datastore._calls else waiting).append(datastore)
    while waiting:
        waiting = [datastore for datastore in waiting if datastore._calls]
        if not waiting or time.monotonic() > deadline:
            break
        time.sleep(0.001)
    fork.left_open.extend(waiting)
    for datastore in fork.held:
        if datastore not in fork.left_open:
            datastore._close_connections_for_fork()
    # Closes in progress in other threads (an ending thread's writer, a close(), a
    # service the garbage collector finalises) end first; a file still being closed
    # at the fork is refused in the child (_after_fork_in_child).
    _CLOSES.wait_until_none(deadline)
    for datastore in datastores:  # closed, its connections left to calls in progress
        closed_open = datastore._closed and not datastore._connections_closed
        if closed_open and datastore not in fork.held and datastore not in fork.left_open:
            fork.left_open.append(datastore)


def _after_fork_in_parent() -> None:
    for datastore in _FORK.held:
        datastore._forking = False
        datastore._fork_lock.release()
    _FORK.held, _FORK.left_open = [], []


def _after_fork_in_child() -> None:
    """Refuse, in this child, every file with a connection open or half closed at the
    instant of the fork, as this process's copy of the parent's memory shows them: the
    datastores the fork left open, those with a call in progress (a call nested in
    another slips past the fork's wait: found by review), and the closes in progress.
    Every datastore on such a file is refused, and so is a service opened on it later:
    SQLite would share the inherited record of the parent's connections with theirs."""
    global _CLOSES
    _REGISTRY.lock = threading.Lock()  # (another thread may have held it at the fork)
    datastores = list(_REGISTRY.datastores)
    open_at_fork = [*_FORK.left_open, *(d for d in datastores if d._calls)]
    _INHERITED_FILES.update(_CLOSES.in_progress())
    _CLOSES = _Closes()  # (the closes in progress were the parent's threads')
    for datastore in datastores:
        datastore._start_afresh()
        datastore._forking = False
        datastore._fork_lock = threading.Lock()
    for datastore in open_at_fork:
        datastore._refuse_in_child(FORKED_OPEN)
        if datastore.file is not None:
            _INHERITED_FILES.add(datastore.file.identity)
    for datastore in datastores:
        if datastore.file is not None and datastore.file.identity in _INHERITED_FILES:
            datastore._refuse_in_child(forked_file(datastore.file.path))
    _FORK.held, _FORK.left_open = [], []


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)


def _thread_ended(
    writers: dict[int, KeyledgerSQLiteConnection],
    lock: threading.Lock,
    key: int,
    pid: int,
    identity: tuple[int, int] | None,
) -> None:
    """Close the writer of a thread that ended. Not in a forked child: the connections
    it inherited belong to the parent's threads (SQLite forbids using them in a child,
    and closing one there could roll back or checkpoint into the parent's WAL); nor
    does the child take ``lock``, which the fork may have copied held.

    The close is counted as one in progress (``_CLOSES``), which a fork waits for and
    a child refuses the file of: a fork landing in the middle of it (sqlite3 lets other
    threads run while it closes) left the child SQLite's record of a connection that
    the parent then finished closing, deleting the log under the child's first write
    (found as a CI failure). It is not made under ``lock``: closing can run the garbage
    collector, whose finalisers may close a datastore, which takes that lock (found by
    review)."""
    if os.getpid() != pid:
        conn = writers.pop(key, None)
        if conn is not None:  # kept, never closed: freeing it would close it (sqlite3
            _INHERITED.append(conn)  # closes on dealloc)
        return
    with _CLOSES.closing(identity):
        with lock:
            conn = writers.pop(key, None)
        if conn is not None:
            conn.close()


_INHERITED: list[KeyledgerSQLiteConnection] = []  # a forked child's, from its parent


class _ThreadWriter:
    """A thread's writer connection, held only by that thread's locals: when the thread
    ends, this object is freed and a finalizer closes the connection."""

    __slots__ = ("__weakref__", "conn")

    def __init__(self, conn: KeyledgerSQLiteConnection) -> None:
        self.conn = conn


class _CreatesTablesUnderWriteLock:
    """Create tables in a ``BEGIN IMMEDIATE`` transaction.

    The library creates them in a deferred transaction, which fails at once with "database
    is locked" when several processes open a new file together (a deferred transaction
    that read first cannot wait for the write lock). Taking the write lock first makes the
    others wait their turn, and ``IF NOT EXISTS`` makes their turn a no-op.
    """

    datastore: SQLiteDatastore
    create_table_statements: list[str]

    def create_table(self) -> None:
        datastore = self.datastore
        assert isinstance(datastore, KeyledgerSQLiteDatastore)
        with datastore.writer() as conn:
            curs = conn.cursor()
            try:
                # Looked at first, without the write lock: opening a complete store (a
                # read-only command while a long write runs, say) must not wait for it.
                if self._schema_complete(curs):
                    return
                curs.execute("BEGIN IMMEDIATE")
                curs.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                present = {row[0] for row in curs.fetchall()}
                for statement in self.create_table_statements:
                    curs.execute(statement)
                self._create_indexes(curs)
                self._settle_recreated(curs, present)
                conn.commit()
            except BaseException as error:
                conn.rollback()
                raise _translate(error) from None
            finally:
                curs.sqlite_cursor.close()  # (see _CLOSED_HERE)

    def _create_indexes(self, curs: Any) -> None:
        """Indexes whose names depend on what is there (none by default)."""

    def _settle_recreated(self, curs: Any, present: set[str]) -> None:
        """After creating tables, ``present`` the tables there before (see lost_tables)."""

    def _schema_complete(self, curs: Any) -> bool:
        """Whether every statement of ``create_table_statements`` would do nothing."""
        curs.execute("SELECT name FROM sqlite_master")
        present = {row[0] for row in curs.fetchall()}
        rows: set[str] = set()
        for statement in self.create_table_statements:
            created = _CREATED.match(statement)
            tracked = _TRACKING_ROW.match(statement)
            if created is not None:
                if created.group(1) not in present:
                    return False
            elif tracked is not None:
                rows.add(tracked.group(1))
            else:  # a statement this check does not know: run them all
                return False
        if rows:
            curs.execute("SELECT name FROM kl_tracking")
            if not rows <= {row[0] for row in curs.fetchall()}:
                return False
        return self._indexes_complete(curs)

    def _indexes_complete(self, curs: Any) -> bool:
        return True


_CREATED = re.compile(r"\s*CREATE (?:TABLE|INDEX) IF NOT EXISTS (\w+)")
_TRACKING_ROW = re.compile(r"\s*INSERT INTO kl_tracking \(name, position\) VALUES \('(\w+)', 0\)")


class KeyledgerSQLiteSnapshotRecorder(_CreatesTablesUnderWriteLock, SQLiteAggregateRecorder):
    """The library's snapshot recorder, creating its table under the write lock."""


class KeyledgerSQLiteRecorder(HoldsWrites, _CreatesTablesUnderWriteLock, SQLiteApplicationRecorder):
    """Application recorder whose ``insert_events`` is the whole write unit."""

    position_column = "rowid"
    dialect: Literal["sqlite", "postgres"] = "sqlite"

    @contextmanager
    def exclusively(self) -> Iterator[bool]:
        """This thread's writes, until the block ends, in one ``BEGIN IMMEDIATE``
        transaction taken first, and its reads on a pool connection taken before that
        (see held_writes): what the block reads cannot move on before it commits. It
        commits when the block ends, also when the block raises (what its writes made,
        as each would have committed alone). Yields False, holding nothing, on the
        shared-cache memory database (its pool's interlock would keep the block's reads
        waiting for its write) and when this thread holds one already."""
        datastore = self._datastore
        if datastore.pool.is_sqlite_memory_mode or self._held.cursor is not None:
            yield False
            return
        lock_timeout = datastore.pool.lock_timeout or 30
        with self._gate.held(lock_timeout), _pinnable_reader(datastore) as reader:
            datastore.enter()  # (its leave() is in the finally below)
            try:
                try:
                    conn = datastore.thread_writer().raw
                except InterfaceError as error:
                    raise _translate(error) from None
                datastore.check_log()
                cur = conn.cursor()
                try:
                    try:
                        cur.execute("BEGIN IMMEDIATE")
                    except BaseException as error:
                        raise _translate(error) from None
                    with holding(
                        self._held, datastore.pinned, cur, reader, lambda: _end_held(conn)
                    ) as held:
                        yield held
                finally:
                    if conn.in_transaction:  # (an interrupt between BEGIN and the block)
                        with suppress(sqlite3.Error):
                            conn.rollback()
                    cur.close()  # here, in this connection's thread (see _CLOSED_HERE)
            finally:
                datastore.leave()

    def construct_create_table_statements(self) -> list[str]:
        return [
            *super().construct_create_table_statements(),
            *schema_statements("sqlite"),
        ]

    def _create_indexes(self, curs: Any) -> None:
        for statement in sqlite_index_statements(curs):
            curs.execute(statement)

    def _indexes_complete(self, curs: Any) -> bool:
        return not sqlite_index_statements(curs)

    def _settle_recreated(self, curs: Any, present: set[str]) -> None:
        def run(statement: str, params: tuple[Any, ...]) -> list[Any]:
            curs.execute(statement, params)
            return list(curs.fetchall())

        settle_recreated(run, present, self.events_table_name)

    @staticmethod
    def id_param(aggregate_id: UUID) -> str:
        return aggregate_id.hex

    @property
    def _datastore(self) -> KeyledgerSQLiteDatastore:
        datastore = self.datastore
        assert isinstance(datastore, KeyledgerSQLiteDatastore)
        return datastore

    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        unit: WriteUnit = kwargs.get("unit") or WriteUnit()

        def write(cur: Any) -> list[int]:
            check_expected(unit, lambda ids: self._versions(cur, ids))
            positions = self._appended_positions(cur, stored_events)
            write_unit_rest(cur, unit, positions)
            return positions

        return self._in_write_transaction(write)

    def insert_reads(self, batch: Sequence[PendingRead]) -> list[BaseException | None]:
        """A batch of reads in one transaction (the hot path of every retrieve)."""
        if len(batch) == 1 and 1 <= len(batch[0].expected) <= 2:
            read = batch[0]
            return [self._in_write_transaction(lambda cur: self._write_lone_read(cur, read))]
        return self._in_write_transaction(
            lambda cur: write_reads(
                cur,
                batch,
                versions_of=lambda ids: self._versions(cur, ids),
                append=lambda events: self._appended_positions(cur, events),
            )
        )

    def _write_lone_read(self, cur: Any, read: PendingRead) -> BaseException | None:
        """One read, its version checks folded into its access count's UPDATE: one
        statement fewer than checking first. A read that counted nothing is either
        stale or of a secret without a catalog row; a probe tells which."""
        raw = getattr(cur, "sqlite_cursor", cur)  # the memory store's cursor wrapper
        params: list[Any] = [read.at, read.tenant_id, read.secret_name]
        for aggregate_id, version in read.expected.items():
            params += (aggregate_id.hex, version)
        raw.execute(self._counted_read_statements[len(read.expected)], params)
        row = raw.fetchone()
        if row is None:
            stale = stale_version(read.expected, self._versions(raw, list(read.expected)))
            if stale is not None:
                return StaleStateError(stale)
        else:
            read.access_count, read.last_accessed_at = int(row[0]), read.at
        stored = read.stored  # the library's append of one event, without its layers
        raw.execute(
            self.insert_events_statement,
            (stored.originator_id.hex, stored.originator_version, stored.topic, stored.state),  # type: ignore[union-attr]
        )
        read.position = raw.lastrowid
        return None

    @functools.cached_property
    def _counted_read_statements(self) -> dict[int, str]:
        """The access count's UPDATE of a read, by the number of versions it checks."""
        check = (
            f"COALESCE((SELECT MAX(originator_version) FROM {self.events_table_name} "
            "WHERE originator_id=?), 0)=?"
        )
        return {
            # The latest read's time (see catalog._LATEST), in SQLite's two-argument MAX
            # (times are positive: a NULL, never read, loses to any).
            n: "UPDATE kl_catalog SET access_count=access_count+1, "
            "last_accessed_at=MAX(IFNULL(last_accessed_at, 0), ?) "
            f"WHERE tenant_id=? AND name=? AND {' AND '.join([check] * n)} "
            "RETURNING access_count"
            for n in (1, 2)
        }

    def _in_write_transaction(self, write: Callable[[Any], T]) -> T:
        """``write(cursor)`` in one ``BEGIN IMMEDIATE`` transaction. On a file it goes to
        this thread's sqlite3 connection directly, with no context managers or cursor
        wrappers (a tenth of a retrieve's time); the shared-cache memory database goes
        through ``writing()`` and the pool's interlock it needs."""
        held = self._held.cursor
        if held is not None:  # this thread holds a write transaction (see exclusively)
            try:
                return in_savepoint(held, write, errors=sqlite3.Error)
            except BaseException as error:
                raise _translate(error) from None
        datastore = self._datastore
        if datastore.pool.is_sqlite_memory_mode:
            with self.writing() as curs:
                return write(curs)
        datastore.enter()  # (its leave() is in the finally below)
        try:
            try:
                conn = datastore.thread_writer().raw
            except InterfaceError as error:  # this thread's first writer could not be opened
                raise _translate(error) from None
            datastore.check_log()
            cur = conn.cursor()
            committing = False
            try:
                cur.execute("BEGIN IMMEDIATE")
                result = write(cur)
                committing = True
                conn.commit()
                return result
            except BaseException as error:
                conn.rollback()
                raise _translate(error, committing=committing) from None
            finally:
                cur.close()  # here, in this connection's thread (see _CLOSED_HERE)
        finally:
            datastore.leave()

    def _appended_positions(self, cur: Any, events: Sequence[StoredEvent]) -> list[int]:
        """The library's append (a sqlite3 cursor serves as well as its wrapper): the
        rowids of the events are their positions."""
        return list(self._insert_events(cur, events) or ())

    @functools.cached_property
    def _probe_statements(self) -> dict[int, str]:
        """``SELECT`` of the newest version of 1 to 4 aggregates at once, by count."""
        probe = (
            f"(SELECT MAX(originator_version) FROM {self.events_table_name} WHERE originator_id=?)"
        )
        return {n: "SELECT " + ", ".join([probe] * n) for n in range(1, 5)}

    def _versions(self, cur: Any, aggregate_ids: list[UUID]) -> dict[UUID, int]:
        """The newest version of each aggregate (0: none): primary-key probes, up to four
        in one statement (cheaper in SQLite than an IN/GROUP BY)."""
        if len(aggregate_ids) == 1:  # a store's keyring, say: the common case, unrolled
            cur.execute(self._probe_statements[1], (aggregate_ids[0].hex,))
            return {aggregate_ids[0]: int(cur.fetchone()[0] or 0)}
        versions: dict[UUID, int] = {}
        for start in range(0, len(aggregate_ids), 4):
            chunk = aggregate_ids[start : start + 4]
            cur.execute(self._probe_statements[len(chunk)], [a.hex for a in chunk])
            for aggregate_id, version in zip(chunk, cur.fetchone(), strict=True):
                versions[aggregate_id] = int(version or 0)
        return versions

    def shred(self) -> None:
        """Deleted rows were overwritten in place (secure_delete); the WAL may still hold
        older copies of their pages until a checkpoint truncates it. A reader of an older
        snapshot (another process's open transaction) keeps the checkpoint from finishing:
        it is tried again for a while, then ``ShredIncomplete``. Each try runs without a
        busy handler, so it never holds the write lock while it waits: writers go on
        between tries. A store error (a full disk, an I/O error) is ``StorageError``,
        which the ledger reports as ``ShredIncomplete``: the deletion itself committed."""
        try:
            self._checkpoint_truncated()
        except (sqlite3.Error, InterfaceError) as error:
            raise _translate(error) from None

    def _checkpoint_truncated(self) -> None:
        deadline = time.monotonic() + unit_writer.SHRED_PATIENCE_SECONDS
        with self._datastore.writer() as conn:
            cursor = conn.cursor()
            cursor.execute("PRAGMA busy_timeout")
            (patience_ms,) = cursor.fetchone()
            cursor.execute("PRAGMA busy_timeout=0")
            try:
                while True:
                    cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                    busy, _, _ = cursor.fetchone()
                    if not busy:
                        return
                    if time.monotonic() >= deadline:
                        raise ShredIncomplete(
                            "the SQLite write-ahead log, which may still hold copies of "
                            "deleted or replaced key material, could not be truncated: "
                            "another connection kept it in use (a reader of an older "
                            "snapshot, or a writer's transaction); what deleted the "
                            "material is done; run `keyledger db shred` again"
                        )
                    time.sleep(0.05)
            finally:
                with suppress(sqlite3.Error):  # (not to hide why the checkpoint failed)
                    cursor.execute(f"PRAGMA busy_timeout={int(patience_ms)}")
                cursor.sqlite_cursor.close()  # (see _CLOSED_HERE)

    def backup(self, target: str) -> None:
        """SQLite's online backup from a reader: a consistent snapshot of the database
        and what its write-ahead log holds, while writers go on. A copy of the database
        file alone can be an empty store: in WAL mode recent writes live in the log
        (found by review). The new file is readable by its owner only, and is never
        written over: it holds every wrapped key and every ciphertext."""
        if os.path.lexists(target):
            raise StorageError(f"{target} exists: back up into a new file")
        own = self._datastore.file
        if own is not None and os.path.realpath(target).startswith(own.path + "-"):
            # (a -journal, -wal or -shm of the store itself: SQLite deletes or replays it)
            raise StorageError(f"{target} is one of the store's own files: choose another")
        try:
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError as error:
            raise StorageError(
                f"cannot create the backup file {target}: {error.strerror}"
            ) from None
        try:
            with self._datastore.get_connection(commit=False) as conn:
                copy = sqlite3.connect(target)
                try:
                    cast(KeyledgerSQLiteConnection, conn).raw.backup(copy)
                finally:
                    copy.close()
        except BaseException as error:
            for leftover in (target, target + "-journal"):  # (no half copy left behind)
                with suppress(OSError):
                    os.unlink(leftover)
            if isinstance(error, sqlite3.Error | InterfaceError):
                raise StorageError(f"the backup into {target} failed: {error}") from None
            raise

    @staticmethod
    def wait_for_events(seconds: float) -> None:
        # SQLite has no notifications: the projection worker polls.
        time.sleep(seconds)

    @contextmanager
    def reading(self) -> Iterator[SQLiteCursor]:
        try:
            with self.datastore.transaction(commit=False) as curs:
                try:
                    yield curs
                finally:
                    curs.sqlite_cursor.close()  # (see _CLOSED_HERE)
        except ConnectionPoolClosedError:
            raise StorageError(STORE_CLOSED) from None
        except (sqlite3.Error, PersistenceError) as error:
            raise StorageError(f"SQLite read failed: {error}") from None

    def projecting(self) -> AbstractContextManager[SQLiteCursor]:
        # SQLite has one writer at a time anyway: maintenance takes the write lock.
        return self.writing()

    @staticmethod
    def hold_maintainers(cur: Any) -> None:
        # Maintainers take the write lock (``projecting``): a writer excludes them already.
        return None

    @contextmanager
    def writing(self) -> Iterator[SQLiteCursor]:
        try:
            with self._datastore.writer() as conn:
                self._datastore.check_log()  # (maintenance writes too: found by review)
                curs = conn.cursor()
                try:
                    curs.execute("BEGIN IMMEDIATE")
                    yield curs
                    conn.commit()
                except BaseException as error:
                    conn.rollback()
                    raise _translate(error) from None
                finally:
                    curs.sqlite_cursor.close()  # (see _CLOSED_HERE)
        except InterfaceError as error:  # this thread's writer could not be opened
            raise _translate(error) from None
        except ConnectionPoolClosedError:  # (the memory store's writes take the pool)
            raise StorageError(STORE_CLOSED) from None


def _translate(error: BaseException, *, committing: bool = False) -> BaseException:
    if isinstance(error, sqlite3.IntegrityError):
        return IntegrityError(error)
    if committing and _is_io_error(error):
        # The commit wrote the transaction to the write-ahead log, then its flush failed:
        # SQLite recovers what reached the log when the store is next opened, so the
        # write may be there after all (found by review, with a failing fsync).
        return StorageError(
            f"SQLite store unavailable: {error} while committing: the outcome is unknown "
            "(what reached the write-ahead log before the disk failed is recovered the "
            "next time the store is opened)"
        )
    if isinstance(error, sqlite3.OperationalError | InterfaceError):  # (a connection failed)
        return StorageError(f"SQLite store unavailable: {error}")
    if isinstance(error, sqlite3.Error):
        return StorageError(f"SQLite error: {error}")
    return error


def _is_io_error(error: BaseException) -> bool:
    """Whether ``error`` is SQLite's I/O error (SQLITE_IOERR, any of its extended codes)."""
    code = getattr(error, "sqlite_errorcode", None)
    return (
        isinstance(error, sqlite3.Error)
        and code is not None
        and code & 0xFF == sqlite3.SQLITE_IOERR
    )


@contextmanager
def _pinnable_reader(datastore: KeyledgerSQLiteDatastore) -> Iterator[SQLiteConnection]:
    """A pool reader for a held transaction's reads; the pool's refusals as keyledger's
    (only the taking is translated: the block's own errors pass as they are)."""
    stack = ExitStack()
    try:
        reader = stack.enter_context(datastore.get_connection(commit=False))
    except ConnectionPoolClosedError:
        raise StorageError(STORE_CLOSED) from None
    except PersistenceError as error:  # the pool's wait for a connection ran out, say
        raise StorageError(f"SQLite store unavailable: {error}") from None
    with stack:
        yield reader


def _end_held(conn: sqlite3.Connection) -> BaseException | None:
    """Commit a held transaction: None, or (rolled back) why it did not commit."""
    try:
        conn.commit()
    except sqlite3.Error as error:
        with suppress(sqlite3.Error):
            conn.rollback()
        return _translate(error, committing=True)  # (a flush that failed: see _translate)
    return None


class OpenedFile:
    """The database file a datastore opened, so that a file deleted, moved or replaced
    under a running service is noticed (found by review: SQLite in WAL mode notices
    neither, and went on committing into the unlinked file; every store, rotation and
    audited read made after an ``rm keyledger.db`` or ``rm keyledger.db-wal`` was gone
    once the process ended, while other processes opened a new, empty store)."""

    def __init__(self, path: str, identity: tuple[int, int]) -> None:
        self.path = path
        self.log = path + "-wal"
        self.shared_memory = path + "-shm"  # (SQLite's record of locks and of the log)
        self.identity = identity

    @classmethod
    def at(cls, db_name: str) -> OpenedFile | None:
        """The file ``db_name`` names now; None for a memory database (a URI), or a path
        that does not exist (SQLite reports that when it opens it)."""
        if not _is_file_path(db_name):
            return None
        try:
            found = os.stat(db_name)
        except OSError:
            return None
        return cls(db_name, (found.st_dev, found.st_ino))

    def in_place(self) -> bool:
        """Whether the path still names the file opened (about a microsecond)."""
        try:
            found = os.stat(self.path)
        except OSError:
            return False
        return (found.st_dev, found.st_ino) == self.identity

    def has_log(self) -> bool:
        """Whether the write-ahead log and the shared-memory file are there. Asked with a
        connection open: SQLite deletes them only when the last connection to the
        database closes. (A -shm deleted under running processes corrupted the file
        once another process made a new one: found by review. Deleted and made again
        by another process before this one asks, they are not noticed.)"""
        exists = os.F_OK  # (access builds no stat result: half the cost of a stat)
        return os.access(self.log, exists) and os.access(self.shared_memory, exists)

    def gone(self) -> str:
        """Why calls are refused while the file is not in place."""
        return (
            f"the SQLite database {self.path} (or its write-ahead log, {self.log}) was "
            "deleted, moved or replaced while this service had it open: what it wrote "
            "from then on would be lost; put the file back, or close this service and "
            "open a new one (restoring the store from a backup if the file is lost); "
            "never delete, move or replace the files of a store in use"
        )


def _is_file_path(db_name: str) -> bool:
    """Whether ``db_name`` is a file's path, not a URI or a memory database."""
    return not db_name.startswith("file:") and db_name != ":memory:"


def _resolved(db_name: str) -> str:
    """A file path made absolute with its symlinks and ``..`` resolved; a URI or a memory
    database as it is."""
    return os.path.realpath(db_name) if _is_file_path(db_name) else db_name


def _create_private(db_name: str) -> None:
    """Create a new database file readable and writable by its owner only (0600, less
    what the umask takes away); SQLite gives the WAL and shared-memory files it creates
    beside it the same mode. An existing file, or a URI (a memory database), is left as
    it is; a file that cannot be created is reported by SQLite when it opens it."""
    if not _is_file_path(db_name):
        return
    try:
        os.close(os.open(db_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError:  # FileExistsError, or no such directory: SQLite says what is wrong
        return


class KeyledgerSQLiteFactory(SQLiteFactory):
    """Infrastructure factory selected with PERSISTENCE_MODULE (see ledger.py)."""

    application_recorder_class = KeyledgerSQLiteRecorder
    aggregate_recorder_class = KeyledgerSQLiteSnapshotRecorder

    def __init__(self, env: Environment | dict[str, str] | None) -> None:
        super(SQLiteFactory, self).__init__(env)
        db_name = self.env.get(self.SQLITE_DBNAME)
        if not db_name:
            raise OSError("SQLITE_DBNAME is required")
        timeout = self.env.get(self.SQLITE_LOCK_TIMEOUT)
        self.datastore = KeyledgerSQLiteDatastore(
            db_name, lock_timeout=int(timeout) if timeout else None
        )
