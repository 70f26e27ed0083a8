"""Key operations that stopped or overlapped: a shred owed by a process killed after its
commit, a master-key rewrap racing an erasure, two runs of the due-key rotation."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import POSTGRES_URL, own_schema
from keyledger import InvalidInput, SecretService, super_admin
from keyledger.application.lifecycle import KeyLifecycle
from keyledger.infrastructure.settings import KeyledgerSettings

# A child that runs one operation and is SIGKILLed by itself right after the operation's
# commit, where it would shred: the deleted or replaced material is committed away, and
# no shred ran.
CHILD = r"""
import json, os, signal, sys
from keyledger import InvalidInput, SecretService, super_admin
from keyledger.application.ledger import Ledger

args = json.loads(sys.argv[1])
Ledger.shred = lambda self: os.kill(os.getpid(), signal.SIGKILL)
service = SecretService.create(args["url"], master_key=args["key"],
                               previous_master_keys=args["previous"])
with super_admin():
    if args["op"] == "cleanup":
        service.cleanup_retired_keys(older_than_days=0)
    else:
        service.rewrap_master_key()
sys.exit(3)  # not reached: killed where it would shred
"""


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'kl.db'}"
    else:
        with own_schema("lcr") as name:
            yield f"{POSTGRES_URL}?schema={name}"


def _killed_before_shredding(url: str, op: str, key: str, previous: list[str]) -> None:
    child = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(dict(url=url, op=op, key=key, previous=previous))],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert child.returncode == -9, child.stderr  # SIGKILL


def _wrapped(service: SecretService, tenant_id: str) -> dict[int, bytes]:
    with service._ledger.reading() as cur:
        cur.execute(
            "SELECT version, wrapped FROM kl_key_material WHERE tenant_id = ?", (tenant_id,)
        )
        return {int(row[0]): bytes(row[1]) for row in cur.fetchall()}


def _in_sqlite_files(url: str, needle: bytes) -> list[str]:
    path = Path(url.removeprefix("sqlite:///"))
    return [
        file.name
        for file in path.parent.iterdir()
        if file.name.startswith(path.name) and needle in file.read_bytes()
    ]


@pytest.mark.parametrize("op", ["cleanup", "rewrap"])
def test_a_run_killed_between_its_commit_and_its_shred_is_shredded_by_the_next_run(
    store_url: str, master_key: str, op: str
) -> None:
    """The next run has nothing left to destroy or re-wrap, but the material the killed
    run deleted or replaced may still be in the files: it shreds all the same."""
    service = SecretService.create(store_url, master_key=master_key)
    service.store_for_tenant("acme", "token", "t")
    service.rotate_key_for_tenant("acme")
    service.reencrypt_all_for_tenant("acme")
    gone = _wrapped(service, "acme")[1]
    service.close()
    current, previous = master_key, []
    if op == "rewrap":
        current, previous = secrets.token_hex(32), [master_key]

    _killed_before_shredding(store_url, op, current, previous)

    rerun = SecretService.create(store_url, master_key=current, previous_master_keys=previous)
    try:
        assert rerun._ledger.shred_pending()
        if store_url.startswith("sqlite"):
            assert _in_sqlite_files(store_url, gone)  # what the killed run left behind
        with super_admin():
            if op == "cleanup":
                assert rerun.cleanup_retired_keys(older_than_days=0).destroyed == 0
            else:
                assert rerun.rewrap_master_key().rewrapped == 0
        assert not rerun._ledger.shred_pending()
        if store_url.startswith("sqlite"):
            assert _in_sqlite_files(store_url, gone) == []
        assert gone not in _wrapped(rerun, "acme").values()
        assert rerun.retrieve_for_tenant("acme", "token").value == "t"
    finally:
        rerun.close()


def test_a_shred_that_succeeds_is_owed_nothing_more(store_url: str, master_key: str) -> None:
    service = SecretService.create(store_url, master_key=master_key)
    try:
        service.store_for_tenant("acme", "token", "t")
        assert not service._ledger.shred_pending()
        service.erase_tenant("acme", confirm=True)
        assert not service._ledger.shred_pending()
        service.shred_key_material()
        assert not service._ledger.shred_pending()
    finally:
        service.close()


# -- a rewrap racing an erasure ---------------------------------------------------------------


def test_a_rewrap_never_records_rewrapping_a_version_erased_while_it_ran(
    make_service: Callable[..., SecretService],
    master_key: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The rewrap lists every tenant's material first; a tenant erased before its turn has
    nothing left to re-wrap, and its destroyed version must not be recorded as re-wrapped."""
    old = make_service()
    for tenant_id in ("acme", "globex"):
        old.store_for_tenant(tenant_id, "token", "t")
    new_key = secrets.token_hex(32)
    service = make_service(
        master_key=new_key, settings=KeyledgerSettings(previous_master_keys=master_key)
    )
    real = KeyLifecycle._rewrap_tenant

    def erase_globex_first(self: KeyLifecycle, tenant_id: str, *args: Any) -> Any:
        if tenant_id == "globex":
            service.erase_tenant("globex", confirm=True)
        return real(self, tenant_id, *args)

    monkeypatch.setattr(KeyLifecycle, "_rewrap_tenant", erase_globex_first)
    with super_admin():
        result = service.rewrap_master_key()
        rewraps = [e.tenant_id for e in service.get_audit_logs(action="rewrap_key")]

    assert result.rewrapped == 1
    assert rewraps == ["acme"]
    keys = {k.tenant_id: (k.status, k.amk_id) for k in service.list_keys("globex")}
    assert keys["globex"][0] == "destroyed"
    assert keys["globex"][1] != service._ledger.current_master_key().amk_id


