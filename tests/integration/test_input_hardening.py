"""Hostile and careless input: typed errors that quote no secret, and nothing written.

A database URL whose password holds an unencoded reserved character, flags given as 1 or
"yes", counts and dates too large for the store, settings that would print or pickle a
password: each is refused with ``InvalidInput`` (or ``InvalidMasterKey``) before any write.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import traceback
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from pydantic import SecretStr

from keyledger import (
    ConfirmationRequired,
    InvalidInput,
    InvalidMasterKey,
    KeyledgerError,
    SecretService,
    super_admin,
    tenant,
)
from keyledger.cli import main
from keyledger.infrastructure.database_url import persistence_env, redact
from keyledger.infrastructure.settings import KeyledgerSettings
from keyledger.validation import MAX_COUNT, MAX_DAYS

# -- database URLs: the password never reaches a message -------------------------------------

# Each password is made of pieces that appear in no message, joined by characters that
# URL parsers treat as delimiters; no piece of it may show up anywhere.
PIECES = ("Zq7w", "Kx9v", "Jm3p")
RESERVED_PASSWORDS = [
    pytest.param("Zq7w?Kx9v", id="question-mark"),
    pytest.param("Zq7w#Kx9v", id="hash"),
    pytest.param("Zq7w/Kx9v", id="slash"),
    pytest.param("Zq7w/5432", id="slash-then-digits"),
    pytest.param("Zq7w[Kx9v", id="open-bracket"),
    pytest.param("Zq7w[Kx9v]Jm3p", id="brackets"),
    pytest.param("Zq7w?Kx9v#Jm3p/x", id="all-three"),
]
# Passwords a parser splits correctly (the last "@" ends the user info).
PARSEABLE_PASSWORDS = [
    pytest.param("Zq7w@Kx9v", id="at"),
    pytest.param("Zq7w:Kx9v", id="colon"),
    pytest.param("Zq7w%Kx9v", id="percent"),
    pytest.param("Zq7w%3FKx9v", id="percent-encoded"),
]
# URLs that are wrong whatever the password: every one must fail without naming it.
BROKEN_URLS = [
    pytest.param("postgresql://app:{pw}@127.0.0.1/", id="no-database"),
    pytest.param("postgresql://app:{pw}@127.0.0.1:99999/keys", id="port-out-of-range"),
    pytest.param("postgresql://app:{pw}@127.0.0.1:port/keys", id="port-not-a-number"),
    pytest.param("postgresql://app:{pw}@[::1/keys", id="broken-ipv6"),
    pytest.param("postgresql://app:{pw}@[db.example]/keys", id="bracketed-name"),
    pytest.param("postgresql://app:{pw}@127.0.0.1/keys?pool_size=many", id="bad-option"),
    pytest.param("postgresql://app:{pw}@127.0.0.1/keys?colour=blue", id="unknown-option"),
    pytest.param("postgresql://app:{pw}@127.0.0.1/keys?schema=Bad-Name", id="bad-schema"),
    pytest.param("postgres://app:{pw}@127.0.0.1/keys#frag", id="fragment"),
]


def assert_quotes_no_password(error: BaseException, password: str) -> None:
    """Neither the message, the repr nor the printed traceback holds the password."""
    shown = [str(error), repr(error), "".join(traceback.format_exception(error))]
    for text in shown:
        assert password not in text
        for piece in PIECES:
            assert piece not in text, text


def refused(url: str) -> InvalidInput:
    with pytest.raises(InvalidInput) as raised:
        persistence_env(url, lock_timeout_seconds=5, create_tables=False)
    return raised.value


@pytest.mark.parametrize("password", RESERVED_PASSWORDS)
def test_a_password_with_an_unencoded_reserved_character_is_refused_without_quoting_it(
    password: str,
) -> None:
    for url in (
        f"postgresql://app:{password}@127.0.0.1/keys",
        f"postgresql://app:{password}@127.0.0.1:5432/keys?schema=kl",
        f"postgres://app:{password}@db.example/keys",
    ):
        error = refused(url)
        assert "percent-encode" in str(error)
        assert_quotes_no_password(error, password)


@pytest.mark.parametrize("template", BROKEN_URLS)
@pytest.mark.parametrize("password", RESERVED_PASSWORDS + PARSEABLE_PASSWORDS)
def test_no_malformed_postgresql_url_quotes_its_password(template: str, password: str) -> None:
    error = refused(template.format(pw=password))

    assert isinstance(error, KeyledgerError)
    assert_quotes_no_password(error, password)


@pytest.mark.parametrize("password", RESERVED_PASSWORDS)
def test_creating_a_service_on_such_a_url_fails_before_connecting_and_quotes_nothing(
    password: str, master_key: str
) -> None:
    url = f"postgresql://app:{password}@127.0.0.1/keys"
    with pytest.raises(InvalidInput) as raised:
        SecretService.create(url, master_key=master_key)
    assert_quotes_no_password(raised.value, password)

    with pytest.raises(InvalidInput) as raised:
        SecretService.create(settings=KeyledgerSettings(database_url=url), master_key=master_key)
    assert_quotes_no_password(raised.value, password)


def test_passwords_a_parser_can_split_still_reach_the_store_decoded() -> None:
    def password(url: str) -> str:
        return persistence_env(url, lock_timeout_seconds=5, create_tables=False)[
            "POSTGRES_PASSWORD"
        ]

    assert password("postgresql://app:Zq7w%3FKx9v%2F@db.example/keys") == "Zq7w?Kx9v/"
    assert password("postgresql://app:Zq7w@Kx9v@db.example/keys") == "Zq7w@Kx9v"
    assert password("postgresql://app:Zq7w:Kx9v@db.example:6432/keys") == "Zq7w:Kx9v"


@pytest.mark.parametrize("password", RESERVED_PASSWORDS + PARSEABLE_PASSWORDS)
def test_redact_masks_every_piece_of_the_password(password: str) -> None:
    masked = redact(f"postgresql://app:{password}@db.example:5432/keys?schema=kl")

    assert masked == "postgresql://***@db.example:5432/keys?schema=kl"
    assert redact("sqlite:///keyledger.db") == "sqlite:///keyledger.db"


def cli(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def assert_one_error_line(output: str, exit_code: int) -> None:
    assert exit_code == 1
    assert output.startswith("Error: ")
    assert output.count("\n") == 1
    assert "Traceback" not in output


@pytest.mark.parametrize("password", RESERVED_PASSWORDS)
def test_the_cli_prints_one_error_line_without_the_password(password: str) -> None:
    url = f"postgresql://app:{password}@127.0.0.1/keys"
    for result in (
        cli("--database", url, "secrets", "list", "t1"),
        cli("secrets", "list", "t1", env={"KEYLEDGER_DATABASE_URL": url}),
    ):
        assert result.stdout == ""
        assert_one_error_line(result.stderr, result.exit_code)
        for piece in PIECES:
            assert piece not in result.stderr


def test_the_installed_script_prints_one_error_line_without_the_password() -> None:
    script = Path(sys.executable).parent / "keyledger"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYLEDGER_", "SMRT_"))}
    for url in (
        "postgresql://u:PW?SECRET@127.0.0.1/db",
        "postgresql://u:PW/SECRET@127.0.0.1/db",
        "postgresql://u:PW#SECRET@127.0.0.1/db",
    ):
        done = subprocess.run(
            [str(script), "--database", url, "secrets", "list", "t1"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.stdout == ""
        assert_one_error_line(done.stderr, done.returncode)
        assert "SECRET" not in done.stderr


# -- settings: the URL is a secret too ---------------------------------------------------------

URL_WITH_PASSWORD = "postgresql://app:Zq7wKx9v@db.example/keys"


def test_settings_never_show_the_database_password() -> None:
    settings = KeyledgerSettings(database_url=URL_WITH_PASSWORD)

    shown = (
        settings.model_dump_json(),
        str(settings.model_dump()),
        repr(settings),
        str(settings),
        str(settings.database_url),
        repr(settings.database_url),
    )
    assert all("Zq7wKx9v" not in text for text in shown)
    assert isinstance(settings.database_url, SecretStr)
    assert settings.database_url.get_secret_value() == URL_WITH_PASSWORD


def test_the_database_url_from_the_environment_is_masked_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KEYLEDGER_DATABASE_URL", URL_WITH_PASSWORD)
    settings = KeyledgerSettings()

    assert "Zq7wKx9v" not in settings.model_dump_json()
    assert settings.database_url.get_secret_value() == URL_WITH_PASSWORD


def test_the_default_database_url_is_a_secret_like_any_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KEYLEDGER_DATABASE_URL", raising=False)
    default = KeyledgerSettings().database_url

    assert isinstance(default, SecretStr)
    assert default.get_secret_value() == "sqlite:///keyledger.db"


def test_a_service_opens_on_the_database_url_of_its_settings(
    tmp_path: Path, master_key: str
) -> None:
    settings = KeyledgerSettings(database_url=f"sqlite:///{tmp_path / 'from-settings.db'}")
    with SecretService.create(settings=settings, master_key=master_key) as service:
        service.store_for_tenant("acme", "token", "v")
    assert (tmp_path / "from-settings.db").exists()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_settings_holding_secrets_cannot_be_pickled(protocol: int, master_key: str) -> None:
    settings = KeyledgerSettings(database_url=URL_WITH_PASSWORD, master_key=master_key)

    with pytest.raises(TypeError, match="cannot be pickled") as raised:
        pickle.dumps(settings, protocol=protocol)
    assert master_key not in str(raised.value)
    assert settings.model_copy(update={"create_tables": False}).create_tables is False


# -- flags are bools, never truthy values ------------------------------------------------------

NOT_BOOLS = [
    pytest.param(1, id="one"),
    pytest.param(0, id="zero"),
    pytest.param("yes", id="yes"),
    pytest.param("false", id="str-false"),
    pytest.param(None, id="none"),
]


def everything(service: SecretService) -> tuple[Any, ...]:
    """The whole audit stream, acme's secrets and keys: all a write could change."""
    with super_admin():
        audit = service.get_audit_logs(limit=MAX_COUNT)
    return (
        audit,
        service.list_for_tenant("acme", status=None, include_expired=True),
        service.list_keys("acme"),
    )


