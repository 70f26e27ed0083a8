"""``Secret.create`` builds directly what the library's generic creation builds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock

import pytest

from keyledger.domain.secret import Secret

ACTOR = {"user_id": "alice", "ip_address": "10.0.0.1", "user_agent": None}
FIELDS: list[dict[str, Any]] = [
    dict(
        tenant_id="acme",
        name="db",
        envelope=b"\x01envelope",
        key_version=1,
        category=None,
        description=None,
        metadata={},
        expires_at=None,
        actor=ACTOR,
    ),
    dict(
        tenant_id="globex",
        name="api.key-2",
        envelope=b"\x02" * 40,
        key_version=7,
        category="payments",
        description="the key",
        metadata={"owner": "ops", "tier": "1"},
        expires_at=datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC),
        actor={"user_id": "system", "ip_address": None, "user_agent": "cli"},
    ),
]


@pytest.mark.parametrize("fields", FIELDS, ids=["bare", "every-option"])
def test_create_equals_the_librarys_creation(fields: dict[str, Any]) -> None:
    moment = datetime(2026, 11, 30, 5, 6, 7, 890123, tzinfo=UTC)
    with mock.patch.object(Secret.SecretCreated, "create_timestamp", return_value=moment):
        direct = Secret.create(**fields)
        generic = Secret._create(Secret.SecretCreated, **fields)

    direct_state, generic_state = dict(vars(direct)), dict(vars(generic))
    direct_events = direct_state.pop("_pending_events")
    generic_events = generic_state.pop("_pending_events")
    assert list(direct_state.items()) == list(generic_state.items())  # order included
    assert len(direct_events) == len(generic_events) == 1
    assert type(direct_events[0]) is type(generic_events[0])
    assert list(vars(direct_events[0]).items()) == list(vars(generic_events[0]).items())
    assert direct_events[0] == generic_events[0]


def test_a_created_secret_behaves_as_one_built_by_the_library() -> None:
    secret = Secret.create(**FIELDS[1])
    assert secret.id == Secret.create_id("globex", "api.key-2")
    assert secret.version == 1
    assert secret.created_on == secret.modified_on == secret.created_at

    secret.store(
        envelope=b"\x03",
        key_version=8,
        category=None,
        description=None,
        metadata={},
        expires_at=None,
        now=datetime.now(UTC) + timedelta(seconds=1),
        actor=ACTOR,
    )
    created, stored = secret.collect_events()
    assert (secret.version, secret.value_version, secret.key_version) == (2, 2, 8)
    assert isinstance(created, Secret.SecretCreated)
    assert isinstance(stored, Secret.SecretStored)
    replayed = created.mutate(None)
    assert replayed is not None
    stored.mutate(replayed)
    assert vars(replayed) == vars(secret)
