"""Code shared by the scripts that multi-process tests run in their children."""

from __future__ import annotations

# After ``service = SecretService.create(...)``: with ``args["exclusive_after"]`` set,
# retries are made under the write lock from that attempt on (from the fifth in
# production), and ``held`` counts the attempts that were.
EXCLUSIVE_AFTER_KNOB = r"""
held = []
if args.get("exclusive_after") is not None:
    from keyledger.application import ledger

    ledger.EXCLUSIVE_AFTER = args["exclusive_after"]
    exclusively = ledger.Ledger.exclusively
    def counted(self):
        held.append(1)
        return exclusively(self)
    ledger.Ledger.exclusively = counted
"""