@pytest.fixture
def erased(service: SecretService) -> SecretService:
    """acme's secrets survive its erased keys: a confirmed repair would delete them."""
    service.store_for_tenant("acme", "db-password", "pw")
    service.store_for_tenant("acme", "api-token", "tok")
    service.erase_tenant("acme", confirm=True)
    return service


@pytest.mark.parametrize("dry_run", NOT_BOOLS)
def test_a_dry_run_flag_that_is_not_a_bool_is_refused_and_repairs_nothing(
    erased: SecretService, dry_run: Any
) -> None:
    before = everything(erased)

    with pytest.raises(InvalidInput, match="dry_run must be a bool"):
        erased.repair_tenant_secret_key_drift(
            "acme", dry_run=dry_run, confirm_delete_unrecoverable_data=True
        )

    assert everything(erased) == before
    names = {info.name for info in erased.list_for_tenant("acme")}
    assert names == {"db-password", "api-token"}
    plan = erased.repair_tenant_secret_key_drift("acme", dry_run=True)
    assert plan.would_delete_secrets == 2


@pytest.mark.parametrize("confirm", NOT_BOOLS)
def test_a_confirmation_that_is_not_true_confirms_nothing(
    erased: SecretService, confirm: Any
) -> None:
    """SPEC: anything but True is no confirmation (ConfirmationRequired), never a guess."""
    erased.store_for_tenant("globex", "s", "v")
    before = everything(erased)

    with pytest.raises(ConfirmationRequired):
        erased.repair_tenant_secret_key_drift("acme", confirm_delete_unrecoverable_data=confirm)
    with pytest.raises(ConfirmationRequired):
        erased.erase_tenant("globex", confirm=confirm)

    assert everything(erased) == before
    assert erased.retrieve_for_tenant("globex", "s").value == "v"


