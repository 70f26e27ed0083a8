"""The ambient tenant and actor, and the super-admin scope (contextvars: per thread and task)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from keyledger.errors import TenantRequired
from keyledger.validation import check_identifier, check_label, check_optional_text

SYSTEM_ACTOR = "system"


@dataclass(frozen=True)
class Actor:
    """Who is acting: recorded on every audit entry."""

    user_id: str = SYSTEM_ACTOR
    ip_address: str | None = None
    user_agent: str | None = None


@dataclass(frozen=True)
class TenantScope:
    """A tenant and the actor working inside it."""

    tenant_id: str
    actor: Actor


_scope: ContextVar[TenantScope | None] = ContextVar("keyledger_tenant_scope", default=None)
_super_admin: ContextVar[bool] = ContextVar("keyledger_super_admin", default=False)


def make_actor(
    user_id: str | None = None, ip_address: str | None = None, user_agent: str | None = None
) -> Actor:
    """Validate and build an actor; a missing user id is recorded as ``system``."""
    return Actor(
        user_id=check_label("user_id", user_id) or SYSTEM_ACTOR,
        ip_address=check_label("ip_address", ip_address),
        user_agent=check_optional_text("user_agent", user_agent),
    )


@contextmanager
def tenant(
    tenant_id: str,
    *,
    user_id: str | None = None,
    ip_address: str | None = None,
    user_agent: str | None = None,
) -> Iterator[TenantScope]:
    """Run the block inside ``tenant_id`` with the given actor on every audit entry."""
    scope = TenantScope(
        tenant_id=check_identifier("tenant_id", tenant_id),
        actor=make_actor(user_id, ip_address, user_agent),
    )
    token = _scope.set(scope)
    try:
        yield scope
    finally:
        _scope.reset(token)


@contextmanager
def super_admin() -> Iterator[None]:
    """Allow the cross-tenant reads (audit of all tenants, key inventory of all tenants)."""
    token = _super_admin.set(True)
    try:
        yield
    finally:
        _super_admin.reset(token)


def current_scope() -> TenantScope:
    """The ambient tenant scope, or ``TenantRequired``."""
    scope = _scope.get()
    if scope is None:
        raise TenantRequired("this call needs a tenant: use keyledger.tenant(...) or *_for_tenant")
    return scope


def current_scope_or_none() -> TenantScope | None:
    """The ambient tenant scope, if any."""
    return _scope.get()


def is_super_admin() -> bool:
    """True inside ``super_admin()``."""
    return _super_admin.get()
