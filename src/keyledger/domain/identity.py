"""Where a secret or a keyring belongs: the aggregate id its tenant (and name) derive.

The ids are derived (``domain/ids.py``), and the events carry the tenant and the name
the envelope's AAD binds, so an aggregate, or an event, stored under an id its own
tenant and name do not derive was copied or forged in the store: loading, replaying
and projecting all refuse it.
"""

from __future__ import annotations

from typing import Literal
from uuid import UUID

from keyledger.domain.ids import keyring_id, secret_id
from keyledger.domain.keyring import TenantKeyring
from keyledger.domain.secret import Secret


def derived_id(item: object) -> tuple[UUID, Literal["secret", "keyring"]] | None:
    """The id a secret's or keyring's aggregate or event must be stored under, and which
    of the two it is; None for anything else (a read record's id is random)."""
    if isinstance(item, Secret | Secret.Event):
        return secret_id(item.tenant_id, item.name), "secret"
    if isinstance(item, TenantKeyring | TenantKeyring.Event):
        return keyring_id(item.tenant_id), "keyring"
    return None
