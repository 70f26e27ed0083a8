"""Read models rebuilt from the stream answer exactly as before (SPEC section 4)."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from keyledger import (
    InvalidInput,
    SecretDisabled,
    SecretExpired,
    SecretNotFound,
    SecretService,
    StorageError,
    super_admin,
    tenant,
)
from keyledger.application import read_models
from keyledger.infrastructure.settings import KeyledgerSettings
from keyledger.projections.schema import REBUILT_TABLES, read_model_table_statements

MakeService = Callable[..., SecretService]
NOW = datetime.now(UTC)
TENANTS = ("acme", "globex")


def varied_scenario(service: SecretService) -> None:
    """Every kind of event issue 2 produces, over two tenants sharing secret names."""
    with tenant("acme", user_id="alice", ip_address="203.0.113.7", user_agent="cli/1"):
        service.store("db", "p1", category="db", description="d", metadata={"env": "prod"})
        service.store("db", b"p2")
        service.store("api", "k", category="api", expires_at=NOW + timedelta(days=10))
        service.store("old", "o", expires_at=NOW - timedelta(days=1))
        service.store("off", "x", category="api")
        for _ in range(3):
            service.retrieve("db")
        service.retrieve("api")
        service.disable("off")
        with pytest.raises(SecretDisabled):
            service.retrieve("off")
        for _ in range(2):
            with pytest.raises(SecretExpired):
                service.retrieve("old")
        with pytest.raises(SecretNotFound):
            service.retrieve("missing")
        service.enable("missing")
        service.store("gone", "g")
        service.retrieve("gone")
        service.delete("gone")
        service.rotate_key()
        service.reencrypt_all()
        service.store("gone", "g2", category="", metadata={})
        service.rotate_key()
        service.store("db", "p3", clear_expiry=True)
    with tenant("globex", user_id="bob"):
        service.rotate_key()
        service.store("db", "other-tenant")
        service.retrieve("db")
        service.disable("db")
        service.enable("db")


def answers(service: SecretService) -> dict[str, Any]:
    """Every read-model answer the public API gives, for every tenant."""
    out: dict[str, Any] = {}
    with super_admin():
        out["audit"] = service.get_audit_logs(limit=1000)
        out["keys"] = service.list_keys()
        for tenant_id in TENANTS:
            out[f"audit:{tenant_id}"] = service.get_audit_logs(tenant_id=tenant_id, limit=1000)
    for tenant_id in TENANTS:
        with tenant(tenant_id):
            out[f"{tenant_id}:all"] = service.list(status=None, include_expired=True)
            out[f"{tenant_id}:active"] = service.list()
            out[f"{tenant_id}:disabled"] = service.list(status="disabled")
            out[f"{tenant_id}:expired"] = service.list(status="expired")
            out[f"{tenant_id}:keys"] = service.list_keys()
            out[f"{tenant_id}:categories"] = service.categories()
            out[f"{tenant_id}:expiring"] = service.list_expiring(days=30)
            names = ("db", "api", "old", "off", "gone", "missing")
            out[f"{tenant_id}:exists"] = {name: service.exists(name) for name in names}
    return out


def access_counts(service: SecretService, tenant_id: str) -> dict[str, int]:
    infos = service.list_for_tenant(tenant_id, status=None, include_expired=True)
    return {info.name: info.access_count for info in infos}


def test_the_scenario_itself_leaves_the_expected_state(service: SecretService) -> None:
    varied_scenario(service)

    assert access_counts(service, "acme") == {"api": 1, "db": 3, "off": 0, "old": 0, "gone": 0}
    assert access_counts(service, "globex") == {"db": 1}


def test_rebuilding_the_read_models_gives_identical_answers(service: SecretService) -> None:
    varied_scenario(service)
    before = answers(service)

    replayed = service.rebuild_read_models()

    assert replayed >= len(before["audit"])
    assert answers(service) == before


def test_rebuilding_twice_gives_identical_answers(service: SecretService) -> None:
    varied_scenario(service)
    service.rebuild_read_models()
    once = answers(service)

    service.rebuild_read_models()

    assert answers(service) == once


def test_rebuilding_an_empty_store_gives_empty_answers(service: SecretService) -> None:
    before = answers(service)

    service.rebuild_read_models()

    assert answers(service) == before
    assert before["audit"] == []


def test_work_after_a_rebuild_continues_from_the_rebuilt_state(service: SecretService) -> None:
    varied_scenario(service)
    last_position = answers(service)["audit"][0].position
    service.rebuild_read_models()

    with tenant("acme"):
        secret = service.retrieve("db")
        service.store("new", "n")
        new_key = service.rotate_key()
        audit = service.get_audit_logs(limit=3)

    assert secret.access_count == 4
    assert secret.value == "p3"
    assert new_key.version == 4
    assert all(entry.position > last_position for entry in audit)
    assert access_counts(service, "acme")["db"] == 4


def test_values_stay_readable_after_a_rebuild(service: SecretService) -> None:
    varied_scenario(service)

    service.rebuild_read_models()

    assert service.retrieve_for_tenant("acme", "db").value == "p3"
    assert service.retrieve_for_tenant("acme", "gone").value == "g2"
    assert service.retrieve_for_tenant("globex", "db").value == "other-tenant"


def test_a_service_reopened_on_the_store_gives_identical_answers(
    make_service: MakeService,
) -> None:
    first = make_service()
    varied_scenario(first)
    before = answers(first)

    reopened = make_service()

    assert answers(reopened) == before
    reopened.rebuild_read_models()
    assert answers(first) == before


def test_catching_up_from_two_services_writing_in_turn_matches_a_rebuild(
    make_service: MakeService,
) -> None:
    """Each service catches the audit model up with its own appends as it made them, and
    reads the other's back from the stream: the rows must be the ones a rebuild makes."""
    first, second = make_service(), make_service()
    for round_number in range(3):
        for writer, user in ((first, "alice"), (second, "bob")):
            with tenant("acme", user_id=user, ip_address=f"10.0.0.{round_number}"):
                writer.store(f"s{round_number}", f"v-{user}")
                writer.retrieve(f"s{round_number}")
                with pytest.raises(SecretNotFound):
                    writer.retrieve("missing")
        if round_number == 1:  # the second one catches up with both: the first's memory is stale
            answers(second)
    caught_up = answers(first)
    assert answers(second) == caught_up

    first.rebuild_read_models()

    assert answers(first) == caught_up
    assert [entry.user_id for entry in caught_up["audit:acme"]][:3] == ["bob", "bob", "bob"]


