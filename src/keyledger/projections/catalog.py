"""The inline read models: the catalog of secrets and the key inventory.

They are applied in the transaction that appends the events, so every caller reads its own
writes and access counts are exact across processes; a rebuild replays the same code.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, NamedTuple, Protocol

from keyledger.domain.access import AuditRecord, ReadView
from keyledger.domain.envelope import envelope_key_version
from keyledger.domain.identity import derived_id
from keyledger.domain.keyring import TenantKeyring
from keyledger.domain.secret import Secret
from keyledger.projections.projector import UNTIMED, Cursor, Outcome, tampered
from keyledger.projections.timeutil import instant_micros, optional_micros, to_micros

_CATALOG_UPSERT_FIELDS = (
    "disabled=?, expired=?, deleted=0, category=?, description=?, metadata=?, version=?, "
    "key_version=?, envelope_version=?, expires_at=?, updated_at=?"
)


_encode_metadata = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode


def _metadata(value: dict[str, str]) -> str:
    return _encode_metadata(value) if value else "{}"  # most secrets have none


_UNWANTED = Outcome(wanted=False)


class ReadFacts(NamedTuple):
    """What the catalog needs of a read: whose it was and when (microseconds)."""

    tenant_id: str
    secret_name: str
    at: int


class CountedRead(Protocol):
    """A read being written: its facts, and the access count it saw once projected."""

    @property
    def tenant_id(self) -> str: ...

    @property
    def secret_name(self) -> str: ...

    @property
    def at(self) -> int: ...

    access_count: int | None
    last_accessed_at: int | None


_UNSEEN = object()


class CatalogProjector:
    """Projects events into kl_catalog and kl_keys."""

    # Event class -> its ``_on_<name>`` handler (None: not projected), found once.
    _handlers: ClassVar[dict[type, Any]] = {}

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        cls._handlers = {}  # a subclass's handlers are its own

    def apply(
        self, cur: Cursor, items: Iterable[tuple[int, object]], outcome: Outcome | None = None
    ) -> None:
        """Apply events in order. Without an ``outcome`` (a replay), each run of
        consecutive reads is applied with one statement, as group commit does."""
        if outcome is None:
            self._replay(cur, items)
            return
        handlers = self._handlers
        for _, event in items:
            kind = type(event)
            handler = handlers.get(kind, _UNSEEN)
            if handler is _UNSEEN:
                handler = handlers[kind] = getattr(type(self), "_on_" + kind.__name__, None)
            if handler is not None:
                handler(self, cur, event, outcome)

    def _replay(self, cur: Cursor, items: Iterable[tuple[int, object]]) -> None:
        """Apply events in order, deferring what commutes: reads and creations.

        Creations are held back and inserted together (each is a different secret), and
        reads together after them (one UPDATE adds each secret's count and keeps its last
        read's time), until an event that does not commute with them: an event of a secret
        whose creation is still held back (its row must exist first), a store that revives
        a deleted name (it resets the count its earlier reads made), or an event that is
        not a secret's own (key events, which may touch any row of a tenant). A secret's
        other events touch its row's other columns only, and are applied at once. The
        result is the one-by-one application's, in a handful of statements per page
        (tests hold the two equal on interleaved streams)."""
        reads: list[ReadFacts] = []
        counted: set[tuple[str, str]] = set()
        created: list[Secret.SecretCreated] = []
        creating: set[tuple[str, str]] = set()

        def flush(*, only_created: bool = False) -> None:
            if created:
                self._insert_created(cur, created)
                created.clear()
                creating.clear()
            if reads and not only_created:
                self.apply_reads(cur, reads, wanted=False)
                reads.clear()
                counted.clear()

        for position, event in items:
            if isinstance(event, (AuditRecord.SecretRead, ReadView)):
                at = instant_micros(event.timestamp)
                if at is None:  # (see instant_micros)
                    raise tampered(position, UNTIMED)
                reads.append(ReadFacts(event.tenant_id, event.secret_name, at))
                counted.add((event.tenant_id, event.secret_name))
                continue
            _check_identity(position, event)
            if type(event) is Secret.SecretCreated:
                if (event.tenant_id, event.name) in creating:
                    raise tampered(position, "creates a secret created before")
                created.append(event)  # a secret is created once: each is a different row
                creating.add((event.tenant_id, event.name))
                continue
            handler = getattr(self, "_on_" + type(event).__name__, None)
            if handler is None:
                continue  # not projected here (denials, failures, checkpoints)
            if isinstance(event, Secret.Event):
                key = (event.tenant_id, event.name)
                if isinstance(event, Secret.SecretStored) and event.revived and key in counted:
                    flush()
                elif key in creating:
                    flush(only_created=True)
            else:
                flush()
                _check_new_key(cur, position, event)
            handler(cur, event, _UNWANTED)
        flush()

    @staticmethod
    def _insert_created(cur: Cursor, events: list[Secret.SecretCreated]) -> None:
        """Rows of a run of created secrets, in one statement on PostgreSQL (as arrays)
        and one executemany on SQLite: the same rows as ``_on_SecretCreated`` one by one."""
        rows = [_created_row(e) for e in events]
        if getattr(cur, "dialect", "sqlite") == "postgres" and len(rows) > ARRAY_BATCH_MIN:
            cur.execute(_PG_CREATED_INSERT, [list(column) for column in zip(*rows, strict=True)])
        else:
            cur.executemany(_CREATED_INSERT, rows)

    # -- catalog ------------------------------------------------------------------------

    def _on_SecretCreated(self, cur: Cursor, e: Secret.SecretCreated, outcome: Outcome) -> None:  # noqa: N802
        cur.execute(_CREATED_INSERT, self.created(e, outcome))

    @staticmethod
    def created(e: Secret.SecretCreated, outcome: Outcome) -> tuple[Any, ...]:
        """A created secret's catalog row (the parameters of ``created_insert``), its
        outcome set: the one definition the inline projection and PostgreSQL's
        ``kl_store_created_v1`` share."""
        outcome.access_count, outcome.last_accessed_at = 0, None
        return _created_row(e)

    @staticmethod
    def created_insert(placeholders: Sequence[str]) -> str:
        """The INSERT of a created secret's row, its parameters named ``placeholders``
        (one per value of ``created``, in order), for a server function."""
        return _named(_CREATED_INSERT, placeholders)

    def _on_SecretStored(self, cur: Cursor, e: Secret.SecretStored, outcome: Outcome) -> None:  # noqa: N802
        row = self.stored_row(e)
        fresh = (row[-1],) if e.revived else ()  # a revived name is created anew
        cur.execute(self.stored_update(e.revived), (*row, *fresh, e.tenant_id, e.name))
        self._remember_access(cur, outcome)

    @staticmethod
    def stored_row(e: Secret.SecretStored) -> tuple[Any, ...]:
        """A stored value's catalog values, in ``stored_update``'s order (then, for a
        revived name, the creation time, which is the last of them again; then the
        tenant and the name): the one definition the inline projection and PostgreSQL's
        ``kl_store_updated_v1`` share."""
        return (
            int(e.disabled),
            int(e.expired),
            e.category,
            e.description,
            _metadata(e.metadata),
            e.value_version,
            e.key_version,
            envelope_key_version(e.envelope),
            optional_micros(e.expires_at),
            to_micros(e.timestamp),
        )

    @staticmethod
    def stored_update(revived: bool, placeholders: Sequence[str] | None = None) -> str:
        """The UPDATE of a stored value's row (``?`` placeholders, or ``placeholders``
        by name, for a server function), returning the access count and last read."""
        fresh = ", created_at=?, access_count=0, last_accessed_at=NULL" if revived else ""
        statement = (
            f"UPDATE kl_catalog SET {_CATALOG_UPSERT_FIELDS}{fresh} WHERE tenant_id=? AND name=? "
            "RETURNING access_count, last_accessed_at"
        )
        return statement if placeholders is None else _named(statement, placeholders)

    def _set_disabled(self, cur: Cursor, e: Secret.Event, disabled: bool) -> None:
        cur.execute(
            "UPDATE kl_catalog SET disabled=?, updated_at=? WHERE tenant_id=? AND name=?",
            (int(disabled), to_micros(e.timestamp), e.tenant_id, e.name),
        )

    def _on_SecretDisabled(self, cur: Cursor, e: Secret.SecretDisabled, _: Outcome) -> None:  # noqa: N802
        self._set_disabled(cur, e, True)

    def _on_SecretEnabled(self, cur: Cursor, e: Secret.SecretEnabled, _: Outcome) -> None:  # noqa: N802
        self._set_disabled(cur, e, False)

    def _on_SecretExpired(self, cur: Cursor, e: Secret.SecretExpired, _: Outcome) -> None:  # noqa: N802
        cur.execute(
            "UPDATE kl_catalog SET expired=1 WHERE tenant_id=? AND name=?",
            (e.tenant_id, e.name),
        )

    def _on_SecretReencrypted(  # noqa: N802
        self, cur: Cursor, e: Secret.SecretReencrypted, _: Outcome
    ) -> None:
        cur.execute(
            "UPDATE kl_catalog SET key_version=?, envelope_version=? WHERE tenant_id=? AND name=?",
            (e.key_version, envelope_key_version(e.envelope), e.tenant_id, e.name),
        )

    def _on_SecretDeleted(self, cur: Cursor, e: Secret.SecretDeleted, _: Outcome) -> None:  # noqa: N802
        cur.execute(
            "UPDATE kl_catalog SET deleted=1, updated_at=? WHERE tenant_id=? AND name=?",
            (to_micros(e.timestamp), e.tenant_id, e.name),
        )

    @staticmethod
    def apply_read(cur: Cursor, read: CountedRead) -> None:
        """Project one read, and give it the count it made."""
        cur.execute(
            "UPDATE kl_catalog SET access_count=access_count+1, "
            f"last_accessed_at={_LATEST.format(at='?')} "
            "WHERE tenant_id=? AND name=? RETURNING access_count",
            (read.at, read.at, read.tenant_id, read.secret_name),
        )
        row = cur.fetchone()
        if row is not None:
            read.access_count, read.last_accessed_at = int(row[0]), read.at

    def apply_reads(
        self, cur: Cursor, reads: Sequence[ReadFacts | CountedRead], *, wanted: bool = True
    ) -> None:
        """Project many reads (in stream order) with one statement: the same rows as one
        by one. Without ``wanted`` (a replay), the counts are not read back: on
        PostgreSQL's pipeline, reading them back would wait for the server once per batch."""
        statement, params = self.reads_update(reads, getattr(cur, "dialect", "sqlite"))
        if not wanted:
            cur.execute(statement[: statement.index(" RETURNING ")], params)
            return
        cur.execute(statement, params)
        self.assign_read_outcomes(reads, cur.fetchall())  # type: ignore[arg-type]

    @staticmethod
    def reads_update(
        reads: Sequence[ReadFacts | CountedRead], dialect: str = "sqlite"
    ) -> tuple[str, list[Any]]:
        """One UPDATE for reads in stream order: counts added, the latest read's time kept.

        On PostgreSQL a large batch travels as four arrays, so the statement text is the
        same for every size: psycopg parses it once instead of once per size (parsing long
        VALUES lists took a third of a rebuild's client time). Small batches, the common
        case of group commit, keep the VALUES list: its few texts stay in psycopg's cache
        and the server plans it faster than an unnest."""
        totals = _read_totals(reads)
        if dialect == "postgres" and len(totals) > ARRAY_BATCH_MIN:
            return _PG_READS_UPDATE, _columns(totals)
        rows = ",".join("(?,?,?,?)" for _ in totals)
        params = [v for (tenant, name), (n, at) in totals.items() for v in (tenant, name, n, at)]
        return (
            "UPDATE kl_catalog SET access_count = kl_catalog.access_count + v.column3, "
            f"last_accessed_at = {_LATEST.format(at='v.column4')} FROM (VALUES {rows}) AS v "
            "WHERE kl_catalog.tenant_id = v.column1 AND kl_catalog.name = v.column2 "
            "RETURNING kl_catalog.tenant_id, kl_catalog.name, kl_catalog.access_count",
            params,
        )

    @staticmethod
    def read_totals(reads: Sequence[ReadFacts | CountedRead]) -> list[list[Any]]:
        """What reads (in stream order) add to the catalog, as four columns: tenant,
        name, number of reads, time of the last one."""
        return _columns(_read_totals(reads))

    @staticmethod
    def assign_read_outcomes(reads: Sequence[CountedRead], returned: list[Any]) -> None:
        """Each read (in stream order) gets the count it would have seen applied alone:
        the final count less the reads of the same secret that come after it."""
        final = {(row[0], row[1]): int(row[2]) for row in returned}
        later: dict[tuple[str, str], int] = {}
        for read in reversed(reads):
            key = (read.tenant_id, read.secret_name)
            if key in final:
                read.access_count = final[key] - later.get(key, 0)
                read.last_accessed_at = read.at
                later[key] = later.get(key, 0) + 1

    @staticmethod
    def _remember_access(cur: Cursor, outcome: Outcome) -> None:
        if not outcome.wanted:
            return

        def remember(row: Any) -> None:
            if row is not None:
                outcome.access_count, outcome.last_accessed_at = int(row[0]), row[1]

        fetch_later = getattr(cur, "fetch_later", None)
        if fetch_later is not None:  # a pipelined write: read once the pipeline synced
            fetch_later(remember)
        else:
            remember(cur.fetchone())

    # -- keys ---------------------------------------------------------------------------

    def _on_TenantKeyCreated(  # noqa: N802
        self, cur: Cursor, e: TenantKeyring.TenantKeyCreated, _: Outcome
    ) -> None:
        cur.execute(
            "INSERT INTO kl_keys (tenant_id, version, key_id, amk_id, status, created_at, "
            "retired_at) VALUES (?,1,?,?,'active',?,NULL)",
            (e.tenant_id, e.key_id, e.amk_id, to_micros(e.timestamp)),
        )

    def _on_KeyRotated(self, cur: Cursor, e: TenantKeyring.KeyRotated, _: Outcome) -> None:  # noqa: N802
        ts = to_micros(e.timestamp)
        if e.retired_version is not None:
            cur.execute(
                "UPDATE kl_keys SET status='retired', retired_at=? WHERE tenant_id=? AND version=?",
                (ts, e.tenant_id, e.retired_version),
            )
        cur.execute(
            "INSERT INTO kl_keys (tenant_id, version, key_id, amk_id, status, created_at, "
            "retired_at) VALUES (?,?,?,?,'active',?,NULL)",
            (e.tenant_id, e.version, e.key_id, e.amk_id, ts),
        )

    def _key_status(self, cur: Cursor, e: TenantKeyring.Event, version: int, status: str) -> None:
        ts = to_micros(e.timestamp)
        cur.execute(
            "UPDATE kl_keys SET status=?, retired_at=COALESCE(retired_at, "
            "CASE WHEN status='active' THEN ? END) WHERE tenant_id=? AND version=?",
            (status, ts, e.tenant_id, version),
        )

    def _on_KeyCompromised(  # noqa: N802
        self, cur: Cursor, e: TenantKeyring.KeyCompromised, _: Outcome
    ) -> None:
        self._key_status(cur, e, e.version, "compromised")

    def _on_KeyDestroyed(self, cur: Cursor, e: TenantKeyring.KeyDestroyed, _: Outcome) -> None:  # noqa: N802
        self._key_status(cur, e, e.version, "destroyed")

    def _on_TenantErased(self, cur: Cursor, e: TenantKeyring.TenantErased, _: Outcome) -> None:  # noqa: N802
        for version in e.versions:
            self._key_status(cur, e, version, "destroyed")

    def _on_KeyRewrapped(self, cur: Cursor, e: TenantKeyring.KeyRewrapped, _: Outcome) -> None:  # noqa: N802
        cur.execute(
            "UPDATE kl_keys SET amk_id=? WHERE tenant_id=? AND version=?",
            (e.amk_id, e.tenant_id, e.version),
        )


