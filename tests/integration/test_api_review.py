"""The public API as a consuming application meets it: collection of an unclosed service,
JSON round trips of results, errors that cross process boundaries, import cost."""

from __future__ import annotations

import base64
import gc
import inspect
import json
import pickle
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime

import pytest

import keyledger.errors
from keyledger import DriftReport, Secret, SecretKeyDriftError, SecretService, tenant
from keyledger.infrastructure.settings import KeyledgerSettings


def _sealer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "keyledger-auto-seal"]


def test_an_unclosed_service_is_collected_after_its_automatic_seal(
    tmp_path: pytest.TempPathFactory, master_key: str
) -> None:
    """Its sealer thread does not keep the service (connections, files) alive forever."""
    before = len(_sealer_threads())
    service = SecretService.create(
        f"sqlite:///{tmp_path}/unclosed.db",
        master_key=master_key,
        settings=KeyledgerSettings(audit_seal_every=2),
    )
    with tenant("acme"):
        for i in range(3):
            service.store(f"s{i}", "v")
    ledger = service._ledger
    assert ledger.sealer.wait_idle(10)
    assert len(_sealer_threads()) == before + 1  # the seal ran on its thread
    collected = weakref.ref(ledger)
    del service, ledger
    deadline = time.monotonic() + 10
    while (collected() is not None or len(_sealer_threads()) > before) and (
        time.monotonic() < deadline
    ):
        gc.collect()
        time.sleep(0.05)

    assert collected() is None
    assert len(_sealer_threads()) == before


def test_a_secret_with_a_bytes_value_survives_a_json_round_trip(master_key: str) -> None:
    with SecretService.create("memory:", master_key=master_key) as service, tenant("acme"):
        service.store("binary", b"\x00\x01binary-key\xff")
        service.store("text", "sk_live_AAFiaW5h")  # base64-looking text stays text
        binary, text = service.retrieve("binary"), service.retrieve("text")

    for secret in (binary, text):
        assert Secret.model_validate_json(secret.model_dump_json()) == secret
        assert Secret.model_validate(secret.model_dump(mode="json")) == secret
        assert Secret.model_validate(secret.model_dump()) == secret
    assert json.loads(text.model_dump_json())["value"] == "sk_live_AAFiaW5h"
    assert "value_encoding" not in json.loads(text.model_dump_json())
    dumped = json.loads(binary.model_dump_json())
    assert dumped["value_encoding"] == "base64url"
    as_the_cli_writes_it = {  # (keyledger secrets get --json: the standard alphabet)
        **dumped,
        "value": base64.b64encode(b"\x00\x01binary-key\xff").decode(),
        "value_encoding": "base64",
    }
    assert Secret.model_validate(as_the_cli_writes_it) == binary
    text_as_the_cli_writes_it = {
        **json.loads(text.model_dump_json()),
        "value_encoding": "utf-8",
    }
    assert Secret.model_validate(text_as_the_cli_writes_it) == text


def test_a_bad_value_encoding_is_refused_without_quoting_the_value() -> None:
    fields = {
        "tenant_id": "acme",
        "name": "n",
        "category": None,
        "description": None,
        "metadata": {},
        "status": "active",
        "key_version": 1,
        "expires_at": None,
        "created_at": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-01T00:00:00Z",
        "access_count": 1,
        "last_accessed_at": None,
    }
    for encoding, value in (
        ("base64url", "sk_live_not*base64"),
        ("base64url", "AAAA+///"),  # the standard alphabet, under the URL-safe label
        ("base64", "AAAA-___"),
        ("base64url", "AAA"),  # unpadded
        ("hex", "c2VjcmV0"),
    ):
        with pytest.raises(ValueError, match=r"value_encoding|base64") as raised:
            Secret.model_validate_json(
                json.dumps({**fields, "value": value, "value_encoding": encoding})
            )
        assert value not in str(raised.value)


def _raise_drift_error_with_a_note() -> None:
    report = DriftReport(
        tenant_id="acme", checked_at=datetime(2026, 1, 1, tzinfo=UTC), ok=False, issues=[],
        summary={},
    )  # fmt: skip
    error = SecretKeyDriftError("acme/n: key drift", report)
    error.add_note("request 42")
    raise error


def test_a_drift_error_keeps_its_notes_across_processes_and_copies() -> None:
    with ProcessPoolExecutor(max_workers=1) as pool, pytest.raises(SecretKeyDriftError) as raised:
        pool.submit(_raise_drift_error_with_a_note).result()
    assert raised.value.__notes__ == ["request 42"]
    assert raised.value.report.tenant_id == "acme"
    copied = pickle.loads(pickle.dumps(raised.value))  # noqa: S301 (our own bytes)
    assert copied.__notes__ == ["request 42"]
    assert str(copied) == str(raised.value)


def test_every_error_class_is_exported_by_the_errors_module() -> None:
    classes = {
        name
        for name, value in vars(keyledger.errors).items()
        if inspect.isclass(value)
        and issubclass(value, keyledger.errors.KeyledgerError)
        and value.__module__ == "keyledger.errors"
    }
    assert classes <= set(keyledger.errors.__all__)
    assert set(keyledger.errors.__all__) <= set(keyledger.__all__)


def test_importing_keyledger_does_not_import_the_postgresql_driver() -> None:
    """A SQLite deployment never pays for psycopg and its pool at start-up."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, keyledger; "
            "print(sorted(m for m in sys.modules if m.split('.')[0].startswith('psycopg')))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == "[]"


def test_the_postgresql_factory_topic_names_the_factory() -> None:
    from eventsourcing.utils import get_topic

    from keyledger.infrastructure.database_url import POSTGRES_FACTORY_TOPIC
    from keyledger.infrastructure.postgres_store import KeyledgerPostgresFactory

    assert get_topic(KeyledgerPostgresFactory) == POSTGRES_FACTORY_TOPIC
