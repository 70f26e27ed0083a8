"""The event-sourced application: persistence wiring, aggregate loading, atomic writes.

Aggregates are cached in process and used for decisions; every write names the versions
its decision was based on (``WriteUnit.expected``) and the written aggregates' next
versions, and the recorder checks both under the write lock. A stale cache therefore
costs a retry, never a wrong answer. Refusals are always decided again on fresh state.
"""

from __future__ import annotations

import copy
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast
from uuid import UUID

from eventsourcing.application import (
    AggregateNotFoundError,
    Application,
    ProjectorFunction,
    project_aggregate,
)
from eventsourcing.domain import Aggregate, EventSourcingError
from eventsourcing.persistence import (
    ConnectionPoolClosedError,
    EventStore,
    IntegrityError,
    JSONTranscoder,
    Mapper,
    PersistenceError,
    Transcoder,
)
from eventsourcing.utils import Environment, EnvType, TopicError, strtobool

from keyledger.application.auto_seal import BackgroundSealer
from keyledger.application.caches import (
    AppendedEvents,
    ExpiringCache,
    LRUCache,
    text_weight,
    texts_weight,
)
from keyledger.application.group_commit import GroupCommitter
from keyledger.application.read_models import catch_up_audit
from keyledger.domain.identity import derived_id
from keyledger.domain.ids import keyring_id, secret_id
from keyledger.domain.instant import one_instant
from keyledger.domain.keyring import KeyVersion, TenantKeyring
from keyledger.domain.secret import Secret
from keyledger.errors import (
    STORE_CLOSED,
    AuditTampered,
    DecryptionFailed,
    InvalidInput,
    KeyledgerError,
    MasterKeyUnavailable,
    ShredIncomplete,
    StorageError,
)
from keyledger.infrastructure.audit_keys import AuditKey
from keyledger.infrastructure.crypto import (
    DataKey,
    MasterKey,
    MasterKeyring,
    generate_data_key,
    stored_wrapped,
)
from keyledger.infrastructure.event_tags import (
    SnapshotMapper,
    TaggingMapper,
    UnverifiedSnapshot,
)
from keyledger.infrastructure.lost_tables import catalog_lost
from keyledger.infrastructure.read_events import PendingRead, ReadEncoder
from keyledger.infrastructure.transcodings import BytesAsBase64, ReusedEncoderTranscoder
from keyledger.infrastructure.unit_writer import (
    SHRED_PENDING,
    KeyledgerRecorder,
    delete_key_material,
)
from keyledger.infrastructure.write_unit import KeyMaterialRow, StaleStateError, WriteUnit
from keyledger.projections.timeutil import to_micros

MAX_ATTEMPTS = 50
# The attempts of a store, retrieve or state change from this one on are made with the
# store's write lock taken first (see exclusively): a decision that lost this many races
# is made where it cannot lose another.
EXCLUSIVE_AFTER = 4
AGGREGATE_CACHE_SIZE = 20_000
# What the cached secrets may hold in all, by their values' and texts' sizes (a count
# alone let 20,000 secrets of 64 KiB values hold 2 GB); KEYLEDGER_CACHE_MEGABYTES.
AGGREGATE_CACHE_BYTES = 256 * 2**20
SNAPSHOT_INTERVAL = 100
AUDIT_CATCH_UP_EVERY = 2000
APPENDED_KEPT = 4 * AUDIT_CATCH_UP_EVERY  # at most this many appended events are kept,
APPENDED_SHARE = 4  # holding at most this fraction of the cache budget
AUTO_SEAL_CHECKPOINTS = 10
# The attributes of Secret and TenantKeyring that hold mutable values (see for_update).
MUTABLE_ATTRIBUTES = ("_pending_events", "metadata", "keys")

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Conflict(Exception):
    """A write lost a race (stale cache or concurrent writer): reload and decide again."""


class _Exclusive(threading.local):
    """What a thread's exclusive block (``Ledger.exclusively``) did that is undone or
    finished when the block's transaction ends."""

    active = False
    appended: list[tuple[int, object]]  # for Ledger.appended, once the block committed
    cached: list[UUID]  # aggregates cached as written
    snapshots: list[Secret]  # snapshots due, taken once the block has committed


class DecideUnlocked(Conflict):
    """An attempt made under the write lock found a decision that reads too much to make
    while every writer waits (explaining a decryption failure): the next attempt makes it
    without the lock (and if that one loses its race, the one after has the lock again:
    the state may have moved on to one it can decide under the lock)."""


KEY_VERSION_WEIGHT = 640  # about what one version of a cached keyring holds (measured: ~600)
KEYRING_SHARE = 4  # the cached keyrings may hold this fraction of the cache budget