_CREATED_COLUMNS = (
    "secret_id, tenant_id, name, disabled, expired, deleted, category, description, "
    "metadata, version, key_version, envelope_version, expires_at, created_at, updated_at, "
    "access_count, last_accessed_at"
)
_CREATED_INSERT = (
    f"INSERT INTO kl_catalog ({_CREATED_COLUMNS}) VALUES (?,?,?,0,0,0,?,?,?,1,?,?,?,?,?,0,NULL)"
)
_PG_CREATED_INSERT = (
    f"INSERT INTO kl_catalog ({_CREATED_COLUMNS}) "
    "SELECT u.id, u.tenant, u.name, 0, 0, 0, u.category, u.description, u.metadata, 1, "
    "u.key_version, u.envelope_version, u.expires_at, u.created, u.updated, 0, NULL "
    "FROM unnest(?::text[], ?::text[], ?::text[], ?::text[], ?::text[], ?::text[], "
    "?::integer[], ?::integer[], ?::bigint[], ?::bigint[], ?::bigint[]) AS u(id, tenant, "
    "name, category, description, metadata, key_version, envelope_version, expires_at, "
    "created, updated)"
)


def _check_identity(position: int, event: Any) -> None:
    """``AuditTampered`` unless a replayed secret's or keyring's event is stored under
    the id its tenant (and name) derive, a creation as the aggregate's first version.

    The stored state names the tenant and the secret the projections write; the id and
    the version are the row's own columns. An event copied under another aggregate's id
    (a state swapped for another secret's, a tenant planted with copies of another's
    events: anyone who can insert rows can) made a rebuild fail on the read models' keys
    with an ``IntegrityError`` traceback, and a check with the driver's message (found
    by review). Checked in replays only: an event being written was made from its id."""
    derived = derived_id(event)
    if derived is None:
        return
    expected, kind = derived
    if event.originator_id != expected:
        raise tampered(position, f"names another {kind} than the one it is stored under")
    if isinstance(event, Secret.SecretCreated | TenantKeyring.TenantKeyCreated) and (
        event.originator_version != 1
    ):
        raise tampered(position, f"creates its {kind} at version {event.originator_version}")


