"""``keyledger master-key``: generate an application master key, re-wrap under a new one."""

from __future__ import annotations

import secrets
import sys

import click

from keyledger.application.lifecycle import RewrapResult
from keyledger.cli.confirm import confirm
from keyledger.cli.errors import KeyledgerSubgroup, despite_shred
from keyledger.cli.interrupts import both, resumable
from keyledger.cli.params import yes_option
from keyledger.cli.render import emit_json, is_terminal, json_option, to_data
from keyledger.cli.root import CliContext, pass_cli

MASTER_KEY_BYTES = 32


@click.group("master-key", cls=KeyledgerSubgroup)
def master_key_group() -> None:
    """Application master key (AMK) helpers."""


@master_key_group.command("generate")
@json_option
@pass_cli
def generate(cli: CliContext) -> None:
    """Print a fresh random 256-bit master key as 64 hex characters.

    Nothing is stored: put it in KEYLEDGER_MASTER_KEY (or a file named by
    KEYLEDGER_MASTER_KEY_FILE) and keep it safe; losing it loses every secret.
    """
    key = secrets.token_hex(MASTER_KEY_BYTES)
    if cli.json_output:
        emit_json({"master_key": key})
    else:
        click.echo(key)


def rewrap_with_progress(cli: CliContext) -> RewrapResult:
    """Re-wrap every tenant's key material, with a progress bar on a terminal."""
    service = cli.service
    with resumable("the re-wrap", "key versions") as done:
        if not is_terminal("stderr"):
            return service.rewrap_master_key(**cli.actor, progress=done)
        total = service.count_key_material()
        with click.progressbar(length=total, label="Re-wrapping", file=sys.stderr) as bar:
            return service.rewrap_master_key(**cli.actor, progress=both(bar.update, done))


@master_key_group.command("rewrap")
@yes_option
@json_option
@pass_cli
def rewrap(cli: CliContext, yes: bool) -> None:
    """Re-wrap every tenant's key versions under the current master key.

    Rotating the master key: put the new key in KEYLEDGER_MASTER_KEY and the old one in
    KEYLEDGER_PREVIOUS_MASTER_KEYS (comma-separated), run this, check with
    `keyledger drift diagnose --all-tenants`, then drop the old key from the configuration.
    Secret values are never touched. Safe to interrupt and rerun. Exits 1 when some key
    versions could not be re-wrapped (their master key is not configured, or wrong).
    """
    # It asks first (found by review: it asked nothing): once every version is wrapped by
    # the new key and the old copies are shredded, a new key kept nowhere else loses
    # every secret.
    confirm(
        f"Re-wrap {cli.service.count_key_material(to_rewrap=True)} key version(s) of every "
        f"tenant under the current master key, id {cli.service.master_key_id()}? Their "
        "copies under other master keys are then shredded: keep the new key safe first.",
        yes=yes,
    )
    result, incomplete = despite_shred(lambda: rewrap_with_progress(cli))
    if cli.json_output:
        emit_json(to_data(result))
    else:
        click.echo(
            f"Re-wrapped {result.rewrapped} key version(s) under master key {result.amk_id}; "
            f"{result.already_current} already current, {result.failed} failed."
        )
        for failure in result.failures:
            click.echo(f"  failed: {failure}")
    if incomplete is not None:
        raise incomplete
    if result.failed:
        raise click.ClickException(
            f"{result.failed} key version(s) could not be re-wrapped: add the master key that "
            "wraps them to KEYLEDGER_PREVIOUS_MASTER_KEYS and run `keyledger master-key rewrap` "
            "again; keep the old master key until it succeeds"
        )