def test_two_rewraps_one_after_the_other_record_each_version_once(
    make_service: Callable[..., SecretService], master_key: str
) -> None:
    make_service().store_for_tenant("acme", "token", "t")
    new_key = secrets.token_hex(32)
    settings = KeyledgerSettings(previous_master_keys=master_key)
    first = make_service(master_key=new_key, settings=settings)

    with super_admin():
        assert first.rewrap_master_key().rewrapped == 1
        assert first.rewrap_master_key().rewrapped == 0
        assert len(first.get_audit_logs(action="rewrap_key")) == 1


# -- two runs of the due-key rotation ------------------------------------------------------------


def test_a_due_key_rotated_by_another_run_meanwhile_is_not_rotated_again(
    make_service: Callable[..., SecretService],
) -> None:
    settings = KeyledgerSettings(key_max_encryptions=1)
    one = make_service(settings=settings)
    one.store_for_tenant("acme", "token", "t")
    with super_admin():
        due_seen_by_both = one.keys_due()
    assert [(d.tenant_id, d.version) for d in due_seen_by_both] == [("acme", 1)]

    first = one.rotate_due_key(due_seen_by_both[0], user_id="cron-1")
    second = one.rotate_due_key(due_seen_by_both[0], user_id="cron-2")

    assert first is not None
    assert first.version == 2
    assert second is None
    assert [(k.version, k.status) for k in one.list_keys("acme")] == [
        (1, "retired"),
        (2, "active"),
    ]
    with super_admin():
        assert [e.user_id for e in one.get_audit_logs(action="rotate_key")] == ["cron-1"]


def test_rotate_due_key_takes_an_entry_of_keys_due(service: SecretService) -> None:
    service.store_for_tenant("acme", "token", "t")

    with pytest.raises(InvalidInput, match="KeyDue"):
        service.rotate_due_key(("acme", 1))  # type: ignore[arg-type]

    assert [k.version for k in service.list_keys("acme")] == [1]


def test_two_shreds_at_once_leave_no_debt_below_zero_to_swallow_the_next(
    store_url: str, master_key: str
) -> None:
    """Each shred takes off what it saw owed: two at once took it off twice, the count
    went below zero, and the next run killed before its shred left it at zero, owed
    nothing: never shredded (found by review)."""
    service = SecretService.create(store_url, master_key=master_key)
    other = SecretService.create(store_url, master_key=master_key)
    try:
        service.store_for_tenant("acme", "token", "t")
        service.rotate_key_for_tenant("acme")
        service.reencrypt_all_for_tenant("acme")
        service.close()
        _killed_before_shredding(store_url, "cleanup", master_key, [])  # one shred owed
        service = SecretService.create(store_url, master_key=master_key)
        ledger = service._ledger
        assert ledger.shred_pending()
        store_shred = ledger.store.shred

        def overlapped() -> None:  # the other shred runs while this one shreds
            other._ledger.shred()
            store_shred()

        ledger.store.shred = overlapped  # type: ignore[method-assign]
        ledger.shred()
        assert ledger._shreds_pending() == 0  # (was -1)

        service.rotate_key_for_tenant("acme")
        service.reencrypt_all_for_tenant("acme")
        service.close()
        _killed_before_shredding(store_url, "cleanup", master_key, [])
        service = SecretService.create(store_url, master_key=master_key)
        assert service._ledger.shred_pending()  # the killed run's shred is still owed
    finally:
        service.close()
        other.close()
