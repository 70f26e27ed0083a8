"""SecretService: the public facade. Thin: validates, resolves the tenant, delegates."""

from __future__ import annotations

import atexit
import builtins
import weakref
from collections.abc import Callable, Collection, Iterable
from datetime import datetime
from types import TracebackType
from typing import Literal, Self

from keyledger.application.drift import diagnose
from keyledger.application.keys import KeyCommands
from keyledger.application.ledger import Ledger
from keyledger.application.lifecycle import KeyLifecycle, RewrapResult
from keyledger.application.queries import Queries
from keyledger.application.read_model_check import check_read_models
from keyledger.application.read_models import (
    audit_lag,
    audit_position,
    catch_up_audit,
    follow,
    owner_needed,
    rebuild_read_models,
    rebuilt_together,
)
from keyledger.application.repair import repair
from keyledger.application.row_errors import read_model_errors
from keyledger.application.schema_check import SchemaStatus, check_schema
from keyledger.application.secrets import SecretCommands, StoreOptions
from keyledger.composition import build_ledger
from keyledger.context import (
    Actor,
    current_scope,
    current_scope_or_none,
    is_super_admin,
    make_actor,
)
from keyledger.errors import InvalidInput, InvalidMasterKey, StorageError
from keyledger.infrastructure.settings import KeyledgerSettings, load_settings
from keyledger.investigation import AuditInvestigation
from keyledger.models import (
    AUDIT_ACTIONS,
    AuditEntry,
    CleanupResult,
    DriftReport,
    KeyDue,
    ReadModelCheck,
    ReencryptResult,
    RepairResult,
    SecretInfo,
    TenantKeyInfo,
)
from keyledger.models import Secret as SecretModel
from keyledger.projections.timeutil import from_micros
from keyledger.validation import (
    check_aware,
    check_bool,
    check_callback,
    check_count,
    check_days,
    check_filter_text,
    check_identifier,
    check_label,
    check_metadata,
    check_optional_text,
    check_value,
)

StatusFilter = Literal["active", "disabled", "expired"] | None
_STATUSES = ("active", "disabled", "expired")
_ACTIONS = frozenset(AUDIT_ACTIONS)
_RESULTS = frozenset(("success", "failure", "denied"))


