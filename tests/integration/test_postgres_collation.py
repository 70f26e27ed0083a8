"""On PostgreSQL, listings sort by code point whatever the database's locale, as on SQLite.

A database created with a language collation (ICU en-US here) would otherwise sort
``B`` after ``a`` and ignore punctuation, so the same secrets would list and page in
another order than on SQLite, and differently from one server to the next.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from conftest import POSTGRES_URL, RUN_ID
from keyledger import SecretService, tenant

pytestmark = pytest.mark.postgres

NAMES = ["b", "B", "_x", "a", "Ä", "a-b", "ab", "Z"]


@pytest.fixture
def english_database() -> Iterator[str]:
    """A database of its own whose default collation is ICU's en-US, dropped after."""
    name = f"kl_{RUN_ID}_icu"
    create = sql.SQL(
        "CREATE DATABASE {} LOCALE_PROVIDER icu ICU_LOCALE 'en-US' TEMPLATE template0"
    ).format(sql.Identifier(name))
    with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as admin:
        admin.execute(create)
    try:
        yield POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def test_names_and_categories_sort_by_code_point_in_a_database_with_a_language_collation(
    english_database: str, master_key: str
) -> None:
    with psycopg.connect(english_database, connect_timeout=5) as conn:
        row = conn.execute("SELECT array_agg(n ORDER BY n) FROM unnest(%s::text[]) AS n", (NAMES,))
        server_order = row.fetchone()[0]  # type: ignore[index]
    assert server_order != sorted(NAMES)  # the database alone would sort them otherwise

    url = f"{english_database}?schema=keyledger"
    with SecretService.create(url, master_key=master_key) as service:
        for name in NAMES:
            service.store_for_tenant("acme", name, "v", category=name)
        listed = [info.name for info in service.list_for_tenant("acme")]
        paged = [
            info.name
            for offset in range(0, len(NAMES), 3)
            for info in service.list_for_tenant("acme", limit=3, offset=offset)
        ]
        with tenant("acme"):
            categories = service.categories()

    assert listed == paged == sorted(NAMES)
    assert categories == sorted(NAMES)


def test_rebuilding_the_catalog_gives_a_schema_made_before_0_8_the_code_point_order(
    english_database: str, master_key: str
) -> None:
    url = f"{english_database}?schema=keyledger"
    with SecretService.create(url, master_key=master_key) as service:
        for name in NAMES:
            service.store_for_tenant("acme", name, "v")
    with psycopg.connect(english_database, autocommit=True, connect_timeout=5) as conn:
        for column in ("tenant_id", "name", "category"):  # as 0.7 created them
            conn.execute(
                f"ALTER TABLE keyledger.kl_catalog ALTER COLUMN {column} "
                'TYPE text COLLATE "default"'
            )
    with SecretService.create(url, master_key=master_key) as service:
        old_order = [info.name for info in service.list_for_tenant("acme")]
        service.rebuild_read_models(names=["catalog"])
        new_order = [info.name for info in service.list_for_tenant("acme")]

    assert old_order != sorted(NAMES)
    assert new_order == sorted(NAMES)
