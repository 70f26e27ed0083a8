"""The ambient tenant and actor: isolation, defaults, explicit variants (SPEC section 2)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from keyledger import SecretNotFound, SecretService, TenantRequired, super_admin, tenant


def audit_actors(
    service: SecretService, tenant_id: str
) -> list[tuple[str, str | None, str | None]]:
    with super_admin():
        entries = service.get_audit_logs(tenant_id=tenant_id)
    return [(e.user_id, e.ip_address, e.user_agent) for e in entries]


def test_the_actor_defaults_to_system(service: SecretService) -> None:
    with tenant("acme"):
        service.store("token", "v")
        service.retrieve("token")

    assert set(audit_actors(service, "acme")) == {("system", None, None)}


def test_the_tenant_block_records_its_actor_on_every_entry(service: SecretService) -> None:
    with tenant("acme", user_id="alice", ip_address="203.0.113.7", user_agent="billing/2.1"):
        service.store("token", "v")
        service.retrieve("token")
        service.disable("token")

    assert set(audit_actors(service, "acme")) == {("alice", "203.0.113.7", "billing/2.1")}


def test_the_tenant_ends_with_its_block(service: SecretService) -> None:
    with tenant("acme"):
        service.store("token", "v")

    with pytest.raises(TenantRequired):
        service.list()


def test_a_nested_tenant_block_applies_inside_and_the_outer_one_returns_after(
    service: SecretService,
) -> None:
    with tenant("acme", user_id="alice"):
        service.store("token", "acme-value")
        with tenant("globex", user_id="bob"):
            service.store("token", "globex-value")
        assert service.retrieve("token").value == "acme-value"

    assert audit_actors(service, "globex") == [("bob", None, None)] * 2
    assert {actor[0] for actor in audit_actors(service, "acme")} == {"alice"}


def test_two_tenants_with_the_same_secret_name_never_collide(service: SecretService) -> None:
    with tenant("acme"):
        service.store("token", "acme-1", category="a", metadata={"owner": "acme"})
        service.store("token", "acme-2")
    with tenant("globex"):
        service.store("token", "globex-1", category="g")
        service.disable("token")
    with tenant("acme"):
        acme_secret = service.retrieve("token")
        assert service.categories() == ["a"]

    assert (acme_secret.value, acme_secret.version, acme_secret.status) == ("acme-2", 2, "active")
    assert acme_secret.metadata == {"owner": "acme"}
    [globex_info] = service.list_for_tenant("globex", status=None)
    assert (globex_info.version, globex_info.status, globex_info.category) == (1, "disabled", "g")


def test_deleting_in_one_tenant_leaves_the_same_name_in_another(service: SecretService) -> None:
    service.store_for_tenant("acme", "token", "a")
    service.store_for_tenant("globex", "token", "g")

    with tenant("acme"):
        assert service.delete("token") is True
        with pytest.raises(SecretNotFound):
            service.retrieve("token")

    assert service.retrieve_for_tenant("globex", "token").value == "g"


def test_a_secret_of_another_tenant_is_not_found(service: SecretService) -> None:
    service.store_for_tenant("acme", "only-acme", "v")

    with tenant("globex"):
        assert not service.exists("only-acme")
        assert service.list(status=None, include_expired=True) == []
        assert service.disable("only-acme") is False
        with pytest.raises(SecretNotFound):
            service.retrieve("only-acme")

    assert service.retrieve_for_tenant("acme", "only-acme").value == "v"


def test_for_tenant_variants_need_no_tenant_block_and_record_their_actor(
    service: SecretService,
) -> None:
    info = service.store_for_tenant(
        "acme", "token", "v", category="c", user_id="ops", ip_address="10.0.0.1", user_agent="ci"
    )
    secret = service.retrieve_for_tenant("acme", "token", user_id="ops")

    assert (info.name, info.category, secret.value, secret.access_count) == ("token", "c", "v", 1)
    assert audit_actors(service, "acme") == [
        ("ops", None, None),
        ("ops", "10.0.0.1", "ci"),
        ("ops", "10.0.0.1", "ci"),
    ]


def test_disable_enable_and_delete_for_tenant_record_their_actor(
    service: SecretService,
) -> None:
    service.store_for_tenant("acme", "token", "v")
    who = {"user_id": "ops", "ip_address": "10.0.0.1", "user_agent": "ci"}

    assert service.disable_for_tenant("acme", "token", **who)
    assert service.list_for_tenant("acme", status="disabled")[0].name == "token"
    assert service.enable_for_tenant("acme", "token", **who)
    assert service.delete_for_tenant("acme", "token", **who)
    assert not service.delete_for_tenant("acme", "token", user_id="ops")  # gone: False

    with super_admin():
        entries = service.get_audit_logs(tenant_id="acme")[:4][::-1]
    assert [(e.action, e.result, e.user_id) for e in entries] == [
        ("disable", "success", "ops"),
        ("enable", "success", "ops"),
        ("delete", "success", "ops"),
        ("delete", "failure", "ops"),
    ]
    assert {(e.ip_address, e.user_agent) for e in entries[:3]} == {("10.0.0.1", "ci")}


def test_for_tenant_variants_without_a_user_are_recorded_as_system(
    service: SecretService,
) -> None:
    service.store_for_tenant("acme", "token", "v")
    service.retrieve_for_tenant("acme", "token")

    assert {actor[0] for actor in audit_actors(service, "acme")} == {"system"}


def test_for_tenant_variants_ignore_the_ambient_tenant(service: SecretService) -> None:
    with tenant("acme", user_id="alice"):
        service.store_for_tenant("globex", "token", "g")
        assert service.list() == []
        assert service.retrieve_for_tenant("globex", "token").value == "g"
        assert [i.name for i in service.list_for_tenant("globex")] == ["token"]

    assert {actor[0] for actor in audit_actors(service, "globex")} == {"system"}


def test_threads_each_keep_their_own_tenant(service: SecretService) -> None:
    barrier = threading.Barrier(2)

    def work(tenant_id: str) -> list[str]:
        with tenant(tenant_id, user_id=f"user-{tenant_id}"):
            barrier.wait()  # both threads are inside their tenant blocks now
            service.store("shared-name", f"value-of-{tenant_id}")
            barrier.wait()
            return [str(service.retrieve("shared-name").value), service.list()[0].name]

    with ThreadPoolExecutor(max_workers=2) as pool:
        acme, globex = pool.map(work, ["acme", "globex"])

    assert acme == ["value-of-acme", "shared-name"]
    assert globex == ["value-of-globex", "shared-name"]
    assert {actor[0] for actor in audit_actors(service, "acme")} == {"user-acme"}
    assert {actor[0] for actor in audit_actors(service, "globex")} == {"user-globex"}


def test_a_new_thread_does_not_inherit_the_tenant(service: SecretService) -> None:
    errors: list[BaseException] = []

    def outside() -> None:
        try:
            service.list()
        except BaseException as error:
            errors.append(error)

    with tenant("acme"):
        thread = threading.Thread(target=outside)
        thread.start()
        thread.join()

    assert len(errors) == 1
    assert isinstance(errors[0], TenantRequired)


def test_asyncio_tasks_each_keep_their_own_tenant(service: SecretService) -> None:
    async def work(tenant_id: str) -> str:
        with tenant(tenant_id, user_id=f"user-{tenant_id}"):
            await asyncio.sleep(0)  # let the other task enter its own tenant block
            service.store("shared-name", f"value-of-{tenant_id}")
            await asyncio.sleep(0)
            return str(service.retrieve("shared-name").value)

    async def main() -> list[str]:
        return list(await asyncio.gather(work("acme"), work("globex")))

    assert asyncio.run(main()) == ["value-of-acme", "value-of-globex"]
    assert {actor[0] for actor in audit_actors(service, "acme")} == {"user-acme"}
    assert {actor[0] for actor in audit_actors(service, "globex")} == {"user-globex"}


def test_a_task_started_inside_a_tenant_block_keeps_that_tenant(service: SecretService) -> None:
    async def main() -> str:
        with tenant("acme"):
            task = asyncio.create_task(read_later())
        return await task

    async def read_later() -> str:
        await asyncio.sleep(0)
        return str(service.retrieve("token").value)

    service.store_for_tenant("acme", "token", "acme-value")

    assert asyncio.run(main()) == "acme-value"


def test_super_admin_ends_with_its_block(service: SecretService) -> None:
    service.store_for_tenant("acme", "token", "v")

    with super_admin():
        assert len(service.get_audit_logs()) == 2

    with pytest.raises(TenantRequired):
        service.get_audit_logs()
