"""``keyledger master-key``: application master key helpers."""

from __future__ import annotations

import secrets

import click

from keyledger.cli.render import emit_json, json_option
from keyledger.cli.root import CliContext, pass_cli

MASTER_KEY_BYTES = 32


@click.group("master-key")
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