def _check_new_key(cur: Cursor, position: int, event: object) -> None:
    """``AuditTampered`` when a replayed event adds a key version its tenant has already
    (a rotation copied to a later version of the same keyring: its id is right). Key
    events are few, so the one lookup each costs a replay nothing to speak of."""
    if type(event) is TenantKeyring.TenantKeyCreated:
        version = 1
    elif type(event) is TenantKeyring.KeyRotated:
        version = event.version
    else:
        return
    cur.execute("SELECT 1 FROM kl_keys WHERE tenant_id=? AND version=?", (event.tenant_id, version))
    if cur.fetchone() is not None:
        raise tampered(position, f"adds key version {version}, which its tenant has already")


def _named(statement: str, placeholders: Sequence[str]) -> str:
    """``statement`` with its ``?`` placeholders replaced by ``placeholders``, in order."""
    parts = statement.split("?")
    if len(placeholders) != len(parts) - 1:
        raise ValueError(f"{len(parts) - 1} placeholders needed")
    return "".join(part + name for part, name in zip(parts, [*placeholders, ""], strict=True))


def _created_row(e: Secret.SecretCreated) -> tuple[Any, ...]:
    """The catalog row of a created secret, as the parameters of ``_CREATED_INSERT``."""
    ts = to_micros(e.timestamp)
    return (
        e.originator_id.hex,
        e.tenant_id,
        e.name,
        e.category,
        e.description,
        _metadata(e.metadata),
        e.key_version,
        envelope_key_version(e.envelope),
        optional_micros(e.expires_at),
        ts,
        ts,
    )


