"""PostgreSQL connections across ``fork()``: the child gets its own, the parent keeps its.

Servers that load the application once and then fork their workers (gunicorn
``--preload``, Celery's prefork pool, ``multiprocessing`` with the fork start method) hand
each child the parent's service, and with it the pool's open connections: the child's
copies of the sockets lead to the parent's server sessions. A child that used them read
the answers to the parent's queries (both could then hang, or fail with untyped errors),
and one that merely exited ended them: libpq says goodbye to the server when a connection
is closed, whichever process closes it.

So, in the child, right after the fork: every connection the pools opened has its socket
replaced by ``/dev/null`` (``dup2`` on the child's descriptor: the parent's socket is
untouched, and whatever the child's copy of the connection later sends goes nowhere), and
every datastore gets a new, unopened pool with the same settings, which opens connections
of the child's own on first use. The inherited pools and connections are kept referenced
and never used again. Prepared statements are kept per connection object
(``pg_prepared``), so the child's new connections prepare their own.
"""

from __future__ import annotations

import inspect
import os
import weakref
from typing import Any

# Datastores made in this process, and every connection their pools opened.
_DATASTORES: weakref.WeakSet[Any] = weakref.WeakSet()
_CONNECTIONS: weakref.WeakSet[Any] = weakref.WeakSet()
# What a forked child inherited: kept (never closed, never used) so that no finaliser
# touches it; each connection's socket is /dev/null in the child anyway.
_INHERITED: list[Any] = []

# The pool's constructor parameters, each read from the pool it is given (psycopg_pool's
# attributes; ``get_password_func`` is the library's subclass's). ``conninfo`` is passed
# by position and ``open`` is always False: a fork's pool opens on first use.
POOL_PARAMETERS = {
    "connection_class": "connection_class",
    "kwargs": "kwargs",
    "min_size": "min_size",
    "max_size": "max_size",
    "configure": "_configure",
    "check": "_check",
    "reset": "_reset",
    "name": "name",
    "close_returns": "close_returns",
    "timeout": "timeout",
    "max_waiting": "max_waiting",
    "max_lifetime": "max_lifetime",
    "max_idle": "max_idle",
    "reconnect_timeout": "reconnect_timeout",
    "reconnect_failed": "_reconnect_failed",
    "num_workers": "num_workers",
    "get_password_func": "get_password_func",
}


def track(datastore: Any) -> None:
    """Follow ``datastore`` and the connections its pool opens, for a fork's child."""
    pool = datastore.pool
    configure = pool._configure

    def configure_and_track(conn: Any) -> None:
        _CONNECTIONS.add(conn)
        if configure is not None:
            configure(conn)

    pool._configure = configure_and_track
    _DATASTORES.add(datastore)


_CLOSED: weakref.WeakSet[Any] = weakref.WeakSet()  # datastores their service closed


def mark_closed(datastore: Any) -> None:
    """``datastore``'s service is closing: its pool is never opened again, nor replaced
    in a forked child."""
    _CLOSED.add(datastore)


def is_closed(datastore: Any) -> bool:
    """Whether ``datastore``'s service was closed (``mark_closed``)."""
    return datastore in _CLOSED


def fresh_pool(old: Any) -> Any:
    """A new, unopened pool with ``old``'s settings."""
    arguments = {name: getattr(old, attribute) for name, attribute in POOL_PARAMETERS.items()}
    return type(old)(old.conninfo, open=False, **arguments)


def unknown_pool_parameters(pool_class: type) -> set[str]:
    """Constructor parameters of ``pool_class`` that ``fresh_pool`` would not carry over
    (a newer psycopg_pool's): a unit test holds this empty."""
    parameters = set(inspect.signature(pool_class).parameters)
    return parameters - set(POOL_PARAMETERS) - {"conninfo", "open"}


def _after_fork_in_child() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        for conn in list(_CONNECTIONS):
            try:
                fd = conn.pgconn.socket
            except Exception:  # closed: no socket left to protect  # noqa: S112
                continue
            os.dup2(devnull, fd, inheritable=False)  # (as libpq's socket: not for exec)
            _INHERITED.append(conn)
    finally:
        os.close(devnull)
    _CONNECTIONS.clear()
    for datastore in list(_DATASTORES):
        old = datastore.pool
        if datastore in _CLOSED:
            continue  # the service was closed before the fork: it stays closed here too
        _INHERITED.append(old)
        datastore.pool = fresh_pool(old)


os.register_at_fork(after_in_child=_after_fork_in_child)