def test_catching_up_in_pages_across_own_and_foreign_runs_matches_a_rebuild(
    make_service: MakeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages of three: runs of one service's own appends (taken from its memory without
    reading the stream) end mid-page and across pages, with the other's in between; each
    event must be projected once, in stream order."""
    monkeypatch.setattr(read_models, "PAGE_SIZE", 3)
    first, second = make_service(), make_service()
    with tenant("acme", user_id="alice"):
        first.store("own", "v")
        for _ in range(7):
            first.retrieve("own")
    with tenant("acme", user_id="bob"):
        second.retrieve("own")
        second.retrieve("own")
    with tenant("acme", user_id="alice"):
        for _ in range(4):
            first.retrieve("own")
    caught_up = answers(first)
    users = [entry.user_id for entry in reversed(caught_up["audit:acme"])]

    first.rebuild_read_models()

    assert answers(first) == caught_up
    assert users == ["alice"] * 9 + ["bob"] * 2 + ["alice"] * 4  # create_key, create, reads
    positions = [entry.position for entry in caught_up["audit"]]
    assert positions == sorted(set(positions), reverse=True)


def test_a_long_run_of_new_secrets_rebuilds_row_for_row(service: SecretService) -> None:
    """Replays insert a run of created secrets with one statement (arrays on PostgreSQL):
    every column must come out as one-by-one projection made it, NULLs included."""
    with tenant("acme", user_id="alice"):
        for i in range(40):
            service.store(
                f"s{i:02}",
                f"v{i}",
                category=None if i % 3 == 0 else f"c{i % 4}",
                description=None if i % 2 else f"d\u00e9{i}",
                expires_at=NOW + timedelta(days=i + 1) if i % 5 == 0 else None,
                metadata={"k": str(i)} if i % 4 == 0 else None,
            )
        service.retrieve("s07")
        service.store("s41", "after the reads")
    before = answers(service)
    with tenant("acme"):
        listed = service.list(status=None, include_expired=True, limit=100)

    service.rebuild_read_models()

    assert answers(service) == before
    with tenant("acme"):
        assert service.list(status=None, include_expired=True, limit=100) == listed
    assert len(listed) == 41


def test_an_interleaved_stream_rebuilds_row_for_row(service: SecretService) -> None:
    """Replays hold reads and creations back and apply them together, ahead of what does
    not commute with them: reads of many secrets between creations, updates, disables,
    deletions, revivals (which reset a count) and key rotations must come out exactly as
    the inline projection applied them one by one."""
    rng = random.Random(20261130)
    names = [f"n{i}" for i in range(6)]
    live: dict[str, set[str]] = {tenant_id: set() for tenant_id in TENANTS}
    for step in range(240):
        tenant_id = rng.choice(TENANTS)
        name = rng.choice(names)
        roll = rng.random()
        with tenant(tenant_id, user_id=f"u{step % 3}"):
            if name not in live[tenant_id] or roll < 0.15:
                service.store(name, f"v{step}", category=rng.choice([None, "a", "b"]))
                live[tenant_id].add(name)
            elif roll < 0.75:
                service.retrieve(name)
            elif roll < 0.82:
                service.delete(name)
                live[tenant_id].discard(name)
            elif roll < 0.9:
                service.disable(name)
                with pytest.raises(SecretDisabled):
                    service.retrieve(name)
                service.enable(name)
            elif roll < 0.95:
                service.rotate_key()
            else:
                service.reencrypt_all()
    before = answers(service)
    counts = {tenant_id: access_counts(service, tenant_id) for tenant_id in TENANTS}
    assert sum(sum(c.values()) for c in counts.values()) > 50  # reads did count

    service.rebuild_read_models()

    assert answers(service) == before
    assert {tenant_id: access_counts(service, tenant_id) for tenant_id in TENANTS} == counts


def test_events_of_a_secret_created_in_the_same_replay_batch_land_on_its_row(
    service: SecretService,
) -> None:
    """A replay holds creations back; a secret's later events in the same batch (update,
    disable, delete, revival) must still apply to its row, after it was inserted."""
    with tenant("acme", user_id="alice"):
        service.store("first", "v")  # the keyring's creation comes before the run
        service.store("a", "v1", category="x")
        service.store("b", "v1")
        service.retrieve("a")
        service.disable("b")
        service.store("a", "v2", description="changed")
        service.delete("b")
        service.store("c", "v1")
        service.retrieve("c")
        service.store("b", "revived")
        service.retrieve("b")
        service.retrieve("a")
    before = answers(service)
    with tenant("acme"):
        listed = service.list(status=None, include_expired=True, limit=100)
    assert {info.name: (info.access_count, info.version) for info in listed} == {
        "first": (0, 1),
        "a": (2, 2),
        "b": (1, 2),
        "c": (1, 1),
    }

    service.rebuild_read_models()

    assert answers(service) == before
    with tenant("acme"):
        assert service.list(status=None, include_expired=True, limit=100) == listed


def corrupt_every_read_model(service: SecretService) -> None:
    """What a bug or a bad restore could leave: every read model wrong, the stream intact."""
    with service._ledger.store.writing() as cur:
        cur.execute("UPDATE kl_catalog SET access_count = 999")
        cur.execute("UPDATE kl_keys SET status = 'retired'")
        cur.execute("DELETE FROM kl_audit")


def by_read_model(answers_: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The answers grouped by the read model that gives them."""
    groups: dict[str, dict[str, Any]] = {"audit": {}, "keys": {}, "catalog": {}}
    for key, value in answers_.items():
        if key.startswith("audit"):
            groups["audit"][key] = value
        elif key == "keys" or key.endswith(":keys"):
            groups["keys"][key] = value
        else:
            groups["catalog"][key] = value
    return groups