def _read_totals(reads: Sequence[ReadFacts | CountedRead]) -> dict[tuple[str, str], list[int]]:
    totals: dict[tuple[str, str], list[int]] = {}
    for read in reads:
        total = totals.setdefault((read.tenant_id, read.secret_name), [0, 0])
        total[0] += 1
        total[1] = max(total[1], read.at)
    return totals


def _columns(totals: dict[tuple[str, str], list[int]]) -> list[list[Any]]:
    columns: list[list[Any]] = [[], [], [], []]
    for (tenant, name), (n, at) in totals.items():
        for column, value in zip(columns, (tenant, name, n, at), strict=True):
            column.append(value)
    return columns


# A read's time replaces the catalog's only when it is later: reads are timed before they
# queue for the write lock, so one timed earlier can commit after one timed later, and
# last_accessed_at is the time of the latest read (SPEC section 3), never going back.
# (Written for both SQLite and PostgreSQL; a NULL, never read, takes the read's time.)
_LATEST = (
    "CASE WHEN kl_catalog.last_accessed_at > {at} THEN kl_catalog.last_accessed_at ELSE {at} END"
)

ARRAY_BATCH_MIN = 16  # larger PostgreSQL batches go as arrays (see reads_update)

_PG_READS_UPDATE = (
    "UPDATE kl_catalog SET access_count = kl_catalog.access_count + v.n, "
    "last_accessed_at = GREATEST(kl_catalog.last_accessed_at, v.at) "
    "FROM unnest(?::text[], ?::text[], ?::bigint[], ?::bigint[]) AS v(tenant_id, name, n, at) "
    "WHERE kl_catalog.tenant_id = v.tenant_id AND kl_catalog.name = v.name "
    "RETURNING kl_catalog.tenant_id, kl_catalog.name, kl_catalog.access_count"
)
