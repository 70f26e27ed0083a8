"""The ``keyledger`` command line: a thin click layer over ``SecretService``."""

from keyledger.cli.audit_evidence import audit_group  # the audit group, every command
from keyledger.cli.db import db_group
from keyledger.cli.drift import drift_group
from keyledger.cli.keys import keys_group
from keyledger.cli.master_key import master_key_group
from keyledger.cli.projections import projections_group
from keyledger.cli.root import cli
from keyledger.cli.secrets import secrets_group
from keyledger.cli.tenants import tenants_group

for _group in (
    master_key_group,
    secrets_group,
    keys_group,
    tenants_group,
    drift_group,
    audit_group,
    projections_group,
    db_group,
):
    cli.add_command(_group)

main = cli

__all__ = ["cli", "main"]