@pytest.mark.parametrize(
    ("names", "rebuilt"),
    [
        (["audit"], {"audit"}),
        (["catalog"], {"catalog", "keys"}),  # one projector writes both
        (["keys"], {"catalog", "keys"}),
        (["audit", "keys"], {"audit", "catalog", "keys"}),
    ],
)
def test_a_named_rebuild_repairs_that_read_model_and_leaves_the_others_as_they_are(
    service: SecretService, names: list[str], rebuilt: set[str]
) -> None:
    varied_scenario(service)
    good = by_read_model(answers(service))
    corrupt_every_read_model(service)
    bad = by_read_model(answers(service))
    assert all(bad[model] != good[model] for model in good)

    service.rebuild_read_models(names=names)

    after = by_read_model(answers(service))
    for model in good:
        assert after[model] == (good[model] if model in rebuilt else bad[model]), model


@pytest.mark.parametrize("names", [["secrets"], "audit", [1]], ids=["unknown", "str", "int"])
def test_a_rebuild_of_unknown_read_models_is_refused_and_changes_nothing(
    service: SecretService, names: Any
) -> None:
    varied_scenario(service)
    before = answers(service)
    with pytest.raises(InvalidInput):
        service.rebuild_read_models(names=names)
    assert answers(service) == before


def test_a_rebuild_started_during_another_of_the_same_read_models_leaves_them_whole(
    service: SecretService,
) -> None:
    """The second rebuild drops the shared copies and switches first; the first one, back
    at work, either finishes or fails loudly: the read models are never left half built."""
    varied_scenario(service)
    before = answers(service)
    corrupt_every_read_model(service)
    started: list[int] = []

    def meanwhile(count: int) -> None:
        if not started:
            started.append(service.rebuild_read_models(names=["catalog"]))

    with pytest.raises(StorageError, match="another rebuild"):  # its copies were switched in
        service.rebuild_read_models(progress=meanwhile, names=["keys"])

    assert started
    after = by_read_model(answers(service))
    assert after["catalog"] == by_read_model(before)["catalog"]
    assert after["keys"] == by_read_model(before)["keys"]