def test_the_seal_flag_of_the_projection_worker_must_be_a_bool(service: SecretService) -> None:
    with pytest.raises(InvalidInput, match="seal must be a bool"):
        service.follow_read_models(stop=lambda: True, seal=1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda s: s.reencrypt_all_for_tenant("acme", progress="x"), id="reencrypt"),
        pytest.param(lambda s: s.rewrap_master_key(progress=1), id="rewrap"),
        pytest.param(lambda s: s.rebuild_read_models(progress=[]), id="rebuild"),
    ],
)
def test_a_progress_callback_that_cannot_be_called_is_refused_before_any_work(
    service: SecretService, call: Callable[[SecretService], object]
) -> None:
    service.store_for_tenant("acme", "token", "v1")
    service.rotate_key_for_tenant("acme")
    before = everything(service)

    with pytest.raises(InvalidInput, match="progress must be callable"):
        call(service)

    assert everything(service) == before


# -- numbers and dates too large for the store ---------------------------------------------------

FAR_FUTURE_WEST = datetime(9999, 12, 31, 23, 0, tzinfo=timezone(timedelta(hours=-5)))
FAR_PAST_EAST = datetime(1, 1, 1, 1, 0, tzinfo=timezone(timedelta(hours=5)))


@pytest.fixture
def acme(service: SecretService) -> SecretService:
    service.store_for_tenant("acme", "token", "v")
    return service


