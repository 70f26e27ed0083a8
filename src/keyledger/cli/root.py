"""The root group: global options, the shared context object and the lazily opened service."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from shlex import quote as shell_quote
from typing import TypedDict

import click

from keyledger._version import __version__
from keyledger.cli.errors import KeyledgerGroup
from keyledger.context import TenantScope, tenant
from keyledger.infrastructure.database_url import sqlite_db_name
from keyledger.infrastructure.settings import KeyledgerSettings
from keyledger.service import SecretService

USER_AGENT = f"keyledger-cli/{__version__}"


class ActorFields(TypedDict):
    """The actor keywords of the ``*_for_tenant`` calls."""

    user_id: str | None
    ip_address: str | None
    user_agent: str | None


class CliContext:
    """Global options, built once per run; the service opens on first use, closes at exit."""

    def __init__(
        self, database_url: str | None, json_output: bool, user: str | None, ip: str | None
    ) -> None:
        self.database_url = database_url
        self.json_output = json_output
        self.user = user
        self.ip = ip
        self._service: SecretService | None = None

    def __repr__(self) -> str:
        return f"CliContext(json_output={self.json_output!r}, user={self.user!r})"

    @property
    def service(self) -> SecretService:
        """The service, opened now if this is its first use."""
        if self._service is None:
            settings = KeyledgerSettings()  # InvalidInput names what is wrong
            url = self.database_url or settings.database_url.get_secret_value()
            _refuse_to_create_a_store_by_reading(url)
            self._service = SecretService.create(self.database_url, settings=settings)
        return self._service

    @property
    def actor(self) -> ActorFields:
        """Who the audit stream records for this run."""
        return ActorFields(user_id=self.user, ip_address=self.ip, user_agent=USER_AGENT)

    def scope(self, tenant_id: str) -> AbstractContextManager[TenantScope]:
        """A ``tenant(...)`` block for ``tenant_id`` with this run's actor."""
        return tenant(tenant_id, **self.actor)

    def refuse_unknown_tenant(self, tenant_id: str) -> None:
        """Refuse a tenant the store has never heard of: no key version, no audit entry.

        Commands whose answer for a tenant is empty (no entries, no secrets, no drift,
        nothing to re-encrypt) ask this first, so that a mistyped name is an error, not
        an "all clean" with exit 0 in the middle of an investigation (found by review).
        """
        if self.service.list_keys(tenant_id):
            return
        with self.scope(tenant_id):
            if self.service.get_audit_logs(limit=1):
                return
        raise click.ClickException(
            f"no tenant {tenant_id!r} in this store (it has no key version and no audit "
            "entry): check the name"
        )

    def close(self) -> None:
        """Close the service if it was opened."""
        if self._service is not None:
            self._service.close()
            self._service = None


pass_cli = click.make_pass_decorator(CliContext)

# The commands that may make a new SQLite file: those that write what a new store starts
# with (a secret, a tenant's first key) and `db init`. Any other command is refused on a
# file that does not exist: opening it would create an empty store, and a mistyped path
# would answer "nothing there" (a monitoring check of `keys due` staying green; found by
# review). A PostgreSQL schema is made by `db init` or by the first process to open it.
CREATING_COMMANDS = frozenset({"secrets put", "keys rotate", "db init"})


def _refuse_to_create_a_store_by_reading(database_url: str) -> None:
    if not database_url.startswith("sqlite:///") or database_url == "sqlite:///:memory:":
        return
    ctx = click.get_current_context(silent=True)
    command = " ".join(ctx.command_path.split()[1:]) if ctx is not None else ""
    due = ctx is not None and bool(ctx.params.get("due"))  # (never a tenant's first key)
    if command in CREATING_COMMANDS and not due:  # (`keys rotate --due` made an empty
        return  # store on a mistyped path, and the checks after it stayed green: review)
    path = Path(sqlite_db_name(database_url))
    if not path.exists():
        raise click.ClickException(
            f"no keyledger store at {shell_quote(str(path))}: check --database or "
            "KEYLEDGER_DATABASE_URL (`keyledger db init` creates a new store, and so does "
            "the first `secrets put`)"
        )


@click.group(
    "keyledger", cls=KeyledgerGroup, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.option(
    "--database",
    "database_url",
    envvar="KEYLEDGER_DATABASE_URL",
    show_envvar=True,
    metavar="URL",
    help=(
        "memory:, sqlite:///relative.db, sqlite:////absolute.db or "
        "postgresql://user@host/db?schema=name [default: sqlite:///keyledger.db]"
    ),
)
@click.option("--json", "json_output", is_flag=True, help="Machine-readable JSON output.")
@click.option(
    "--user",
    envvar="KEYLEDGER_CLI_USER",
    show_envvar=True,
    help="User id recorded as the actor in the audit stream [default: system].",
)
@click.option(
    "--ip",
    envvar="KEYLEDGER_CLI_IP",
    show_envvar=True,
    help="IP address recorded with the actor in the audit stream.",
)
@click.version_option(__version__, prog_name="keyledger")
@click.pass_context
def cli(
    ctx: click.Context,
    database_url: str | None,
    json_output: bool,
    user: str | None,
    ip: str | None,
) -> None:
    """keyledger: per-tenant secrets with envelope encryption and an audit stream.

    The master key comes from KEYLEDGER_MASTER_KEY (or KEYLEDGER_MASTER_KEY_FILE), never from
    the command line. Secret values are read from stdin or a hidden prompt.
    """
    obj = CliContext(database_url, json_output, user, ip)
    ctx.obj = obj
    ctx.call_on_close(obj.close)
