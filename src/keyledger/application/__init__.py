"""The application layer: the event-sourced ledger, its commands and its queries."""
