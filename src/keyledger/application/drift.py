"""Key-drift diagnosis (SPEC section 5): read models and key probes, never a value.

A diagnosis reads one tenant's key inventory, key material and live secrets from the read
models, unwraps each relevant key version once to test it (the data key is dropped at
once), and reports every way the secrets and keys have drifted apart. It never decrypts a
secret value. Without a master key, it marks nothing destructive. Nothing is marked for
deletion on a read model's word alone: the key inventory is compared with the keyring,
and each secret the catalog makes look unrecoverable with its aggregate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from keyledger.application.ledger import Ledger
from keyledger.application.read_models import audit_lag, audit_position
from keyledger.application.row_errors import read_model_errors
from keyledger.domain.envelope import envelope_key_version
from keyledger.domain.ids import keyring_id
from keyledger.errors import DecryptionFailed
from keyledger.infrastructure.crypto import DataKey, stored_wrapped
from keyledger.models import DriftIssue, DriftReport

NONE = "none"
STORE_FRESH = "store-fresh-secret-value"
REWRAP = "rewrap-tenant-encryption-key"
DELETE_KEY = "delete-unusable-tenant-encryption-key"
DELETE_SECRET = "delete-unrecoverable-secret"  # noqa: S105 (an action name)
REENCRYPT = "reencrypt"
DELETE_MATERIAL = "delete-orphaned-key-material"
REBUILD = "rebuild-read-models"
CATCH_UP = "catch-up-read-models"
# A key version the stream created and never destroyed, with no row of kl_key_material:
# the table (or rows of it) lost, which only a backup gives back; a destructive repair
# would make the loss final.
MATERIAL_MISSING = (
    "its key material is missing (no row in kl_key_material: restore it from a backup, "
    "docs/operations.md section 6, before any repair)"
)
# A live secret as the catalog has it: (name, key version, the key version its envelope's
# header names (None: not a valid envelope), value version).
SecretRow = tuple[str, int, int | None, int]
# What a secret's findings mark for deletion (repair action DELETE_SECRET).
ENVELOPE_INVALID = "secret_envelope_invalid"
KEY_MISSING = "secret_envelope_missing_tenant_encryption_key"
UNWRAP_FAILED = "secret_envelope_unwrap_failed"
UNRECOVERABLE = (ENVELOPE_INVALID, KEY_MISSING, UNWRAP_FAILED)
CATALOG_COLUMNS = ("key_version", "envelope_version", "version")
NAMES_SHOWN = 10  # secrets named in the message of a catalog inconsistency (details: all)


@dataclass(frozen=True)
class KeyRow:
    version: int
    key_id: str
    amk_id: str
    status: str


@dataclass(frozen=True)
class MaterialRow:
    version: int
    key_id: str
    amk_id: str
    wrapped: bytes


@dataclass(frozen=True)
class Probe:
    """Whether a key version's material unwraps, and if not, why."""

    usable: bool
    reason: str | None = None
    amk_id: str | None = None
    unknown_amk: bool = False


