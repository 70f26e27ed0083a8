"""Read-model rows holding values keyledger never writes: a typed error, not a traceback.

The read models (kl_catalog, kl_keys, kl_audit, kl_tracking) are tables anyone who can
write the database can edit. A value of another type or out of range there (metadata
that is not JSON or nested too deep to decode, a time that is text, a status keyledger
does not know) surfaced as a ``JSONDecodeError``, ``RecursionError``, pydantic
``ValidationError``, ``TypeError`` or ``OverflowError`` from deep inside a query (found
by review, with 75 such edits). Queries that read them are wrapped by
``read_model_errors``: such an error becomes ``StorageError`` naming the fix, which is to
rebuild the read models from the stream (and to verify the stream).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from keyledger.errors import KeyledgerError, StorageError

P = ParamSpec("P")
T = TypeVar("T")

# What decoding an edited row raises (JSONDecodeError and pydantic's ValidationError are
# ValueErrors; JSON nested some thousands deep is a RecursionError, which is none: found
# by review, a traceback from `secrets list` and `audit log`); keyledger's own errors
# (InvalidInput is one too) pass as they are.
UNREADABLE_ROW = (TypeError, ValueError, OverflowError, KeyError, RecursionError)

UNREADABLE_MESSAGE = (
    "a read model holds a value keyledger never writes ({kind}): it was changed outside "
    "keyledger; run `keyledger projections rebuild`, and `keyledger audit verify`"
)


def read_model_errors(func: Callable[P, T]) -> Callable[P, T]:
    """``func``, with an unreadable read-model row reported as ``StorageError``."""

    @functools.wraps(func)
    def reading(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return func(*args, **kwargs)
        except KeyledgerError:
            raise
        except UNREADABLE_ROW as error:
            raise StorageError(UNREADABLE_MESSAGE.format(kind=type(error).__name__)) from None

    return reading