@pytest.mark.parametrize(
    ("call", "bound"),
    [
        pytest.param(lambda s: s.list(limit=10**30), MAX_COUNT, id="list-limit"),
        pytest.param(lambda s: s.list(limit=MAX_COUNT + 1), MAX_COUNT, id="list-limit-bound"),
        pytest.param(lambda s: s.list(offset=2**63), MAX_COUNT, id="list-offset"),
        pytest.param(lambda s: s.get_audit_logs(limit=10**30), MAX_COUNT, id="audit-limit"),
        pytest.param(lambda s: s.get_audit_logs(offset=2**63), MAX_COUNT, id="audit-offset"),
        pytest.param(lambda s: s.state_as_of("acme", position=2**70), MAX_COUNT, id="position"),
        pytest.param(lambda s: s.list_expiring(10**10), MAX_DAYS, id="expiring-days"),
        pytest.param(lambda s: s.list_expiring(MAX_DAYS + 1), MAX_DAYS, id="expiring-bound"),
        pytest.param(lambda s: s.cleanup_retired_keys(10**10), MAX_DAYS, id="cleanup-days"),
    ],
)
def test_a_count_too_large_for_the_store_is_refused_naming_the_bound(
    acme: SecretService, call: Callable[[SecretService], object], bound: int
) -> None:
    before = everything(acme)

    with tenant("acme"), pytest.raises(InvalidInput, match=f"at most {bound}"):
        call(acme)

    assert everything(acme) == before


def test_counts_at_the_bounds_are_accepted(acme: SecretService) -> None:
    with tenant("acme"):
        assert [info.name for info in acme.list(limit=MAX_COUNT)] == ["token"]
        assert acme.list(offset=MAX_COUNT) == []
        assert acme.get_audit_logs(limit=MAX_COUNT) == acme.get_audit_logs()
        assert acme.get_audit_logs(offset=MAX_COUNT) == []
        assert acme.list_expiring(MAX_DAYS) == []
    assert acme.cleanup_retired_keys(MAX_DAYS).keys == []


def test_an_expiry_past_the_calendar_once_in_utc_is_refused_and_nothing_written(
    acme: SecretService,
) -> None:
    before = everything(acme)

    with tenant("acme"):
        with pytest.raises(InvalidInput, match="expires_at is out of range"):
            acme.store("token", "new", expires_at=FAR_FUTURE_WEST)
        with pytest.raises(InvalidInput, match="expires_at is out of range"):
            acme.store("fresh", "new", expires_at=FAR_FUTURE_WEST)
        with pytest.raises(InvalidInput, match="since is out of range"):
            acme.get_audit_logs(since=FAR_PAST_EAST)

    assert everything(acme) == before
    assert acme.retrieve_for_tenant("acme", "token").value == "v"


def test_the_latest_expiry_in_utc_is_still_accepted(acme: SecretService) -> None:
    latest = datetime(9999, 12, 31, 23, 0, tzinfo=UTC)
    with tenant("acme"):
        info = acme.store("token", "v2", expires_at=latest)
    assert info.expires_at == latest