class Diagnosis:
    """One tenant's diagnosis; ``issues`` fills as the checks run."""

    def __init__(self, ledger: Ledger, tenant_id: str, secret_names: list[str] | None) -> None:
        self.ledger = ledger
        self.tenant_id = tenant_id
        self.names = None if secret_names is None else set(secret_names)
        self.issues: list[DriftIssue] = []
        self._probes: dict[int, Probe] = {}
        self._load()
        # The keyring as it was in the snapshot the read models were read from.
        self.keyring = ledger.keyring_at(tenant_id, self.keyring_version)

    def _load(self) -> None:
        """The key inventory, the key material and the catalog from one snapshot, with
        the keyring's version in it: a key event updates the inventory in its own
        transaction, so the keyring at that version is what the inventory must say
        (a rotation committed meanwhile is not mistaken for drift)."""
        store = self.ledger.store
        with self.ledger.reading() as cur:
            cur.execute(
                f"SELECT MAX(originator_version) FROM {store.events_table_name} "
                "WHERE originator_id=?",
                (store.id_param(keyring_id(self.tenant_id)),),
            )
            self.keyring_version = int(cur.fetchone()[0] or 0)
            cur.execute(
                "SELECT version, key_id, amk_id, status FROM kl_keys WHERE tenant_id=? "
                "ORDER BY version",
                (self.tenant_id,),
            )
            self.keys = {row[0]: KeyRow(*row) for row in cur.fetchall()}
            cur.execute(
                "SELECT version, key_id, amk_id, wrapped FROM kl_key_material "
                "WHERE tenant_id=? ORDER BY version",
                (self.tenant_id,),
            )
            self.material = [
                MaterialRow(row[0], row[1], row[2], stored_wrapped(row[3]))
                for row in cur.fetchall()
            ]
            cur.execute(
                "SELECT name, key_version, envelope_version, version FROM kl_catalog "
                "WHERE tenant_id=? AND deleted=0 ORDER BY name",
                (self.tenant_id,),
            )
            self.secrets: list[SecretRow] = [
                (row[0], row[1], row[2], row[3])
                for row in cur.fetchall()
                if self.names is None or row[0] in self.names
            ]

    def add(
        self,
        code: str,
        severity: str,
        repair_action: str,
        message: str,
        *,
        secret_name: str | None = None,
        key_version: int | None = None,
        **details: Any,
    ) -> None:
        self.issues.append(
            DriftIssue(
                code=code,
                severity=severity,
                message=message,
                repair_action=repair_action,
                secret_name=secret_name,
                key_version=key_version,
                details=details,
            )
        )

    # -- probing keys -------------------------------------------------------------------

    def probe(self, version: int) -> Probe:
        if version not in self._probes:
            self._probes[version] = self._probe(version)
        return self._probes[version]

    def _probe(self, version: int) -> Probe:
        key = self.keys[version]
        rows = [m for m in self.material if m.version == version and m.key_id == key.key_id]
        if not rows:
            return Probe(False, MATERIAL_MISSING)
        row = rows[0]
        amk = self.ledger.master_keys.get(row.amk_id)
        if amk is None:
            return Probe(
                False,
                f"it is wrapped by master key {row.amk_id}, which is not configured; adding "
                "that master key to KEYLEDGER_PREVIOUS_MASTER_KEYS recovers every value",
                row.amk_id,
                unknown_amk=True,
            )
        try:
            fingerprint = DataKey(
                self.tenant_id, version, amk.unwrap(self.tenant_id, version, row.wrapped)
            ).fingerprint  # (no plain key held in a local)
        except DecryptionFailed:
            return Probe(False, f"it does not unwrap with master key {row.amk_id}", row.amk_id)
        if fingerprint != key.key_id:
            return Probe(False, "its material does not match its fingerprint", row.amk_id)
        return Probe(True, amk_id=row.amk_id)

    # -- the checks ---------------------------------------------------------------------

    def run(self) -> None:
        self._check_projection()
        self._check_key_inventory()
        if self.ledger.master_keys.current is None:
            self.add(
                "amk_unavailable",
                "error",
                NONE,
                "no master key is configured (KEYLEDGER_MASTER_KEY): keys cannot be tested; "
                "nothing is unrecoverable because of it, so nothing is marked for deletion",
            )
            if self.active_key() is None and self.secrets:  # needs no key to tell
                self._on_missing_active_key()
            self._check_secret_key_statuses()
            return
        self._check_active_key()
        self._check_secrets()
        self._check_material()

    def _check_projection(self) -> None:
        reached, head = audit_position(self.ledger)
        if reached < head:
            self.add(
                "projection_behind",
                "info",
                CATCH_UP,
                f"the audit read model is {audit_lag(self.ledger)} events behind the stream",
                read_model="audit",
                position=reached,
                head=head,
            )

    def _check_key_inventory(self) -> None:
        """The key read model must say what the tenant's keyring aggregate says. When it
        does not, the other checks go by the stream's inventory (the truth), so that what
        the diagnosis marks for deletion, a dry run's plan included, does not depend on a
        read model the repair rebuilds first."""
        keyring = self.keyring
        from_stream = (
            {}
            if keyring is None
            else {v: KeyRow(v, k.key_id, k.amk_id, k.status) for v, k in keyring.keys.items()}
        )
        if from_stream != self.keys:
            differing = sorted(
                v
                for v in set(from_stream) | set(self.keys)
                if from_stream.get(v) != self.keys.get(v)
            )
            self.add(
                "read_model_inconsistent_with_stream",
                "error",
                REBUILD,
                "the key read model disagrees with the event stream for version(s) "
                f"{', '.join(map(str, differing))}: rebuild the read models before trusting "
                "this diagnosis",
                read_model="keys",
                versions=differing,
            )
            self.keys = from_stream

    def active_key(self) -> KeyRow | None:
        return next((k for k in self.keys.values() if k.status == "active"), None)

    def _check_active_key(self) -> None:
        active = self.active_key()
        live = bool(self.secrets)
        if active is None:
            if live:
                self._on_missing_active_key()
            return
        probe = self.probe(active.version)
        current = self.ledger.master_keys.current
        if probe.usable and current is not None and probe.amk_id != current.amk_id:
            self.add(
                "active_tenant_encryption_key_amk_mismatch",
                "warning",
                REWRAP,
                f"active key version {active.version} is wrapped by previous master key "
                f"{probe.amk_id}; run `keyledger master-key rewrap`",
                key_version=active.version,
                amk_id=probe.amk_id,
                current_amk_id=current.amk_id,
            )
        if not probe.usable:
            self.add(
                "active_tenant_encryption_key_unwrap_failed",
                "error",
                DELETE_KEY,
                f"active key version {active.version} cannot be used: {probe.reason}",
                key_version=active.version,
                amk_id=probe.amk_id,
                unknown_master_key=probe.unknown_amk,
            )
            if live:
                self._no_usable_active_key()

    def _on_missing_active_key(self) -> None:
        self.add(
            "missing_active_tenant_encryption_key",
            "error",
            STORE_FRESH,
            f"tenant {self.tenant_id!r} has live secrets but no active key version",
        )
        self._no_usable_active_key()

    def _no_usable_active_key(self) -> None:
        self.add(
            "active_secrets_without_usable_active_key",
            "error",
            STORE_FRESH,
            f"{len(self.secrets)} live secret(s) but no usable active key: new values cannot "
            "be stored until the active version is usable again (restore its master key) or "
            "is destroyed by a repair, after which a store creates a fresh version",
            live_secret_count=len(self.secrets),
        )

    def _check_secret_key_statuses(self) -> None:
        for name, key_version, _, _ in self.secrets:
            key = self.keys.get(key_version)
            if key is not None and key.status == "compromised":
                self._on_compromised(name, key_version)
            elif key is not None and key.status == "retired":
                self._on_retired(name, key_version)

    def _on_compromised(self, name: str, version: int) -> None:
        self.add(
            "secret_on_compromised_key",
            "error",
            STORE_FRESH,
            f"secret {name!r} is encrypted under compromised key version {version}",
            secret_name=name,
            key_version=version,
        )

    def _on_retired(self, name: str, version: int) -> None:
        self.add(
            "secret_on_retired_key",
            "info",
            REENCRYPT,
            f"secret {name!r} is under retired key version {version} (run reencrypt_all)",
            secret_name=name,
            key_version=version,
        )

    def _check_secrets(self) -> None:
        """Each live secret against the key version it names. A catalog row that marks
        its secret unrecoverable is confirmed against the secret's aggregate first, and
        the secret judged as the stream has it (found by review: one edited catalog
        column, envelope_version set to NULL or key_version to a version that does not
        exist, had a repair delete a healthy secret). Only those rows cost an aggregate
        load: a healthy tenant's diagnosis stays one read of the catalog."""
        checked: list[SecretRow] = []
        contradicted: dict[str, list[str]] = {}
        for row in self.secrets:
            finding = self._secret_finding(row)
            if finding in UNRECOVERABLE:
                confirmed = self._confirm(row, contradicted)
                if confirmed is None:
                    continue
                if confirmed != row:
                    row, finding = confirmed, self._secret_finding(confirmed)
            checked.append(row)
            self._report_secret(row, finding)
        if contradicted:
            self._on_catalog_contradicted(contradicted)
        self.secrets = checked  # (the live secrets the stream has, for the summary)

    def _secret_finding(self, row: SecretRow) -> str | None:
        """The code of what is wrong with the secret of ``row`` (None: nothing)."""
        _, key_version, envelope_version, _ = row
        key = self.keys.get(key_version)
        if envelope_version is None or envelope_version != key_version:
            return ENVELOPE_INVALID
        if key is None or key.status == "destroyed":
            return KEY_MISSING
        if key.status == "compromised":
            return "secret_on_compromised_key"
        if not self.probe(key_version).usable:
            return UNWRAP_FAILED
        if key.status == "retired":
            return "secret_on_retired_key"
        return None

    def _confirm(self, row: SecretRow, contradicted: dict[str, list[str]]) -> SecretRow | None:
        """``row``, which marks its secret unrecoverable, as the secret's aggregate has
        it (None: the stream leaves nothing about it to judge now).

        A row that disagrees with the aggregate is read again. When it now agrees, the
        secret was written (stored afresh, re-encrypted, deleted) after the snapshot the
        diagnosis reads: no drift, and the next diagnosis sees it as it is. When it
        still disagrees, the catalog contradicts the stream: the columns that differ go
        into ``contradicted`` (reported as ``read_model_inconsistent_with_stream``, so
        that a repair rebuilds the read models before it plans anything), and the
        secret is judged by its aggregate, so that what a dry run plans to delete is what
        the repair deletes on the rebuilt catalog. A key version the snapshot's keyring
        does not reach yet was created after it: the secret was written since, as above.
        """
        name = row[0]
        stream = self._stream_row(name)
        if stream == row:
            return row
        if self._catalog_row(name) == stream:
            return None
        if stream is None:
            contradicted[name] = ["deleted"]
            return None
        pairs = zip(CATALOG_COLUMNS, row[1:], stream[1:], strict=True)
        contradicted[name] = [column for column, ours, theirs in pairs if ours != theirs]
        if stream[1] not in self.keys and stream[1] > max(self.keys, default=0):
            return None
        return stream

    def _stream_row(self, name: str) -> SecretRow | None:
        """The catalog row the secret's aggregate makes (None: no live secret)."""
        secret = self.ledger.secret(self.tenant_id, name, fresh=True)
        if secret is None or secret.deleted:
            return None
        version = envelope_key_version(secret.envelope)
        return (name, secret.key_version, version, secret.value_version)

    def _catalog_row(self, name: str) -> SecretRow | None:
        """The secret's live catalog row as it is now (None: none)."""
        with self.ledger.reading() as cur:
            cur.execute(
                "SELECT name, key_version, envelope_version, version FROM kl_catalog "
                "WHERE tenant_id=? AND name=? AND deleted=0",
                (self.tenant_id, name),
            )
            found = cur.fetchone()
        return None if found is None else (found[0], found[1], found[2], found[3])

    def _on_catalog_contradicted(self, contradicted: dict[str, list[str]]) -> None:
        names = sorted(contradicted)
        shown = ", ".join(repr(name) for name in names[:NAMES_SHOWN])
        more = f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else ""
        self.add(
            "read_model_inconsistent_with_stream",
            "error",
            REBUILD,
            f"the catalog read model disagrees with the event stream for secret(s) "
            f"{shown}{more}: rebuild the read models before trusting this diagnosis",
            read_model="catalog",
            secret_names=names,
            columns={name: contradicted[name] for name in names},
        )

    def _report_secret(self, row: SecretRow, finding: str | None) -> None:
        name, key_version, _, value_version = row
        if finding == ENVELOPE_INVALID:
            self.add(
                ENVELOPE_INVALID,
                "error",
                DELETE_SECRET,
                f"the envelope of secret {name!r} cannot be parsed",
                secret_name=name,
                key_version=key_version,
                value_version=value_version,
            )
        elif finding == KEY_MISSING:
            key = self.keys.get(key_version)
            self.add(
                KEY_MISSING,
                "error",
                DELETE_SECRET,
                f"secret {name!r} names key version {key_version}, which "
                + ("does not exist" if key is None else "was destroyed"),
                secret_name=name,
                key_version=key_version,
                value_version=value_version,
            )
        elif finding == "secret_on_compromised_key":
            self._on_compromised(name, key_version)
        elif finding == UNWRAP_FAILED:
            probe = self.probe(key_version)
            self.add(
                UNWRAP_FAILED,
                "error",
                DELETE_SECRET,
                f"secret {name!r} is under key version {key_version}, which cannot be "
                f"unwrapped: {probe.reason}",
                secret_name=name,
                key_version=key_version,
                value_version=value_version,
                amk_id=probe.amk_id,
                unknown_master_key=probe.unknown_amk,
            )
        elif finding == "secret_on_retired_key":
            self._on_retired(name, key_version)

    def _check_material(self) -> None:
        for row in self.material:
            key = self.keys.get(row.version)
            if key is None or key.key_id != row.key_id:
                self.add(
                    "orphaned_key_material",
                    "warning",
                    DELETE_MATERIAL,
                    f"key material for version {row.version} matches no key event "
                    "(a rotation that lost a race, or a bad restore)",
                    key_version=row.version,
                    key_id=row.key_id,
                )
            elif key.status == "destroyed":
                self.add(
                    "destroyed_key_material_present",
                    "error",
                    DELETE_MATERIAL,
                    f"key version {row.version} was destroyed but its material is still stored",
                    key_version=row.version,
                    key_id=row.key_id,
                )
        for key in self.keys.values():
            if key.status != "retired":
                continue
            probe = self.probe(key.version)
            if probe.usable:
                continue
            missing = probe.reason == MATERIAL_MISSING
            self.add(
                "tenant_encryption_key_material_missing"
                if missing
                else "retired_tenant_encryption_key_unwrap_failed",
                "error",
                DELETE_KEY,
                f"retired key version {key.version} cannot be used: {probe.reason}",
                key_version=key.version,
                amk_id=probe.amk_id,
                unknown_master_key=probe.unknown_amk,
            )

    def report(self) -> DriftReport:
        keys = list(self.keys.values())
        active = [k for k in keys if k.status == "active"]
        usable_active = (
            [k for k in active if self.probe(k.version).usable]
            if (self.ledger.master_keys.current is not None)
            else []
        )
        by_severity = {
            f"{severity}_count": sum(i.severity == severity for i in self.issues)
            for severity in ("error", "warning", "info")
        }
        return DriftReport(
            tenant_id=self.tenant_id,
            checked_at=self.ledger.clock(),
            ok=not any(issue.severity == "error" for issue in self.issues),
            issues=self.issues,
            summary={
                "active_secret_count": len(self.secrets),
                "tenant_key_count": len(keys),
                "active_tenant_key_count": len(active),
                "usable_active_tenant_key_count": len(usable_active),
                "retired_tenant_key_count": sum(k.status == "retired" for k in keys),
                "compromised_tenant_key_count": sum(k.status == "compromised" for k in keys),
                "destroyed_tenant_key_count": sum(k.status == "destroyed" for k in keys),
                **by_severity,
            },
        )


@read_model_errors
def diagnose(ledger: Ledger, tenant_id: str, secret_names: list[str] | None = None) -> DriftReport:
    """Diagnose one tenant (optionally only some of its secrets)."""
    diagnosis = Diagnosis(ledger, tenant_id, secret_names)
    diagnosis.run()
    return diagnosis.report()
