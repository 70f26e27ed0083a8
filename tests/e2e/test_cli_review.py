"""What an operator sees: names that older releases stored with invisible or
direction-changing characters, look-alike actors, wide characters, and the exit paths of
sealing and verifying."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from conftest import cli_environment
from keyledger import SecretService, tenant
from keyledger.application import keys, secrets
from keyledger.cli import main
from keyledger.infrastructure.settings import KeyledgerSettings

MASTER_KEY = "5e1f0c2a9b7d3e4f" * 4
NEW_MASTER_KEY = "a0b1c2d3e4f50617" * 4
LEGACY_TENANT = "acme\u202etxt.exe"  # a right-to-left override: reverses the rest of a row
LEGACY_NAME = "str\u00adipe"  # a soft hyphen: looks like "stripe"
RAW = ("\u202e", "\u00ad", "\u200b")


@pytest.fixture(autouse=True)
def database(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    url = cli_environment(monkeypatch, f"sqlite:///{tmp_path / 'cli.db'}", MASTER_KEY)
    monkeypatch.setenv("KEYLEDGER_AUDIT_SEAL_EVERY", "0")
    return url


def run(*args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=stdin)


@pytest.fixture
def legacy_store(database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Names as releases before 0.12 stored them (no check for invisible characters)."""
    with monkeypatch.context() as patched:
        patched.setattr(secrets, "is_new_identifier", lambda value: True)
        patched.setattr(secrets, "check_new_identifier", lambda field, value: None)
        patched.setattr(keys, "check_new_identifier", lambda field, value: None)
        patched.setattr("keyledger.service.check_label", lambda field, value, n=0: value)
        with SecretService.create(database, master_key=MASTER_KEY) as service:
            service.store_for_tenant(LEGACY_TENANT, "token", "v1")
            service.store_for_tenant("acme", LEGACY_NAME, "v2", category="pay\u200bments")
            service.store_for_tenant("acme", "stripe", "v3")


@pytest.mark.usefixtures("legacy_store")
@pytest.mark.parametrize(
    "args",
    [
        ("secrets", "list", "acme"),
        ("keys", "list", "--all-tenants"),
        ("audit", "log", "--all-tenants"),
        ("audit", "log", "acme"),
        ("audit", "replay", LEGACY_TENANT, "--as-of", "2100-01-01T00:00:00Z"),
        ("drift", "diagnose", "--all-tenants"),
    ],
    ids=lambda args: " ".join(a for a in args if a.isascii()),
)
def test_tables_show_invisible_and_direction_changing_characters_escaped(
    args: tuple[str, ...],
) -> None:
    result = run(*args)

    assert result.exit_code in (0, 1), (result.stdout, result.stderr, result.exception)
    output = result.stdout + result.stderr
    assert not any(char in output for char in RAW), output
    assert "acme\\u202etxt.exe" in output or "str\\u00adipe" in output


@pytest.mark.usefixtures("legacy_store")
def test_keys_due_and_an_audit_trail_show_such_names_escaped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KEYLEDGER_KEY_MAX_ENCRYPTIONS", "1")  # every active version is due
    due = run("keys", "due")
    missing = run("audit", "trail", LEGACY_TENANT, "nosuch")

    assert "acme\\u202etxt.exe" in due.stdout
    assert missing.stderr == (
        "Error: no audit entries for secret 'nosuch' of tenant 'acme\\u202etxt.exe'\n"
    )
    assert not any(char in due.stdout + missing.stderr for char in RAW)


@pytest.mark.usefixtures("legacy_store")
def test_look_alike_names_are_told_apart_in_a_listing() -> None:
    listing = run("secrets", "list", "acme").stdout.splitlines()

    rows = {line.split()[0] for line in listing[1:]}
    assert rows == {"stripe", "str\\u00adipe"}
    assert "pay\\u200bments" in listing[1] + listing[2]


def test_a_look_alike_actor_or_category_is_refused_and_nothing_is_written() -> None:
    for args in (
        ("--user", "ops\u200b-alice", "secrets", "put", "acme", "s"),
        ("secrets", "put", "acme", "s", "--category", "api\u200b"),
    ):
        result = run(*args, stdin="v")
        assert result.exit_code == 1
        assert result.stderr.startswith("Error: ")
        assert "invisible" in result.stderr
    assert run("secrets", "list", "acme").stdout.splitlines()[1:] == []


def test_columns_stay_aligned_with_wide_characters() -> None:
    for name in ("秘密の鍵", "plain"):
        assert run("secrets", "put", "acme", name, stdin="v").exit_code == 0

    header, *rows = run("secrets", "list", "acme").stdout.splitlines()
    status_column = header.index("STATUS")
    for row in rows:
        name = row.split()[0]
        width = sum(2 if "\u3040" <= c <= "\u9fff" else 1 for c in name)
        assert row[len(name) :].index("active") + width == status_column, row


def test_a_seal_that_cannot_write_its_anchor_says_so_on_one_error_line(tmp_path: Path) -> None:
    """Through the installed script, with logging as the CLI leaves it (no handler: the
    library's warnings used to reach stderr through Python's last resort)."""
    run("secrets", "put", "acme", "s", stdin="v")
    script = Path(sys.executable).with_name("keyledger")
    env = {**os.environ, "KEYLEDGER_AUDIT_ANCHOR_FILE": str(tmp_path / "no-dir" / "a.jsonl")}

    done = subprocess.run(
        [str(script), "audit", "seal"], capture_output=True, text=True, env=env, timeout=60
    )

    assert done.returncode == 1
    assert done.stderr.startswith("Error: the anchor file ")
    assert done.stderr.count("\n") == 1, done.stderr


def test_db_shred_takes_json() -> None:
    result = run("db", "shred", "--json")
    assert (result.exit_code, result.stdout.strip()) == (0, '{\n  "shredded": true\n}')


def test_verify_from_a_position_after_a_master_key_rotation_needs_no_retired_key(
    database: str,
) -> None:
    """Runbook 2: after a master-key rotation the old key (and the audit key derived from
    it) is dropped; segments sealed before are out of scope of a later --from-position."""
    with SecretService.create(database, master_key=MASTER_KEY) as old:
        with tenant("acme"):
            old.store("a", "v")
        old.seal_audit()
    settings = KeyledgerSettings(previous_master_keys=MASTER_KEY)
    with SecretService.create(database, master_key=NEW_MASTER_KEY, settings=settings) as both:
        both.rewrap_master_key()
        first_after = both.seal_audit().checkpoints[0].after_position + 1
    with SecretService.create(database, master_key=NEW_MASTER_KEY) as new:
        with tenant("acme"):
            new.store("b", "w")
        new.seal_audit()
        assert not new.verify_audit().intact  # checkpoint 1's key is not configured
        report = new.verify_audit(from_position=first_after)

    assert report.intact, report.findings
    assert report.checked_events > 0


def test_an_empty_page_of_a_trail_is_no_error_but_a_trail_of_nothing_is() -> None:
    run("secrets", "put", "acme", "s", stdin="v")

    page = run("audit", "trail", "acme", "s", "--offset", "5")
    missing = run("audit", "trail", "acme", "nosuch", "--offset", "1")

    assert page.exit_code == 0
    assert missing.exit_code == 1
    assert missing.stderr == "Error: no audit entries for secret 'nosuch' of tenant 'acme'\n"
