#!/usr/bin/env bash
# The `make demo` scenario: two tenants on a throwaway embedded SQLite store, driven through
# the keyledger CLI. Secret values go in through stdin, never on the command line.
set -euo pipefail

command -v keyledger >/dev/null || { echo "keyledger is not on PATH (run: make demo)" >&2; exit 1; }

workdir="$(mktemp -d "${TMPDIR:-/tmp}/keyledger-demo.XXXXXX")"
trap 'rm -rf "$workdir"' EXIT

# The demo never touches a database of yours: it works on a fresh file in a temp directory.
export KEYLEDGER_DATABASE_URL="sqlite:///$workdir/demo.db"
export KEYLEDGER_CLI_USER="${KEYLEDGER_CLI_USER:-demo-operator}"
export KEYLEDGER_CLI_IP="${KEYLEDGER_CLI_IP:-127.0.0.1}"

heading() { printf '\n== %s\n' "$*"; }

heading "Master key"
if [ -z "${KEYLEDGER_MASTER_KEY:-}" ]; then
    KEYLEDGER_MASTER_KEY="$(keyledger master-key generate)"
    export KEYLEDGER_MASTER_KEY
    echo "KEYLEDGER_MASTER_KEY is unset: generated a throwaway key for this demo (not shown)."
else
    echo "Using the KEYLEDGER_MASTER_KEY from your environment."
fi
echo "Database: $KEYLEDGER_DATABASE_URL"

heading "Store secrets for two tenants (values read from stdin)"
printf '%s' 'sk_live_acme_4eC39HqLyjWDarjtT1zdp7dc' | keyledger secrets put acme stripe-api-key \
    --category api-keys --description "Stripe production key" --metadata owner=billing
printf '%s' 'postgres://acme:hunter2@db.acme.internal/app' | keyledger secrets put acme database-url \
    --category databases --expires-at 2030-01-01T00:00:00Z
printf '%s' 'sk_live_globex_BQokikJOvBiI2HlWgH4olfQ2' | keyledger secrets put globex stripe-api-key \
    --category api-keys

heading "Read one secret (the read is audited)"
printf 'acme/stripe-api-key = '
keyledger secrets get acme stripe-api-key
echo

heading "Same name, other tenant: a different value"
printf 'globex/stripe-api-key = '
keyledger secrets get globex stripe-api-key
echo

heading "Rotate acme's data key"
keyledger keys rotate acme
keyledger keys list acme

heading "Re-encrypt acme's secrets under the new key"
keyledger keys reencrypt acme
keyledger keys list acme

heading "List secrets (never values)"
echo "acme:"
keyledger secrets list acme
echo "globex:"
keyledger secrets list globex

heading "Disable a secret: reads are refused"
keyledger secrets disable acme database-url
if keyledger secrets get acme database-url >/dev/null; then
    echo "unexpected: a disabled secret was readable" >&2
    exit 1
fi

heading "Audit log of acme (newest first)"
keyledger audit log acme

heading "Done"
echo "The demo database is deleted on exit. Try: keyledger --help"