class SecretService(AuditInvestigation):
    """Per-tenant secrets with envelope encryption and an event-sourced audit stream."""

    def __init__(self, ledger: Ledger, settings: KeyledgerSettings) -> None:
        self._ledger = ledger
        self._settings = settings
        self._queries = Queries(ledger)
        self._secrets = SecretCommands(ledger)
        self._keys = KeyCommands(ledger, self._queries)
        self._lifecycle = KeyLifecycle(ledger, self._queries)
        # A store never closed is closed at interpreter exit, by atexit, while threads
        # still run. Left to eventsourcing's Application.__del__ at finalization, closing
        # a PostgreSQL pool joins worker threads frozen by then: on Python 3.13, about 5 s
        # per thread at every exit. Only at exit: the ledger, not this service, is what
        # an audit export's generator or a copy of the service holds, and closing it when
        # the service was collected failed them (found by review).
        self._close_at_exit = _closer(ledger)
        atexit.register(self._close_at_exit)

    @classmethod
    def create(
        cls,
        database_url: str | None = None,
        *,
        master_key: str | None = None,
        previous_master_keys: list[str] | None = None,
        settings: KeyledgerSettings | None = None,
    ) -> Self:
        """Open a store. Malformed master keys raise ``InvalidMasterKey`` here, never later."""
        if database_url is not None and not isinstance(database_url, str):
            raise InvalidInput(f"database_url must be a str, not {type(database_url).__name__}")
        if previous_master_keys is not None and not isinstance(previous_master_keys, list | tuple):
            # A single str would be split into one-character "keys"; say what is expected.
            raise InvalidMasterKey("previous_master_keys must be a list of str")
        if settings is not None and not isinstance(settings, KeyledgerSettings):
            raise InvalidInput(f"settings must be KeyledgerSettings, not {type(settings).__name__}")
        settings = settings or load_settings()
        ledger = build_ledger(
            settings,
            database_url=database_url,
            master_key=master_key,
            previous_master_keys=previous_master_keys,
        )
        return cls(ledger, settings)

    def __repr__(self) -> str:
        return f"SecretService(amk_ids={self._ledger.master_keys.known_ids!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release the store's connections."""
        atexit.unregister(self._close_at_exit)
        self._ledger.close()

    # -- scope --------------------------------------------------------------------------

    @staticmethod
    def _scope() -> tuple[str, Actor]:
        scope = current_scope()
        return scope.tenant_id, scope.actor

    @staticmethod
    def _explicit(
        tenant_id: str, user_id: str | None, ip_address: str | None, user_agent: str | None
    ) -> tuple[str, Actor]:
        return check_identifier("tenant_id", tenant_id), make_actor(user_id, ip_address, user_agent)

    # -- secrets ------------------------------------------------------------------------

    def store(
        self,
        name: str,
        value: str | bytes,
        *,
        category: str | None = None,
        description: str | None = None,
        expires_at: datetime | None = None,
        clear_expiry: bool = False,
        metadata: dict[str, str] | None = None,
    ) -> SecretInfo:
        """Create or update ``name`` with ``value``; options left out keep their old values."""
        tenant_id, actor = self._scope()
        return self._store(
            tenant_id, actor, name, value, category, description, expires_at, clear_expiry, metadata
        )

    def store_for_tenant(
        self,
        tenant_id: str,
        name: str,
        value: str | bytes,
        *,
        category: str | None = None,
        description: str | None = None,
        expires_at: datetime | None = None,
        clear_expiry: bool = False,
        metadata: dict[str, str] | None = None,
        user_id: str | None = None,
        ip_address: str | None = None,
        user_agent: str | None = None,
    ) -> SecretInfo:
        """``store`` for an explicit tenant (and actor)."""
        tenant_id, actor = self._explicit(tenant_id, user_id, ip_address, user_agent)
        return self._store(
            tenant_id, actor, name, value, category, description, expires_at, clear_expiry, metadata
        )

    @property
    def max_value_bytes(self) -> int:
        """The largest value a store accepts, in bytes (KEYLEDGER_MAX_VALUE_BYTES)."""
        return self._settings.max_value_bytes

    def _store(
        self,
        tenant_id: str,
        actor: Actor,
        name: str,
        value: str | bytes,
        category: str | None,
        description: str | None,
        expires_at: datetime | None,
        clear_expiry: bool,
        metadata: dict[str, str] | None,
    ) -> SecretInfo:
        name = check_identifier("name", name)
        check_value(value, self._settings.max_value_bytes)
        check_bool("clear_expiry", clear_expiry)
        options = StoreOptions(
            category=check_label("category", category, 200),
            description=check_optional_text("description", description),
            expires_at=check_aware("expires_at", expires_at),
            clear_expiry=clear_expiry,
            metadata=check_metadata(metadata),
        )
        if options.clear_expiry and options.expires_at is not None:
            raise InvalidInput("give expires_at or clear_expiry, not both")
        plain: str | bytes = value if isinstance(value, str) else bytes(value)
        return self._secrets.store(tenant_id, name, plain, options, actor)

    def retrieve(self, name: str) -> SecretModel:
        """The secret with its value; the read is recorded before the value is returned."""
        tenant_id, actor = self._scope()
        return self._secrets.retrieve(tenant_id, check_identifier("name", name), actor)

    def retrieve_for_tenant(
        self,
        tenant_id: str,
        name: str,
        *,
        user_id: str | None = None,
        ip_address: str | None = None,
        user_agent: str | None = None,
    ) -> SecretModel:
        """``retrieve`` for an explicit tenant (and actor)."""
        tenant_id, actor = self._explicit(tenant_id, user_id, ip_address, user_agent)
        return self._secrets.retrieve(tenant_id, check_identifier("name", name), actor)

    def list(
        self,
        *,
        category: str | None = None,
        status: StatusFilter = "active",
        include_expired: bool = False,
        limit: int | None = None,
        offset: int = 0,
        after_name: str | None = None,
    ) -> builtins.list[SecretInfo]:
        """Secrets of the tenant by name, never values; expired ones filtered before paging.

        ``after_name``: only names after it (by code point). Paging with it (the last
        name of one page for the next) is stable while secrets are stored and deleted,
        where ``offset`` pages shift."""
        tenant_id, _ = self._scope()
        return self.list_for_tenant(
            tenant_id,
            category=category,
            status=status,
            include_expired=include_expired,
            limit=limit,
            offset=offset,
            after_name=after_name,
        )

    def list_for_tenant(
        self,
        tenant_id: str,
        *,
        category: str | None = None,
        status: StatusFilter = "active",
        include_expired: bool = False,
        limit: int | None = None,
        offset: int = 0,
        after_name: str | None = None,
    ) -> builtins.list[SecretInfo]:
        """``list`` for an explicit tenant."""
        tenant_id = check_identifier("tenant_id", tenant_id)
        if status is not None and status not in _STATUSES:
            raise InvalidInput(f"status must be one of {', '.join(_STATUSES)} or None")
        check_bool("include_expired", include_expired)
        statuses = {status} if status else {"active", "disabled"}
        if include_expired:
            statuses.add("expired")
        return self._queries.list_secrets(
            tenant_id,
            category=check_filter_text("category", category, 200),
            statuses=sorted(statuses),
            limit=check_count("limit", limit, allow_none=True),
            offset=check_count("offset", offset) or 0,
            after_name=None if after_name is None else check_identifier("after_name", after_name),
        )

    def exists(self, name: str) -> bool:
        """True when a live secret of that name exists (any status)."""
        tenant_id, _ = self._scope()
        return self._queries.exists(tenant_id, check_identifier("name", name))

    def categories(self) -> builtins.list[str]:
        """Sorted unique non-empty categories of the tenant's live secrets."""
        tenant_id, _ = self._scope()
        return self._queries.categories(tenant_id)

    def list_expiring(self, days: int = 30) -> builtins.list[SecretInfo]:
        """Active secrets expiring within ``days`` days, soonest first."""
        tenant_id, _ = self._scope()
        return self._queries.list_expiring(tenant_id, check_days("days", days))

    def disable(self, name: str) -> bool:
        """Disable a secret; False when it does not exist."""
        return self._change(name, "disable")

    def enable(self, name: str) -> bool:
        """Enable a secret (an expired one stays expired); False when it does not exist."""
        return self._change(name, "enable")

    def delete(self, name: str) -> bool:
        """Delete a secret from every listing and read; False when it does not exist."""
        return self._change(name, "delete")

    def _change(self, name: str, action: str) -> bool:
        tenant_id, actor = self._scope()
        return self.change_for_tenant(tenant_id, name, action, actor)

    def disable_for_tenant(
        self,
        tenant_id: str,
        name: str,
        *,
        user_id: str | None = None,
        ip_address: str | None = None,
        user_agent: str | None = None,
    ) -> bool:
        """``disable`` for an explicit tenant (and actor)."""
        return self._change_explicit(tenant_id, name, "disable", user_id, ip_address, user_agent)

    def enable_for_tenant(
        self,
        tenant_id: str,
        name: str,
        *,
        user_id: str | None = None,
        ip_address: str | None = None,
        user_agent: str | None = None,
    ) -> bool:
        """``enable`` for an explicit tenant (and actor)."""
        return self._change_explicit(tenant_id, name, "enable", user_id, ip_address, user_agent)

    def delete_for_tenant(
        self,
        tenant_id: str,
        name: str,
        *,
        user_id: str | None = None,
        ip_address: str | None = None,
        user_agent: str | None = None,
    ) -> bool:
        """``delete`` for an explicit tenant (and actor)."""
        return self._change_explicit(tenant_id, name, "delete", user_id, ip_address, user_agent)

    def _change_explicit(
        self,
        tenant_id: str,
        name: str,
        action: str,
        user_id: str | None,
        ip_address: str | None,
        user_agent: str | None,
    ) -> bool:
        """A status change for an explicit tenant and actor, each checked once."""
        tenant_id, actor = self._explicit(tenant_id, user_id, ip_address, user_agent)
        return self._secrets.change(tenant_id, check_identifier("name", name), action, actor)

    def change_for_tenant(self, tenant_id: str, name: str, action: str, actor: Actor) -> bool:
        """disable/enable/delete for an explicit tenant and actor (the CLI's entry)."""
        if action not in ("disable", "enable", "delete"):
            raise InvalidInput(f"unknown action {action!r}")
        tenant_id = check_identifier("tenant_id", tenant_id)
        if not isinstance(actor, Actor):
            raise InvalidInput(f"actor must be a keyledger Actor, not {type(actor).__name__}")
        # Checked like every actor the API builds: what is recorded stays in the stream.
        actor = make_actor(actor.user_id, actor.ip_address, actor.user_agent)
        return self._secrets.change(tenant_id, check_identifier("name", name), action, actor)

    # -- keys ---------------------------------------------------------------------------

    def rotate_key(self) -> TenantKeyInfo:
        """Make a new key version active and retire the previous one (no re-encryption)."""
        tenant_id, actor = self._scope()
        return self._keys.rotate(tenant_id, actor)

    def rotate_key_for_tenant(
        self,
        tenant_id: str,
        *,
        user_id: str | None = None,
        ip_address: str | None = None,
        user_agent: str | None = None,
    ) -> TenantKeyInfo:
        """``rotate_key`` for an explicit tenant (and actor)."""
        tenant_id, actor = self._explicit(tenant_id, user_id, ip_address, user_agent)
        return self._keys.rotate(tenant_id, actor)

    def reencrypt_all(self, *, progress: Callable[[int], None] | None = None) -> ReencryptResult:
        """Re-encrypt every live secret still under an older key version."""
        tenant_id, actor = self._scope()
        check_callback("progress", progress)
        return self._keys.reencrypt_all(tenant_id, actor, progress)

    def reencrypt_all_for_tenant(
        self,
        tenant_id: str,
        *,
        user_id: str | None = None,
        ip_address: str | None = None,
        user_agent: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> ReencryptResult:
        """``reencrypt_all`` for an explicit tenant (and actor)."""
        tenant_id, actor = self._explicit(tenant_id, user_id, ip_address, user_agent)
        check_callback("progress", progress)
        return self._keys.reencrypt_all(tenant_id, actor, progress)

    def compromise_key(self, version: int, reason: str) -> TenantKeyInfo:
        """Never use ``version`` again; an active version is replaced in the same step."""
        tenant_id, actor = self._scope()
        return self._compromise(tenant_id, version, reason, actor)

    def compromise_key_for_tenant(
        self,
        tenant_id: str,
        version: int,
        reason: str,
        *,
        user_id: str | None = None,
        ip_address: str | None = None,
        user_agent: str | None = None,
    ) -> TenantKeyInfo:
        """``compromise_key`` for an explicit tenant (and actor)."""
        tenant_id, actor = self._explicit(tenant_id, user_id, ip_address, user_agent)
        return self._compromise(tenant_id, version, reason, actor)

    def _compromise(self, tenant_id: str, version: int, reason: str, actor: Actor) -> TenantKeyInfo:
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise InvalidInput("version must be a positive integer")
        reason = check_optional_text("reason", reason) or ""
        if not reason.strip():
            raise InvalidInput("a compromise needs a reason")
        return self._lifecycle.compromise(tenant_id, version, reason, actor)

    def cleanup_retired_keys(
        self,
        older_than_days: int = 90,
        *,
        user_id: str | None = None,
        ip_address: str | None = None,
        user_agent: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> CleanupResult:
        """Destroy retired (and compromised) versions retired (or compromised) N+ days ago,
        across tenants, unless a live secret still uses them. ``progress(1)`` after each
        version considered."""
        days = check_days("older_than_days", older_than_days)
        check_callback("progress", progress)
        actor = make_actor(user_id, ip_address, user_agent)
        return self._lifecycle.cleanup_retired(days, actor, progress)

    def erase_tenant(
        self,
        tenant_id: str,
        *,
        confirm: bool = False,
        user_id: str | None = None,
        ip_address: str | None = None,
        user_agent: str | None = None,
    ) -> builtins.list[int]:
        """Destroy all the tenant's key versions: every value it stored becomes unrecoverable."""
        tenant_id = check_identifier("tenant_id", tenant_id)
        actor = make_actor(user_id, ip_address, user_agent)
        # Anything but True is no confirmation (ConfirmationRequired, SPEC section 6).
        return self._lifecycle.erase_tenant(tenant_id, confirm is True, actor)

    def rewrap_master_key(
        self,
        *,
        user_id: str | None = None,
        ip_address: str | None = None,
        user_agent: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> RewrapResult:
        """Re-wrap every tenant's usable key versions under the current master key."""
        check_callback("progress", progress)
        return self._lifecycle.rewrap(make_actor(user_id, ip_address, user_agent), progress)

    def count_key_material(self, *, to_rewrap: bool = False) -> int:
        """How many usable key versions have material (for progress bars); with
        ``to_rewrap``, only those not yet wrapped by the current master key."""
        rows = self._queries.usable_key_material()
        if not to_rewrap:
            return len(rows)
        current = self.master_key_id()
        return sum(row.amk_id != current for row in rows)

    def master_key_id(self) -> str:
        """The id (a fingerprint, not the key) of the current master key, which new key
        versions and a rewrap use; ``MasterKeyUnavailable`` when none is configured."""
        return self._ledger.current_master_key().amk_id

    # -- drift --------------------------------------------------------------------------

    def diagnose_tenant_secret_key_drift(
        self, tenant_id: str, secret_names: builtins.list[str] | None = None
    ) -> DriftReport:
        """Diagnose how a tenant's secrets and keys drifted apart; never decrypts a value."""
        tenant_id = check_identifier("tenant_id", tenant_id)
        if secret_names is not None and (
            isinstance(secret_names, str) or not isinstance(secret_names, Collection)
        ):
            raise InvalidInput("secret_names must be a list of secret names")
        names = (
            None
            if secret_names is None
            else [check_identifier("secret name", name) for name in secret_names]
        )
        return diagnose(self._ledger, tenant_id, names)

    def diagnose_current_tenant_secret_key_drift(
        self, secret_names: builtins.list[str] | None = None
    ) -> DriftReport:
        """``diagnose_tenant_secret_key_drift`` for the tenant of the current scope."""
        tenant_id, _ = self._scope()
        return self.diagnose_tenant_secret_key_drift(tenant_id, secret_names)

    def repair_tenant_secret_key_drift(
        self,
        tenant_id: str,
        *,
        dry_run: bool = False,
        confirm_delete_unrecoverable_data: bool = False,
        confirmed_plan: RepairResult | None = None,
        user_id: str | None = None,
        ip_address: str | None = None,
        user_agent: str | None = None,
    ) -> RepairResult:
        """Repair drift; deleting anything needs ``confirm_delete_unrecoverable_data``.

        ``confirmed_plan``: the dry run whose plan was confirmed (a person read it, say).
        The repair diagnoses again before it deletes; if it would now delete a secret or a
        key version that plan did not name, it raises ``ConfirmationRequired`` and
        changes nothing, so what was confirmed bounds what is deleted."""
        tenant_id = check_identifier("tenant_id", tenant_id)
        # Checked, never coerced: dry_run=1 or "yes" must not turn into a real repair.
        # Anything but True confirms nothing: ConfirmationRequired (SPEC section 7).
        dry = check_bool("dry_run", dry_run)
        confirm = confirm_delete_unrecoverable_data is True
        if confirmed_plan is not None and not isinstance(confirmed_plan, RepairResult):
            raise InvalidInput("confirmed_plan must be the RepairResult of a dry run")
        return repair(
            self._ledger,
            self._lifecycle,
            self._keys.reencrypt_all,
            tenant_id,
            dry_run=dry,
            confirm=confirm,
            confirmed=confirmed_plan,
            actor=make_actor(user_id, ip_address, user_agent),
        )

    @read_model_errors
    def keys_due(self, tenant_id: str | None = None) -> builtins.list[KeyDue]:
        """Active key versions past KEYLEDGER_KEY_MAX_AGE_DAYS or the encryption budget:
        of the current (or given) tenant; of all tenants inside super_admin() (SPEC: the
        key inventory of all tenants is a cross-tenant read)."""
        scope = self._key_scope(tenant_id)
        now = self._ledger.clock()
        due = []
        for tenant, version, created, encryptions in self._queries.active_key_usage(scope):
            created_at = from_micros(created)
            age_days = (now - created_at).total_seconds() / 86400
            reasons = []
            if age_days >= self._settings.key_max_age_days:
                reasons.append(f"older than {self._settings.key_max_age_days:g} days")
            if encryptions >= self._settings.key_max_encryptions:
                reasons.append(f"{encryptions} encryptions under it")
            if reasons:
                due.append(
                    KeyDue(
                        tenant_id=tenant,
                        version=version,
                        created_at=created_at,
                        age_days=round(age_days, 3),
                        encryptions=encryptions,
                        reasons=reasons,
                    )
                )
        return due

    def rotate_due_keys(
        self,
        tenant_id: str | None = None,
        *,
        user_id: str | None = None,
        ip_address: str | None = None,
        user_agent: str | None = None,
    ) -> builtins.list[TenantKeyInfo]:
        """Rotate every due key version of ``keys_due``'s scope (all tenants inside
        super_admin()). When the scope is the ambient ``tenant(...)`` block's tenant and
        no actor is given, the rotations are recorded with the block's actor, as every
        call that takes its tenant from there is; a named tenant or every tenant, with
        the actor given (``system`` by default), as the calls that name their tenant."""
        explicit = make_actor(user_id, ip_address, user_agent)  # checked before any rotation
        ambient = current_scope_or_none()
        no_actor = user_id is None and ip_address is None and user_agent is None
        if no_actor and tenant_id is None and ambient is not None and not is_super_admin():
            explicit = ambient.actor
        due = self.keys_due(tenant_id)
        rotated = (self._keys.rotate_from(key.tenant_id, key.version, explicit) for key in due)
        return [info for info in rotated if info is not None]

    def rotate_due_key(
        self,
        due: KeyDue,
        *,
        user_id: str | None = None,
        ip_address: str | None = None,
        user_agent: str | None = None,
    ) -> TenantKeyInfo | None:
        """Rotate the tenant of one ``keys_due`` entry while that version is still its
        active one; None when another rotation came first (an overlapping run)."""
        if not isinstance(due, KeyDue):
            raise InvalidInput(f"due must be a KeyDue (from keys_due()), not {type(due).__name__}")
        tenant_id, actor = self._explicit(due.tenant_id, user_id, ip_address, user_agent)
        return self._keys.rotate_from(tenant_id, due.version, actor)

    def list_keys(self, tenant_id: str | None = None) -> builtins.list[TenantKeyInfo]:
        """Key versions of the current (or given) tenant; all tenants inside super_admin()."""
        return self._queries.key_infos(self._key_scope(tenant_id))

    def _key_scope(self, tenant_id: str | None) -> str | None:
        """The tenant a key inventory covers: the given one, else all tenants (None)
        inside super_admin(), else the current tenant (TenantRequired outside one)."""
        if tenant_id is not None:
            return check_identifier("tenant_id", tenant_id)
        if is_super_admin():
            return None
        return self._scope()[0]

    def count_live_secrets(self, tenant_id: str) -> int:
        """How many live secrets the tenant has (for progress bars)."""
        return len(self._queries.live_secret_versions(check_identifier("tenant_id", tenant_id)))

    # -- audit --------------------------------------------------------------------------

    def get_audit_logs(
        self,
        *,
        secret_name: str | None = None,
        action: str | None = None,
        result: str | None = None,
        user_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
        offset: int = 0,
        tenant_id: str | None = None,
        before_position: int | None = None,
    ) -> builtins.list[AuditEntry]:
        """Audit entries, newest first; ``tenant_id`` (or all tenants) only in super_admin().

        ``before_position``: only entries before that stream position. Paging with it (the
        last entry's ``position`` of one page for the next) is stable while entries are
        appended, where ``offset`` pages shift by every entry added since the first page.
        """
        if is_super_admin():
            scope_tenant = None if tenant_id is None else check_identifier("tenant_id", tenant_id)
        else:
            if tenant_id is not None:
                raise InvalidInput("tenant_id is only accepted inside super_admin()")
            scope_tenant, _ = self._scope()
        if action is not None and (not isinstance(action, str) or action not in _ACTIONS):
            raise InvalidInput(f"unknown audit action {action!r}")
        if result is not None and (not isinstance(result, str) or result not in _RESULTS):
            raise InvalidInput(f"unknown audit result {result!r}")
        return self._queries.audit_logs(
            tenant_id=scope_tenant,
            secret_name=None if secret_name is None else check_identifier("name", secret_name),
            action=action,
            result=result,
            user_id=check_filter_text("user_id", user_id),
            since=check_aware("since", since),
            until=check_aware("until", until),
            limit=check_count("limit", limit) or 0,
            offset=check_count("offset", offset) or 0,
            before_position=check_count("before_position", before_position, allow_none=True),
        )

    # -- operator tools -------------------------------------------------------------------

    def shred_key_material(self) -> None:
        """Make the store drop deleted key material from its files now: what key cleanup,
        erasure, drift repair and a master-key rewrap do after they delete or replace
        material. For when one of them raised ``ShredIncomplete`` (a busy SQLite reader;
        on PostgreSQL a role that does not own ``kl_key_material``: run this as its owner).
        Records nothing: no key fact changes."""
        self._ledger.shred()

    def backup(self, target: str) -> None:
        """Copy a SQLite store (memory too), one consistent snapshot taken while writers go
        on, into the new file ``target`` (created readable by its owner only; an existing
        file is refused). A plain copy of the database file can miss everything still in
        its write-ahead log. ``StorageError`` on PostgreSQL: use its own tools."""
        if not isinstance(target, str) or not target:
            raise InvalidInput("target must be a file path (a non-empty str)")
        self._ledger.store.backup(target)

    def rebuild_read_models(
        self,
        *,
        progress: Callable[[int], None] | None = None,
        names: Collection[str] | None = None,
    ) -> int:
        """Rebuild read models from the stream (built aside, then switched); returns the
        events replayed. ``names``: some of "catalog", "audit", "keys" (None: every one);
        the catalog and the keys are always rebuilt together (one projector writes both)."""
        check_callback("progress", progress)
        chosen = _read_model_names(names)
        with owner_needed("a rebuild of the read models"):
            return rebuild_read_models(self._ledger, progress, chosen)

    def check_read_models(
        self,
        *,
        progress: Callable[[int], None] | None = None,
        names: Collection[str] | None = None,
    ) -> ReadModelCheck:
        """Compare read models with a replay of the stream (built aside, then dropped),
        row by row; changes no live row. ``names`` as for ``rebuild_read_models``.
        ``consistent`` is False when a row is missing, unexpected or altered (edited
        outside keyledger, say): ``rebuild_read_models`` then restores them."""
        check_callback("progress", progress)
        chosen = _read_model_names(names)
        with owner_needed("a check of the read models"):
            return check_read_models(self._ledger, progress, chosen)

    def init_schema(self) -> SchemaStatus:
        """Create every table, index and trigger the store needs (idempotent)."""
        self._ledger.create_schema()
        return check_schema(self._ledger)

    def check_schema(self) -> SchemaStatus:
        """Whether the schema is present and current (tables, columns, append-only trigger)."""
        return check_schema(self._ledger)

    def follow_read_models(
        self,
        *,
        stop: Callable[[], bool],
        idle_seconds: float = 1.0,
        on_progress: Callable[[int], None] | None = None,
        seal: bool = True,
        on_retry: Callable[[StorageError, float], None] | None = None,
    ) -> int:
        """Keep the lagging read models current until ``stop()`` (the projection worker);
        with ``seal``, seal the audit stream whenever idle. A ``StorageError`` (a lost
        connection) is tried again three times in a row, after 1, 2 and 4 seconds, each
        announced to ``on_retry(error, seconds)``; then it is raised."""
        if not callable(stop):
            raise InvalidInput(f"stop must be callable, not {type(stop).__name__}")
        check_callback("on_progress", on_progress)
        check_callback("on_retry", on_retry)
        check_bool("seal", seal)
        if (
            isinstance(idle_seconds, bool)
            or not isinstance(idle_seconds, int | float)
            or not 0 < idle_seconds <= 86_400
        ):
            raise InvalidInput("idle_seconds must be above 0 and at most 86400 (one day)")
        return follow(
            self._ledger,
            stop=stop,
            wait=self._ledger.wait_for_events,
            idle_seconds=idle_seconds,
            on_progress=on_progress,
            seal_when_idle=seal,
            on_retry=on_retry,
        )

    def catch_up_read_models(self, *, seal: bool = False) -> int:
        """Bring the lazily projected audit model up to the stream head; returns events.
        With ``seal``, then seal the audit stream as the projection worker does when idle
        (where there is an audit key; a seal that stops is logged, never raised)."""
        check_bool("seal", seal)
        applied = catch_up_audit(self._ledger)
        if seal:
            self._ledger.seal_automatically()
            applied += catch_up_audit(self._ledger)  # (its checkpoints: nothing left behind)
        return applied

    def read_model_status(self) -> dict[str, tuple[int, int]]:
        """Per read model: (position reached, stream head). Inline models are always current."""
        reached, head = audit_position(self._ledger)
        return {"catalog": (head, head), "keys": (head, head), "audit": (reached, head)}

    def read_model_lag(self) -> dict[str, int]:
        """Per read model: how many events it has still to apply (positions can have gaps,
        so this is not head minus position). Inline models are always current."""
        return {"catalog": 0, "keys": 0, "audit": audit_lag(self._ledger)}


def _read_model_names(names: Collection[str] | None) -> builtins.list[str] | None:
    """``names`` of read models as a list, checked (None: every one)."""
    if names is None:
        return None
    if isinstance(names, str | bytes) or not isinstance(names, Iterable):
        raise InvalidInput("names must be a collection of read-model names")
    chosen = builtins.list(names)
    if not all(isinstance(name, str) for name in chosen):
        raise InvalidInput("names must be a collection of read-model names")
    try:
        rebuilt_together(chosen)
    except ValueError as error:
        raise InvalidInput(str(error)) from None
    return chosen


def _closer(ledger: Ledger) -> Callable[[], None]:
    """What closes ``ledger`` at exit if it is still there (a weak reference: a service
    and ledger collected meanwhile are not kept alive for it)."""
    reference = weakref.ref(ledger)

    def close() -> None:
        alive = reference()
        if alive is not None and not alive.closed:
            alive.close()

    return close