def test_rebuilds_of_different_read_models_at_once_each_rebuild_their_own(
    service: SecretService,
) -> None:
    varied_scenario(service)
    before = answers(service)
    corrupt_every_read_model(service)
    inner: list[int] = []

    def meanwhile(count: int) -> None:
        if not inner:
            inner.append(service.rebuild_read_models(names=["audit"]))

    service.rebuild_read_models(progress=meanwhile, names=["catalog"])

    assert inner
    assert answers(service) == before


def test_a_rebuilds_switch_keeps_maintainers_out_until_it_ends(
    service: SecretService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A catch-up that started during the switch would replay into the replaced audit
    table from the old position: the switch holds the maintainers' lock as well. A
    maintainer knocks as soon as the switch holds its locks, and must wait for its end."""
    varied_scenario(service)
    store = service._ledger.store
    order: list[str] = []
    maintainers: list[threading.Thread] = []
    real_hold = store.hold_maintainers

    def maintainer() -> None:
        with store.projecting() as cur:
            cur.execute("SELECT 1")
            order.append("maintainer runs")

    def hold_then_knock(cur: Any) -> None:
        real_hold(cur)
        knocking = threading.Thread(target=maintainer)
        knocking.start()
        maintainers.append(knocking)
        knocking.join(timeout=0.5)  # it would have run by now, were it not kept out
        order.append("switch goes on")

    monkeypatch.setattr(store, "hold_maintainers", hold_then_knock)
    service.rebuild_read_models()
    for knocking in maintainers:
        knocking.join(timeout=30)

    assert order == ["switch goes on", "maintainer runs"]  # it ran once the switch ended


def test_a_switch_that_finds_its_copies_reset_replays_in_batches_again(
    service: SecretService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another rebuild of the same read models may reset the copies between this one's
    bulk and its switch: the whole stream is then replayed in batches again, never in
    the switch's transaction, which holds the write lock."""
    varied_scenario(service)
    before = answers(service)
    store = service._ledger.store
    real_switch = read_models._switch
    resets: list[str] = []

    def switch_after_a_reset(*args: Any) -> int:
        suffix = args[2]
        if not resets:  # as another rebuild's start does
            resets.append(suffix)
            with store.projecting() as cur:
                for table in REBUILT_TABLES:
                    cur.execute(f"DROP TABLE IF EXISTS {table}{suffix}")
                for statement in read_model_table_statements(store.dialect, suffix):
                    cur.execute(statement)
        return real_switch(*args)

    monkeypatch.setattr(read_models, "PAGE_SIZE", 5)
    monkeypatch.setattr(read_models, "_switch", switch_after_a_reset)
    counts: list[int] = []
    replayed = service.rebuild_read_models(progress=counts.append)

    assert resets == ["_rebuild_all"]
    assert max(counts) <= 5  # the tail in the switch too
    assert replayed == sum(counts)
    assert answers(service) == before


def test_a_rebuild_that_fails_for_another_reason_says_so(
    service: SecretService, monkeypatch: pytest.MonkeyPatch
) -> None:
    varied_scenario(service)
    before = answers(service)

    def unavailable(*args: Any) -> int:
        raise StorageError("store unavailable: the server went away")

    monkeypatch.setattr(read_models, "_switch", unavailable)
    with pytest.raises(StorageError, match=r"^store unavailable: the server went away$"):
        service.rebuild_read_models()
    assert answers(service) == before  # the live read models are untouched


@pytest.mark.parametrize("dropped", [("kl_catalog",), ("kl_audit", "kl_tracking"), REBUILT_TABLES])
def test_a_read_model_dropped_by_hand_is_restored_by_a_rebuild_without_creating_tables(
    make_service: Callable[..., SecretService], dropped: tuple[str, ...]
) -> None:
    """SPEC section 4: read models can be dropped and rebuilt at any time; production
    services open the store with KEYLEDGER_CREATE_TABLES=false (docs/postgresql.md)."""
    service = make_service()
    varied_scenario(service)
    before = answers(service)
    operator = make_service(settings=KeyledgerSettings(create_tables=False))
    with operator._ledger.store.projecting() as cur:
        for table in dropped:
            cur.execute(f"DROP TABLE {table}")

    operator.rebuild_read_models()

    assert answers(service) == before
    assert operator.check_schema().present


def _sqlite_audit_indexes(service: SecretService, table: str = "kl_audit") -> list[tuple[str, ...]]:
    """The column lists of ``table``'s indexes (SQLite), sorted."""
    with service._ledger.store.projecting() as cur:
        cur.execute("SELECT name FROM pragma_index_list(?) WHERE origin = 'c'", (table,))
        names = [row[0] for row in cur.fetchall()]
        found = []
        for name in names:
            cur.execute("SELECT name FROM pragma_index_info(?) ORDER BY seqno", (name,))
            found.append(tuple(row[0] for row in cur.fetchall()))
    return sorted(found)


AUDIT_INDEX_COLUMNS = [("tenant_id", "position"), ("tenant_id", "secret_name", "position")]


def test_on_sqlite_the_switch_builds_no_index(
    make_service: Callable[..., SecretService], backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite's write lock covers the whole file, and it cannot rename an index: the copy
    is indexed from its start, so the switch (which every write waits for) builds none,
    and the live model keeps exactly one index of each kind, rebuild after rebuild."""
    if backend != "sqlite":
        pytest.skip("SQLite files' own way: PostgreSQL indexes the copy before the switch")
    service = make_service()
    varied_scenario(service)
    before = answers(service)
    real_switch = read_models._switch
    at_switch: list[list[tuple[str, ...]]] = []
    created_in_switch: list[str] = []

    def switch(store: Any, *args: Any) -> int:
        at_switch.append(_sqlite_audit_indexes(service, "kl_audit_rebuild_all"))
        real_writing = store.writing

        @contextmanager
        def writing() -> Iterator[Any]:
            with real_writing() as cur:
                real_execute = cur.execute

                def execute(statement: str, *params: Any) -> Any:
                    if "CREATE INDEX" in statement.upper():
                        created_in_switch.append(statement)
                    return real_execute(statement, *params)

                monkeypatch.setattr(cur, "execute", execute)
                yield cur

        monkeypatch.setattr(store, "writing", writing)
        try:
            return real_switch(store, *args)
        finally:
            monkeypatch.setattr(store, "writing", real_writing)

    monkeypatch.setattr(read_models, "_switch", switch)
    for _ in range(3):
        service.rebuild_read_models()
        assert _sqlite_audit_indexes(service) == AUDIT_INDEX_COLUMNS
    assert at_switch == [AUDIT_INDEX_COLUMNS] * 3
    assert created_in_switch == []
    assert answers(service) == before
    reopened = make_service()  # creating tables again adds no second index of a kind
    assert _sqlite_audit_indexes(reopened) == AUDIT_INDEX_COLUMNS
    with reopened._ledger.store.projecting() as cur:
        cur.execute(
            "EXPLAIN QUERY PLAN SELECT * FROM kl_audit WHERE tenant_id = 'acme' "
            "AND secret_name = 'x' ORDER BY position"
        )
        plan = " ".join(str(row[-1]) for row in cur.fetchall())
    assert "USING INDEX" in plan


def test_on_postgresql_the_switch_renames_indexes_built_before_it(
    make_service: Callable[..., SecretService], backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The switch holds the write lock, which every retrieve needs: the audit model's
    indexes are built on the copy before it (seconds on a large model), not in it."""
    if backend != "postgres":
        pytest.skip("SQLite cannot rename an index: its copy is indexed from the start")
    service = make_service()
    varied_scenario(service)
    before = answers(service)
    store = service._ledger.store
    real_switch = read_models._switch
    found_at_switch: list[set[str]] = []

    def indexes() -> set[str]:
        with store.projecting() as cur:
            cur.execute("SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()")
            return {row[0] for row in cur.fetchall() if row[0].startswith("kl_audit_by")}

    def switch(*args: Any) -> int:
        found_at_switch.append(indexes())
        return real_switch(*args)

    monkeypatch.setattr(read_models, "_switch", switch)
    service.rebuild_read_models()

    assert found_at_switch == [
        {
            "kl_audit_by_tenant",
            "kl_audit_by_secret",
            "kl_audit_by_tenant_rebuild_all",
            "kl_audit_by_secret_rebuild_all",
        }
    ]
    assert indexes() == {"kl_audit_by_tenant", "kl_audit_by_secret"}
    assert answers(service) == before