class _BrokenZone(tzinfo):
    """A tzinfo whose offset is not a timedelta."""

    def utcoffset(self, dt: datetime | None) -> Any:
        return "five hours"

    def dst(self, dt: datetime | None) -> timedelta | None:
        return None

    def tzname(self, dt: datetime | None) -> str | None:
        return "broken"


def test_a_time_zone_without_a_valid_offset_is_refused(acme: SecretService) -> None:
    with tenant("acme"), pytest.raises(InvalidInput, match="expires_at"):
        acme.store("token", "v2", expires_at=datetime(2099, 1, 1, tzinfo=_BrokenZone()))


@pytest.mark.parametrize("action", [["read"], {"read": 1}], ids=["list", "dict"])
def test_an_unhashable_audit_filter_is_invalid_input(acme: SecretService, action: Any) -> None:
    with tenant("acme"):
        with pytest.raises(InvalidInput):
            acme.get_audit_logs(action=action)
        with pytest.raises(InvalidInput):
            acme.get_audit_logs(result=action)


def test_the_cli_refuses_huge_counts_in_one_error_line(tmp_path: Path, master_key: str) -> None:
    env = {
        "KEYLEDGER_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}",
        "KEYLEDGER_MASTER_KEY": master_key,
    }
    SecretService.create(env["KEYLEDGER_DATABASE_URL"], master_key=master_key).close()
    for args in (
        ("secrets", "list", "acme", "--limit", str(10**25)),
        ("audit", "log", "acme", "--limit", str(10**25)),
        ("keys", "cleanup-retired", "--older-than-days", str(10**10), "--yes"),
    ):
        result = cli(*args, env=env)
        assert_one_error_line(result.stderr, result.exit_code)
        assert "at most" in result.stderr


# -- the master key argument: a str, or InvalidMasterKey quoting nothing -----------------------


@pytest.mark.parametrize(
    "as_given",
    [
        pytest.param(bytes.fromhex, id="bytes"),
        pytest.param(lambda key: bytearray.fromhex(key), id="bytearray"),
        pytest.param(lambda key: key.encode(), id="hex-as-bytes"),
        pytest.param(lambda key: int(key, 16), id="int"),
    ],
)
def test_a_master_key_that_is_not_a_str_is_invalid_master_key_quoting_nothing(
    master_key: str, as_given: Callable[[str], Any]
) -> None:
    given = as_given(master_key)
    calls: list[Callable[[], SecretService]] = [
        lambda: SecretService.create("memory:", master_key=given),
        lambda: SecretService.create("memory:", previous_master_keys=[given]),
    ]
    for call in calls:
        with pytest.raises(InvalidMasterKey) as raised:
            call()
        shown = str(raised.value) + repr(raised.value)
        assert master_key[:16] not in shown.lower()
        assert master_key[-16:] not in shown.lower()
        assert repr(given)[:20] not in shown
        assert "must be a str" in shown


def test_previous_master_keys_given_as_one_str_is_refused(master_key: str) -> None:
    with pytest.raises(InvalidMasterKey, match="list of str") as raised:
        SecretService.create("memory:", previous_master_keys=master_key)  # type: ignore[arg-type]
    assert master_key[:16] not in str(raised.value)


def test_a_database_url_that_is_not_a_str_is_invalid_input(master_key: str) -> None:
    with pytest.raises(InvalidInput, match="database_url must be a str"):
        SecretService.create(b"memory:", master_key=master_key)  # type: ignore[arg-type]


@pytest.mark.parametrize("url", ["", "   "])
def test_an_empty_database_url_is_refused_not_taken_for_the_default(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a URL left out (None) means KEYLEDGER_DATABASE_URL or ./keyledger.db; an empty
    one is a mistake (an unset variable interpolated, say), not a request for the default."""
    monkeypatch.chdir(tmp_path)

    with pytest.raises(InvalidInput, match="unsupported database URL"):
        SecretService.create(database_url=url, master_key="ab" * 32)

    assert list(tmp_path.iterdir()) == []
