"""The fresh pool a forked child gets carries every setting of the one it replaces."""

from __future__ import annotations

from eventsourcing.postgres import ConnectionPool

from keyledger.infrastructure.pg_fork import fresh_pool, unknown_pool_parameters


def test_every_constructor_parameter_of_the_pool_is_carried_over() -> None:
    assert unknown_pool_parameters(ConnectionPool) == set()


def test_the_fresh_pool_has_the_old_ones_settings_and_is_not_open() -> None:
    def configure(conn: object) -> None: ...

    def password() -> str:
        return "x"

    old = ConnectionPool(
        "",
        kwargs={"dbname": "d", "options": "-c search_path=s"},
        min_size=2,
        max_size=7,
        open=False,
        configure=configure,
        timeout=3.5,
        max_waiting=9,
        max_lifetime=77.0,
        max_idle=33.0,
        get_password_func=password,
    )
    new = fresh_pool(old)

    assert new is not old
    assert new.closed
    assert (new.kwargs, new.min_size, new.max_size) == (old.kwargs, 2, 7)
    assert (new.timeout, new.max_waiting, new.max_lifetime, new.max_idle) == (3.5, 9, 77.0, 33.0)
    assert new._configure is configure
    assert new.get_password_func is password