def _keyring_weight(keyring: TenantKeyring) -> int:
    """About what a cached keyring holds, in bytes: a count alone let a tenant rotated
    thousands of times be held in full, 20,000 times over (found by review)."""
    return 1024 + KEY_VERSION_WEIGHT * len(keyring.keys)


def _secret_weight(secret: Secret) -> int:
    """About what a cached secret holds, in bytes: its envelope and its texts (a
    character of a non-ASCII text as up to 4 bytes: three secrets with such metadata
    were weighed at 0.8 MiB while holding 3; found by review)."""
    weight = 1024 + len(secret.envelope) + text_weight(secret.name)
    if secret.description or secret.metadata:
        weight += texts_weight(secret.description, secret.metadata)
    return weight


# What replaying stored events raises when their rows were altered, deleted or reordered
# (a snapshot that does not verify is not among them when it comes from the snapshot
# store: the aggregate is then replayed from its events instead, see _get):
# the library's decoding and version errors (``EventSourcingError``, ``TopicError``), and
# the domain's ``apply`` methods meeting events they cannot follow (a topic swapped for
# another aggregate's event, a version the keyring never had).
def _check_identity(aggregate_id: UUID, aggregate: Any) -> None:
    """``AuditTampered`` unless a secret's tenant and name (a keyring's tenant) derive
    the id it was loaded by. Events copied into the store under another aggregate's id
    (by anyone who can insert rows) replayed as that aggregate with the tenant and name
    they carried, and a retrieve of ``evil/loot`` decrypted globex's secret with
    globex's key (found by review): the envelope's AAD binds the tenant and name the
    events carry, not the id they were found under."""
    derived = derived_id(aggregate)
    if derived is not None and derived[0] != aggregate_id:
        raise AuditTampered(
            f"the stored events of aggregate {aggregate_id} belong to another "
            f"{derived[1]}: events were copied or forged in the store; run "
            "`keyledger audit verify`"
        )


UNREPLAYABLE = (
    UnverifiedSnapshot,  # (a snapshot in the event stream itself: a forged row)
    EventSourcingError,
    TopicError,
    AssertionError,
    AttributeError,
    KeyError,
    TypeError,
    ValueError,
    OverflowError,
)


class Ledger(Application[UUID]):
    """One application, one totally ordered stream: the audit log."""

    name = "keyledger"
    is_snapshotting_enabled = True

    def __init__(
        self,
        *,
        env: dict[str, str],
        master_keys: MasterKeyring,
        key_cache_seconds: float = 300.0,
        clock: Callable[[], datetime] | None = None,
        audit_key: AuditKey | None = None,
        previous_audit_keys: list[AuditKey] | None = None,
        seal_every: int = 0,
        anchor_file: Path | None = None,
        group_commit_wait: float | None = None,
        cache_bytes: int = AGGREGATE_CACHE_BYTES,
        require_tags: bool = False,
    ) -> None:
        self.anchor_file = anchor_file
        self.audit_keys = master_keys.audit_keyring(audit_key, previous_audit_keys or [])
        if require_tags and self.audit_keys.empty:
            raise InvalidInput(
                "KEYLEDGER_REQUIRE_EVENT_TAGS needs an audit key to check tags with: set "
                "KEYLEDGER_MASTER_KEY or KEYLEDGER_AUDIT_KEY"
            )
        self.require_tags = require_tags
        self.seal_every = seal_every
        self.closed = False  # set by close(): calls then fail with STORE_CLOSED
        try:
            super().__init__(env=env)
        except (PersistenceError, StorageError) as error:
            factory = getattr(self, "factory", None)
            if factory is not None:
                factory.close()  # stop the pool's reconnecting threads
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            unreachable = getattr(factory, "unreachable_reason", None)
            if "couldn't get a connection" in reason and unreachable is not None:
                why = unreachable()  # (the pool's timeout says nothing of why)
                reason = f"{reason}: {why}" if why else reason
            elif isinstance(error, StorageError):  # (the recorder's schema creation failed)
                raise
            reason = reason.removeprefix("cannot open the store: ")
            raise StorageError(f"cannot open the store: {reason}") from None
        self.master_keys = master_keys
        self.clock = clock or (lambda: datetime.now(UTC))
        self._secrets: LRUCache[UUID, Secret] = LRUCache(
            AGGREGATE_CACHE_SIZE, max_weight=cache_bytes, weigh=_secret_weight
        )
        self._keyrings: LRUCache[UUID, TenantKeyring] = LRUCache(
            AGGREGATE_CACHE_SIZE, max_weight=cache_bytes // KEYRING_SHARE, weigh=_keyring_weight
        )
        self._appended_since_catch_up = 0
        self._appended_since_seal = 0
        # Events this process appended, by position, until the audit model catches up
        # with them: the catch-up projects these as they are instead of reading them
        # back and decoding them (it still reads which positions exist, so events of
        # other processes in between are read and decoded as usual).
        self.appended = AppendedEvents(APPENDED_KEPT, cache_bytes // APPENDED_SHARE)
        self.sealer = BackgroundSealer(self.seal_automatically)
        self.reads = ReadEncoder(self.audit_keys.current)
        self._reads: GroupCommitter[PendingRead] = GroupCommitter(
            self._write_reads, arrival_wait=group_commit_wait
        )
        self._data_keys: ExpiringCache[tuple[str, int, str], DataKey] = ExpiringCache(
            key_cache_seconds
        )
        self._data_keys_lock = threading.Lock()
        self._data_keys_generation = 0  # bumped by forget_data_keys (see data_key)
        self._exclusive = _Exclusive()
        # The last automatic seal's stop (position, reason), logged once, not every turn.
        self._seal_stop_logged: tuple[int | None, str | None] = (None, None)
        if strtobool(self.env.get("CREATE_TABLE") or "y"):  # (it may create tables)
            self.restore_lost_read_models()
        elif self._catalog_lost():  # (without the right to make the rebuild's tables)
            logger.error(
                "the catalog and key inventory were created anew and not yet rebuilt from "
                "the stream: listings are incomplete until `keyledger db init` (or "
                "`keyledger projections rebuild catalog`) runs"
            )

    def construct_env(self, name: str, env: EnvType | None = None) -> Environment:
        """The library's environment without the process environment merged in: the
        store is what the database URL and keyledger's settings say. The library would
        let ``KEYLEDGER_SQLITE_DBNAME``, ``KEYLEDGER_POSTGRES_SCHEMA`` (unchecked) and its
        other variables override them, and ``COMPRESSOR_TOPIC`` or ``CIPHER_TOPIC`` change
        how events are stored, silently (found by review)."""
        settings = dict(type(self).env)
        if type(self).is_snapshotting_enabled or type(self).snapshotting_intervals:
            settings["IS_SNAPSHOTTING_ENABLED"] = "y"
        settings.update(env or {})
        return Environment(name, settings)

    def construct_mapper(self) -> Mapper[UUID]:
        """The library's mapper, tagging every event with the audit key (event_tags); also
        kept as ``tagging_mapper``, typed, for its ``decode``."""
        self.tagging_mapper = TaggingMapper(
            transcoder=self.construct_transcoder(),
            tag_key=self.audit_keys.current,
            required=self.audit_keys if self.require_tags else None,
        )
        return self.tagging_mapper

    def construct_snapshot_store(self) -> EventStore[UUID]:
        """The library's snapshot store, its rows read by ``SnapshotMapper``: only a
        snapshot whose tag verifies is built upon."""
        return self.factory.event_store(
            mapper=SnapshotMapper(
                transcoder=self.mapper.transcoder, tag_key=self.audit_keys.current
            ),
            recorder=self.factory.aggregate_recorder(purpose="snapshots"),
        )

    def construct_transcoder(self) -> Transcoder:
        """The library's JSON transcoder, with its encoder built once
        (``ReusedEncoderTranscoder``)."""
        transcoder = self.factory.transcoder()
        if type(transcoder) is JSONTranscoder:
            transcoder = ReusedEncoderTranscoder()
        if isinstance(transcoder, JSONTranscoder):
            self.register_transcodings(transcoder)
        return transcoder

    def register_transcodings(self, transcoder: JSONTranscoder) -> None:
        super().register_transcodings(transcoder)
        transcoder.register(BytesAsBase64())

    # -- loading ------------------------------------------------------------------------

    def _load(self, cache: LRUCache[UUID, T], aggregate_id: UUID, fresh: bool) -> T | None:
        if not fresh:
            cached = cache.get(aggregate_id)
            if cached is not None:
                return cached
        aggregate: T | None = self._get(aggregate_id)
        if aggregate is None:
            cache.evict(aggregate_id)
            return None
        cache.put(aggregate_id, aggregate)
        return aggregate

    def _get(self, aggregate_id: UUID, version: int | None = None) -> Any:
        """The aggregate from the store (at ``version``, if given); None if not found."""
        try:
            try:
                aggregate: Any = self.repository.get(aggregate_id, version=version)
            except UnverifiedSnapshot:  # (see TaggingMapper._vouch_for_snapshot)
                aggregate = self._from_events(aggregate_id, version)
                if version is None:
                    self._renew_snapshot(aggregate)
            _check_identity(aggregate_id, aggregate)
            return aggregate
        except AggregateNotFoundError:
            return None
        except (ConnectionPoolClosedError, PersistenceError) as error:
            if self.closed:  # (SQLite's pool says so; PostgreSQL's error wraps the pool's)
                raise StorageError(STORE_CLOSED) from None
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise StorageError(f"cannot load from the store: {reason}") from None
        except KeyledgerError:
            raise
        except UNREPLAYABLE:  # the stored events were altered (see event_shapes)
            raise AuditTampered(
                f"the stored events of aggregate {aggregate_id} cannot be replayed: some "
                "were altered, deleted or reordered; run `keyledger audit verify`"
            ) from None

    def _from_events(self, aggregate_id: UUID, version: int | None) -> Any:
        """The aggregate replayed from its events alone, no snapshot consulted."""
        events = self.repository.event_store.get(originator_id=aggregate_id, lte=version)
        aggregate = project_aggregate(None, events)
        if aggregate is None:
            raise AggregateNotFoundError(aggregate_id)
        return aggregate

    def secret(self, tenant_id: str, name: str, *, fresh: bool = False) -> Secret | None:
        """The secret (read-only: never mutate a returned aggregate; see ``for_update``)."""
        return self._load(self._secrets, secret_id(tenant_id, name), fresh)

    def secret_by_id(self, aggregate_id: UUID, *, fresh: bool = False) -> Secret | None:
        """A secret by its aggregate id (read-only, as ``secret``)."""
        return self._load(self._secrets, aggregate_id, fresh)

    def cached_secret(self, tenant_id: str, name: str) -> Secret | None:
        """The cached secret, without asking the store (None: not cached)."""
        return self._secrets.get(secret_id(tenant_id, name))

    def keyring(self, tenant_id: str, *, fresh: bool = False) -> TenantKeyring | None:
        """The tenant's keyring (read-only; see ``for_update``)."""
        aggregate_id = keyring_id(tenant_id)
        if not fresh:
            cached = self._keyrings.get(aggregate_id)
            if cached is not None:
                return cached
        keyring = self._load(self._keyrings, aggregate_id, fresh=True)
        if keyring is not None:
            self._forget_unusable_data_keys(keyring)
        return keyring

    def _forget_unusable_data_keys(self, keyring: TenantKeyring) -> None:
        """Drop the unwrapped data keys of versions the keyring says are destroyed or
        compromised: another process changed them, and this one learns it when it loads
        the keyring (every write of the tenant's keys moves the keyring on, so its next
        decision on the tenant does), not when its cache would have expired them."""
        for key in keyring.keys.values():
            if key.status not in ("active", "retired"):
                self._data_keys.evict((keyring.tenant_id, key.version, key.key_id))

    def keyring_at(self, tenant_id: str, version: int) -> TenantKeyring | None:
        """The tenant's keyring as it was at ``version`` (None below 1), not cached."""
        if version < 1:
            return None
        keyring: TenantKeyring | None = self._get(keyring_id(tenant_id), version)
        return keyring

    @staticmethod
    def for_update(aggregate: T) -> T:
        """A private copy to run commands on: cached aggregates are shared by threads.

        Every attribute of keyledger's aggregates holds an immutable value (str, bytes,
        int, bool, datetime, UUID, frozen KeyVersion) except the pending-event list and
        one dict (a secret's metadata, a keyring's versions): a shallow copy with those
        copied is as private as a deep copy, at a tenth of the cost (the deep copy was a
        quarter of a re-encryption). ``MUTABLE_ATTRIBUTES`` is checked by a test.
        """
        clone = copy.copy(aggregate)
        state = vars(clone)
        for name in MUTABLE_ATTRIBUTES:
            value = state.get(name)
            if isinstance(value, list):
                state[name] = list(value)
            elif isinstance(value, dict):
                state[name] = dict(value)
        return clone

    # -- writing ------------------------------------------------------------------------

    def commit(
        self, *items: Aggregate | Aggregate.Event, unit: WriteUnit | None = None
    ) -> WriteUnit:
        """Append pending events atomically with ``unit``; ``Conflict`` when it lost a race.

        ``items`` are aggregates (their pending events are appended) or ready-made events
        of one-event aggregates. This is ``Application.save`` without its generic dispatch:
        the same mapper and the same recorder, with the domain events handed to the
        recorder for projection.
        """
        unit = unit or WriteUnit()
        aggregates: list[Aggregate] = []
        events: list[Any] = []
        for item in items:
            if isinstance(item, Aggregate):
                aggregates.append(item)
                events.extend(item.collect_events())
            else:
                events.append(item)
        unit.domain_events = events
        try:
            positions = self.recorder.insert_events(
                [self.mapper.to_stored_event(event) for event in events], unit=unit
            )
        except (IntegrityError, StaleStateError):
            self._evict(*(a.id for a in aggregates), *unit.expected)
            raise Conflict from None
        self._remember(positions, events)
        self._note_appended(len(events))
        exclusive = self._exclusive
        for aggregate in aggregates:
            if exclusive.active:
                exclusive.cached.append(aggregate.id)
            if isinstance(aggregate, Secret):
                self._secrets.put(aggregate.id, aggregate)
                if aggregate.version % SNAPSHOT_INTERVAL == 0:
                    if exclusive.active:  # (a snapshot is written on another connection)
                        exclusive.snapshots.append(aggregate)
                    else:
                        self._snapshot(aggregate)
            elif isinstance(aggregate, TenantKeyring):
                self._keyrings.put(aggregate.id, aggregate)
                self._forget_unusable_data_keys(aggregate)
        return unit

    @property
    def holding_exclusively(self) -> bool:
        """Whether this thread runs an ``exclusively`` block that holds the lock."""
        return self._exclusive.active

    @contextmanager
    def exclusively(self) -> Iterator[None]:
        """Run a block in one write transaction taken first, with the store's write lock
        (``BEGIN IMMEDIATE``; the events table's lock on PostgreSQL): the state it reads
        cannot move on before its writes commit, so they never conflict. For decisions
        that kept losing the race to concurrent writers (see ``retrying``); every writer
        of the store, in every process, waits while the block runs. The block's writes
        commit when it ends, also when it raises, as each would have committed alone.
        Where the store cannot hold such a transaction (a memory store, a pool of one
        connection) the block runs as usual."""
        exclusive = self._exclusive
        if exclusive.active:  # (a block within this thread's block: already held)
            yield
            return
        exclusive.appended, exclusive.cached, exclusive.snapshots = [], [], []
        try:
            with self.recorder.exclusively() as holding:  # type: ignore[attr-defined]
                try:
                    exclusive.active = holding
                    yield
                finally:
                    exclusive.active = False
        except BaseException:
            # The block raised, or its transaction did not commit: what it cached as
            # written is forgotten (read back if it did commit), and the events it
            # appended are not remembered (on SQLite their positions may be another
            # process's events by now).
            self._evict(*exclusive.cached)
            raise
        self.appended.remember(exclusive.appended)
        for secret in exclusive.snapshots:
            self._snapshot(secret)

    def take_snapshot(
        self,
        aggregate_id: UUID,
        version: int | None = None,
        projector_func: ProjectorFunction[Any, Any] = project_aggregate,
    ) -> None:
        """The library's ``take_snapshot``, loading the aggregate as every load does
        (``_get``: a snapshot that does not verify is replayed past, not built upon)."""
        assert self.snapshots is not None  # (snapshotting is enabled for the ledger)
        aggregate = self._get(aggregate_id, version)
        if aggregate is None:
            raise AggregateNotFoundError(aggregate_id)
        snapshot_class = getattr(type(aggregate), "Snapshot", type(self).snapshot_class)
        assert snapshot_class is not None
        self.snapshots.put([snapshot_class.take(aggregate)])

    def _snapshot(self, secret: Secret) -> None:
        """Snapshot a secret after the write that took it to a multiple of
        SNAPSHOT_INTERVAL. That write has committed, so a failure here (a lock timeout,
        say) must not make it look failed: a snapshot only saves replaying, and the next
        multiple takes one again."""
        try:
            self.take_snapshot(secret.id, version=secret.version)
        except Exception as error:  # logged: the write itself succeeded
            logger.warning(
                "snapshot of a secret at version %d deferred: %s",
                secret.version,
                type(error).__name__,
            )

    def _renew_snapshot(self, aggregate: Any) -> None:
        """A new snapshot of a secret just replayed past one that did not verify (most
        often one tagged before an audit-key rotation), so that the next load starts
        from it instead of replaying again until the secret's next multiple of
        SNAPSHOT_INTERVAL. Only where the secret has such a multiple behind it. The
        skipped snapshot may sit at the secret's own version (last written at such a
        multiple): it is deleted first. A load is no write: a snapshot
        that cannot be written (a read-only role, another process renewing it at once,
        a locked attempt holding the write lock) is left for the next load, logged at
        debug level."""
        if not isinstance(aggregate, Secret) or aggregate.version < SNAPSHOT_INTERVAL:
            return
        if self._exclusive.active:  # (another connection would wait for this thread)
            return
        assert self.snapshots is not None  # (snapshotting is enabled for the ledger)
        snapshot = Secret.Snapshot.take(aggregate)
        try:
            try:
                self.snapshots.put([snapshot])
            except IntegrityError:  # the skipped one has this version: replace it
                table = self.snapshots.recorder.events_table_name  # type: ignore[attr-defined]
                with self.store.writing() as cur:
                    cur.execute(
                        f"DELETE FROM {table} WHERE originator_id=? AND originator_version=?",
                        (self.store.id_param(aggregate.id), aggregate.version),
                    )
                self.snapshots.put([snapshot])
        except Exception as error:
            logger.debug(
                "snapshot of a secret at version %d not renewed: %s",
                aggregate.version,
                type(error).__name__,
            )

    def read_coming(self) -> AbstractContextManager[None]:
        """Around a retrieve: its read is on its way to ``commit_read``, so a concurrent
        batch being formed waits briefly for it (see ``group_commit``)."""
        if self._exclusive.active:  # (its read is written in this thread's transaction)
            return nullcontext()
        return self._reads.arriving()

    def commit_read(self, read: PendingRead) -> None:
        """Append one read event, group-committed with concurrent reads (see group_commit).

        Returns once the transaction holding it has committed, with ``read.access_count``
        set; ``Conflict`` when the decision it records was made on state that has moved on.
        """
        try:
            if self._exclusive.active:  # into this thread's transaction, not a batch
                (error,) = self.recorder.insert_reads([read])  # type: ignore[attr-defined]
                if error is not None:
                    raise error
            else:
                self._reads.submit(read)
        except (IntegrityError, StaleStateError):
            self._evict(*read.expected)
            raise Conflict from None
        if read.position is not None:
            if self._exclusive.active:  # (remembered once the block has committed)
                self._exclusive.appended.append((read.position, read.view))
            else:
                self.appended.remember_read(read.position, read.view)
        self._note_appended(1)

    def _remember(self, positions: Sequence[int] | None, events: list[Any]) -> None:
        """Keep what this process appended for the audit catch-up (see ``appended``)."""
        if positions:
            if self._exclusive.active:  # (remembered once the block has committed)
                self._exclusive.appended.extend(zip(positions, events, strict=True))
            else:
                self.appended.remember(zip(positions, events, strict=True))

    def _evict(self, *aggregate_ids: UUID) -> None:
        """Forget cached aggregates a write found stale (the retry reloads them)."""
        for aggregate_id in aggregate_ids:
            self._secrets.evict(aggregate_id)
            self._keyrings.evict(aggregate_id)

    def _write_reads(self, batch: list[PendingRead]) -> Sequence[BaseException | None]:
        return self.recorder.insert_reads(batch)  # type: ignore[attr-defined,no-any-return]

    def _note_appended(self, count: int) -> None:
        if self.seal_every:
            self.sealer.activity()
            self._appended_since_seal += count
            if self._appended_since_seal >= self.seal_every:
                self._appended_since_seal = 0
                self.sealer.request()  # sealed on the sealer's thread, not in this request
        # The audit model catches up before every audit query; catching up in bulk every
        # few thousand appends as well keeps that first query short.
        self._appended_since_catch_up += count
        if self._appended_since_catch_up < AUDIT_CATCH_UP_EVERY or self._exclusive.active:
            return  # (an exclusive block's own transaction would keep a catch-up waiting)
        self._appended_since_catch_up = 0
        try:
            catch_up_audit(self)
        except (KeyledgerError, PersistenceError) as error:  # the write itself succeeded:
            # never reported as its failure (its caller would retry a committed write).
            # An audit query catches up again and raises what stopped this one (a
            # tampered event: AuditTampered, naming its position).
            logger.warning(
                "audit read model catch-up deferred: %s: %s", type(error).__name__, error
            )

    def seal_automatically(self, max_checkpoints: int = AUTO_SEAL_CHECKPOINTS) -> None:
        """Seal unsealed events as the system actor, at most ``max_checkpoints`` segments
        at a time (a large backlog is sealed over several turns, never in one long stall
        of a writer); never fails the caller's write."""
        if self.audit_keys.current is None:
            return
        from keyledger.application.sealing import seal  # sealing imports Ledger

        actor = {"user_id": "system", "ip_address": None, "user_agent": None}
        try:
            result = seal(self, actor, max_checkpoints=max_checkpoints)
        except KeyledgerError as error:
            logger.warning("automatic audit seal deferred: %s", error)
        except Exception:  # the write it follows has committed: it must not look failed
            logger.exception("automatic audit seal failed")
        else:  # (nobody reads this result: what it says goes to the log)
            stop = (result.stopped_at, result.stopped_reason)
            if result.stopped_at is not None and stop != self._seal_stop_logged:
                # (once per stop: the worker seals whenever it is idle, twice a second)
                logger.warning(
                    "audit seal stopped at position %d: %s",
                    result.stopped_at,
                    result.stopped_reason,
                )
            self._seal_stop_logged = stop
            if result.anchor_error is not None:
                logger.warning("audit seal: %s", result.anchor_error)

    def retrying(self, attempt: Callable[[int], T], first: int = 0, *, escalate: bool = False) -> T:
        """Run ``attempt(n)`` until it stops raising ``Conflict`` (bounded, with jitter),
        from ``n = first`` (a caller that made attempt 0 itself passes 1). The events of
        one attempt share one timestamp (``one_instant``). With ``escalate``, each
        attempt from ``EXCLUSIVE_AFTER`` on runs ``exclusively``: for attempts that decide
        on one secret and its keyring, whose fresh loads are short, since every writer
        waits while they run."""
        unlocked = -1  # the attempt that DecideUnlocked sends back without the lock
        for n in range(first, MAX_ATTEMPTS):
            try:
                if escalate and n >= EXCLUSIVE_AFTER and n != unlocked:
                    with self.exclusively(), one_instant():
                        return attempt(n)
                with one_instant():
                    return attempt(n)
            except DecideUnlocked:
                unlocked = n + 1
                continue
            except Conflict:
                if n:
                    time.sleep(random.uniform(0, 0.002 * min(n, 10)))
        raise StorageError(f"gave up after {MAX_ATTEMPTS} conflicting attempts")

    # -- keys ---------------------------------------------------------------------------

    def current_master_key(self) -> MasterKey:
        """The AMK used for wrapping; ``MasterKeyUnavailable`` when none is configured."""
        if self.master_keys.current is None:
            raise MasterKeyUnavailable(
                "no master key configured: set KEYLEDGER_MASTER_KEY or KEYLEDGER_MASTER_KEY_FILE"
            )
        return self.master_keys.current

    def new_data_key(self, tenant_id: str, version: int) -> tuple[DataKey, KeyMaterialRow]:
        """A fresh TDEK for ``version`` and its wrapped form, ready to insert."""
        amk = self.current_master_key()
        raw = generate_data_key()
        data_key = DataKey(tenant_id, version, raw)
        wrapped = amk.wrap(tenant_id, version, raw)
        del raw  # no plain key among the locals of a frame that goes on (see _rewrapped)
        row = KeyMaterialRow(
            tenant_id=tenant_id,
            version=version,
            key_id=data_key.fingerprint,
            amk_id=amk.amk_id,
            wrapped=wrapped,
            created_at=to_micros(self.clock()),
        )
        return data_key, row

    def forget_data_keys(self) -> None:
        """Drop every unwrapped data key from memory (after keys were destroyed). A key
        another thread was unwrapping meanwhile is not cached when it is done (see
        ``data_key``): it would otherwise stay in memory after its destruction."""
        with self._data_keys_lock:
            self._data_keys_generation += 1
            self._data_keys.clear()

    def delete_key_material(self, rows: list[tuple[str, int, str | None]]) -> None:
        """Delete stray key material (orphaned, or of destroyed versions): no event, since
        no key fact changes; the drift repair that calls this is itself audited."""
        with self.writing() as cur:
            delete_key_material(cur, rows)

    def shred(self) -> None:
        """Make the store drop deleted key material from its files (see the recorders).

        It runs after the deletion committed, so a store failure here (a lock timeout
        behind a long transaction, a dropped connection) is ``ShredIncomplete``, never a
        ``StorageError``, which would say that nothing was written."""
        try:
            pending = self._shreds_pending()  # (a failure here comes after the commit too)
            self.store.shred()
            if pending:  # what this shred covered (later deletions stay counted)
                with self.store.projecting() as cur:
                    # Never below zero: two shreds at once each take off what both saw
                    # owed, and a count gone negative swallowed the next run's debt, so
                    # a later cleanup killed before its shred was never shredded (found
                    # by review).
                    cur.execute(
                        "UPDATE kl_tracking SET position = CASE WHEN position > ? "
                        "THEN position - ? ELSE 0 END WHERE name = ?",
                        (pending, pending, SHRED_PENDING),
                    )
        except StorageError as error:
            raise ShredIncomplete(
                f"the operation is done, but the store could not be shredded ({error}): "
                "the key material it deleted or replaced may stay in the database files "
                "until `keyledger db shred` succeeds"
            ) from None

    def shred_pending(self) -> bool:
        """Whether a write deleted or replaced key material that no shred has yet
        removed from the store's files (its process stopped before it could shred)."""
        return self._shreds_pending() > 0

    def _shreds_pending(self) -> int:
        with self.reading() as cur:
            cur.execute("SELECT position FROM kl_tracking WHERE name = ?", (SHRED_PENDING,))
            row = cur.fetchone()
        return int(row[0]) if row is not None else 0

    def remember_data_key(self, data_key: DataKey) -> None:
        self._data_keys.put((data_key.tenant_id, data_key.version, data_key.fingerprint), data_key)

    def data_key(self, tenant_id: str, key: KeyVersion) -> DataKey:
        """The unwrapped TDEK of a usable (active or retired) key version."""
        if key.status not in ("active", "retired"):
            raise DecryptionFailed(
                f"key version {key.version} of tenant {tenant_id!r} is {key.status}"
            )
        cache_key = (tenant_id, key.version, key.key_id)
        cached = self._data_keys.get(cache_key)
        if cached is not None:
            return cached
        generation = self._data_keys_generation
        if self.master_keys.current is None:
            self.current_master_key()
        material = self.key_material(tenant_id, key.version, key.key_id)
        if material is None:
            raise DecryptionFailed(
                f"key material of version {key.version} of tenant {tenant_id!r} is missing"
            )
        amk_id, wrapped = material
        amk = self.master_keys.get(amk_id)
        if amk is None:
            raise DecryptionFailed(
                f"key version {key.version} of tenant {tenant_id!r} is wrapped by master key "
                f"{amk_id}, which is not configured; add it to KEYLEDGER_PREVIOUS_MASTER_KEYS"
            )
        data_key = DataKey(tenant_id, key.version, amk.unwrap(tenant_id, key.version, wrapped))
        if data_key.fingerprint != key.key_id:
            raise DecryptionFailed(
                f"key material of version {key.version} of tenant {tenant_id!r} does not "
                "match its fingerprint"
            )
        with self._data_keys_lock:  # (a cache miss: rare, keys are kept for minutes)
            if generation == self._data_keys_generation:  # no forget_data_keys meanwhile
                self._data_keys.put(cache_key, data_key)
        return data_key

    def key_material(self, tenant_id: str, version: int, key_id: str) -> tuple[str, bytes] | None:
        with self.reading() as cur:
            cur.execute(
                "SELECT amk_id, wrapped FROM kl_key_material "
                "WHERE tenant_id=? AND version=? AND key_id=?",
                (tenant_id, version, key_id),
            )
            row = cur.fetchone()
        return None if row is None else (row[0], stored_wrapped(row[1]))

    # -- reading the read models ----------------------------------------------------------

    @property
    def store(self) -> KeyledgerRecorder:
        """The recorder, with keyledger's read and write transactions."""
        return cast(KeyledgerRecorder, self.recorder)

    def reading(self) -> AbstractContextManager[Any]:
        """A read transaction on the store (a consistent snapshot of the read models)."""
        return self.store.reading()

    def writing(self) -> AbstractContextManager[Any]:
        """A transaction holding the write lock, for read-model maintenance."""
        return self.store.writing()

    def create_schema(self) -> None:
        """Create every table (events, snapshots, read models, key material); idempotent."""
        self.store.create_table()
        if self.snapshots is not None:
            cast(KeyledgerRecorder, self.snapshots.recorder).create_table()
        self.restore_lost_read_models()

    def restore_lost_read_models(self) -> None:
        """Rebuild the catalog and the key inventory from the stream when their tables
        were created anew in a store that had events (``lost_tables``): before, such a
        store answered "no secrets" and called itself healthy."""
        if not self._catalog_lost():
            return
        from keyledger.application.read_models import rebuild_read_models  # (a cycle)

        logger.warning(
            "the catalog or key inventory table was created anew in a store that has "
            "events: rebuilding both from the stream"
        )
        try:
            rebuild_read_models(self, names=["catalog"])
        except StorageError:
            if self._catalog_lost():  # (not another process's rebuild, finished first)
                raise

    def _catalog_lost(self) -> bool:
        try:
            with self.reading() as cur:
                return catalog_lost(cur)
        except (StorageError, PersistenceError):  # no kl_tracking: a store opened without
            return False  # creating tables, whose queries say what is missing

    def wait_for_events(self, seconds: float) -> None:
        """Block until new events may have been appended, or ``seconds`` passed."""
        self.store.wait_for_events(seconds)

    def close(self) -> None:
        self.closed = True
        self._data_keys.clear()  # (unwrapped keys leave memory with the service)
        self.sealer.close()
        self.factory.close()
