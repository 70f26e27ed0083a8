"""The public API as downstream code meets it (found by review): a service never closed,
published JSON schemas, results narrowed or rebuilt by other frameworks, settings with a
misspelled keyword, subclasses under a type checker, and unusual but valid-looking input."""

from __future__ import annotations

import contextlib
import copy
import enum
import gc
import json
import os
import pickle
import subprocess
import sys
import textwrap
import time
import weakref
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from conftest import POSTGRES_URL, own_schema
from keyledger import (
    DriftReport,
    InvalidInput,
    Secret,
    SecretInfo,
    SecretKeyDriftError,
    SecretNotFound,
    SecretService,
    StorageError,
    TenantState,
    tenant,
)
from keyledger.infrastructure.settings import KeyledgerSettings

VALUE = "sk_live_downstream_review_value"

# -- a service never closed -------------------------------------------------------------

_EXIT_WITHOUT_CLOSE = textwrap.dedent(
    """
    import atexit, sys

    ledgers = []

    def report():
        pools = [ledger.factory.datastore.pool for ledger in ledgers]
        print("closed before finalization:", all(ledger.closed for ledger in ledgers)
              and all(pool.closed for pool in pools), flush=True)

    # Registered before keyledger registers its own exit hook, which atexit then runs
    # first (last in, first out): this sees what that hook left.
    atexit.register(report)

    from keyledger import SecretService

    service = SecretService.create(sys.argv[1])
    ledgers.append(service._ledger)
    service.store_for_tenant("acme", "api", "v")
    """
)


@pytest.mark.postgres
@pytest.mark.usefixtures("_postgres_server")
def test_a_postgres_service_never_closed_closes_its_pool_at_exit_and_exits_quickly(
    master_key: str,
) -> None:
    """Left to eventsourcing's ``__del__`` at interpreter finalization, closing the pool
    joined its worker threads after they were frozen: on Python 3.13, about 5 s per
    thread at every exit of a script that never called close()."""
    with own_schema("exit") as schema:
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-c", _EXIT_WITHOUT_CLOSE, f"{POSTGRES_URL}?schema={schema}"],
            env={**os.environ, "KEYLEDGER_MASTER_KEY": master_key},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        took = time.monotonic() - started

    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "closed before finalization: True"
    assert took < 3, f"exit took {took:.1f} s"


def _open_descriptors(directory: Path) -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the descriptor listdir itself used, closed since
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(str(directory))
    return count


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_a_service_never_closed_releases_its_store_once_collected(
    tmp_path: Path, master_key: str
) -> None:
    service = SecretService.create(f"sqlite:///{tmp_path}/k.db", master_key=master_key)
    service.store_for_tenant("acme", "api", "v")
    assert _open_descriptors(tmp_path) > 0
    collected = weakref.ref(service)

    del service
    gc.collect()

    assert collected() is None
    assert _open_descriptors(tmp_path) == 0


def test_what_outlives_a_collected_service_keeps_working(tmp_path: Path, master_key: str) -> None:
    """An audit export's generator holds the store, not the service, and so does a copy
    of the service: closing the store when the service was collected failed both, with
    an error saying that close() was called (found by review)."""
    url = f"sqlite:///{tmp_path}/k.db"
    service = SecretService.create(url, master_key=master_key)
    service.store_for_tenant("acme", "api", "v")
    records = SecretService.create(url, master_key=master_key).export_audit(tenant_id="acme")
    duplicate = copy.copy(service)

    del service
    gc.collect()

    assert [record["action"] for record in records] == ["create_key", "create"]
    assert duplicate.retrieve_for_tenant("acme", "api").value == "v"
    duplicate.close()


def test_closing_a_service_twice_is_harmless(master_key: str) -> None:
    service = SecretService.create("memory:", master_key=master_key)
    service.close()
    service.close()
    with pytest.raises(StorageError, match="closed"):
        service.list_for_tenant("acme")


# -- published JSON schemas -------------------------------------------------------------


def _secret_fields() -> set[str]:
    return set(Secret.model_fields)


@pytest.mark.parametrize("mode", ["serialization", "validation"])
def test_the_secret_json_schema_lists_every_field_and_the_value_encoding(mode: str) -> None:
    """FastAPI's ``response_model=Secret`` publishes the serialization schema: it was {}."""
    schema = Secret.model_json_schema(mode=mode)  # type: ignore[arg-type]

    assert set(schema["properties"]) == _secret_fields() | {"value_encoding"}
    assert set(schema["required"]) == _secret_fields()
    assert schema["properties"]["value_encoding"]["enum"] == ["base64url", "base64", "utf-8"]


def _matches(instance: Any, schema: dict[str, Any]) -> bool:
    """Whether ``instance`` fits ``schema``: the JSON Schema keywords Secret's uses."""
    if "anyOf" in schema:
        return any(_matches(instance, choice) for choice in schema["anyOf"])
    if "enum" in schema and instance not in schema["enum"]:
        return False
    kinds = {"string": str, "integer": int, "object": dict, "null": type(None)}
    kind = schema.get("type")
    if kind is not None and not isinstance(instance, kinds[kind]):
        return False
    if kind != "object":
        return True
    properties = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for key, item in instance.items():
        if key in properties:
            if not _matches(item, properties[key]):
                return False
        elif extra is False or (isinstance(extra, dict) and not _matches(item, extra)):
            return False
    return set(schema.get("required", ())) <= set(instance)


def test_a_bytes_secrets_json_fits_the_published_schema_and_round_trips(
    service: SecretService,
) -> None:
    with tenant("acme"):
        service.store("binary", b"\xfb\xff\x00binary", metadata={"team": "core"})
        secret = service.retrieve("binary")
    emitted = secret.model_dump_json()

    assert _matches(json.loads(emitted), Secret.model_json_schema(mode="validation"))
    assert _matches(json.loads(emitted), Secret.model_json_schema(mode="serialization"))
    assert not _matches({**json.loads(emitted), "extra": 1}, Secret.model_json_schema())
    assert Secret.model_validate_json(emitted) == secret


# -- a secret's value never in a validation error ---------------------------------------


def test_narrowing_a_secret_to_secret_info_never_quotes_its_value(
    service: SecretService,
) -> None:
    """A Secret's dump holds ``value``, a field SecretInfo refuses: the error said so and
    quoted it, and applications log validation errors."""
    with tenant("acme"):
        service.store("api", VALUE)
        secret = service.retrieve("api")
    attempts = {
        "model_validate": lambda: SecretInfo.model_validate(secret.model_dump()),
        "model_validate_json": lambda: SecretInfo.model_validate_json(secret.model_dump_json()),
        "TypeAdapter(list)": lambda: TypeAdapter(list[SecretInfo]).validate_python(
            [secret.model_dump()]
        ),
        "TypeAdapter(list) JSON": lambda: TypeAdapter(list[SecretInfo]).validate_json(
            f"[{secret.model_dump_json()}]"
        ),
    }
    for how, attempt in attempts.items():
        with pytest.raises(ValidationError) as raised:
            attempt()
        assert [error["type"] for error in raised.value.errors()] == ["extra_forbidden"], how
        quoted = VALUE in str(raised.value) or VALUE in repr(raised.value.errors())
        assert not quoted, f"{how}: the error quotes the value"  # (a bool: pytest shows it)


def test_a_secret_narrowed_to_its_listing_loses_its_value(service: SecretService) -> None:
    """pydantic keeps an instance of a subclass as it is: ``SecretInfo.model_validate``
    of a ``Secret`` (the way to say "its listing, without the value") gave the Secret
    back, and its dump, the JSON a handler returns, held the value."""
    with tenant("acme"):
        service.store("api", VALUE)
        secret = service.retrieve("api")
        listed = service.list()[0]
    narrowed = {
        "model_validate": SecretInfo.model_validate(secret),
        "TypeAdapter(list)": TypeAdapter(list[SecretInfo]).validate_python([secret])[0],
        "TenantState field": TenantState(
            tenant_id="acme",
            as_of=None,
            as_of_position=None,
            position=1,
            events_applied=1,
            secrets=[secret],
            keys=[],
        ).secrets[0],
    }
    for how, info in narrowed.items():
        assert type(info) is SecretInfo, how
        assert info == listed, how
        dumped = info.model_dump_json() + repr(info.model_dump())
        assert VALUE not in dumped, f"{how}: the value is still there"  # (a bool)
    assert Secret.model_validate(secret) is secret  # (a Secret stays a Secret)


def test_a_result_models_own_validation_errors_show_no_input_at_all(
    service: SecretService,
) -> None:
    """Validated by itself, a result model's error names fields and problems only."""
    with tenant("acme"):
        service.store("api", VALUE)
        dumped = service.retrieve("api").model_dump()
    attempts = {
        "model_validate": lambda: SecretInfo.model_validate(dumped),
        "constructor": lambda: SecretInfo(**dumped),
        "nested": lambda: TenantState.model_validate(
            {"secrets": [dumped], "keys": [], "position": 0, "events_applied": 0}
        ),
    }
    for how, attempt in attempts.items():
        with pytest.raises(ValidationError) as raised:
            attempt()
        shown = "input_value" in str(raised.value)
        assert not shown, f"{how}: the error shows an input"


def test_a_secret_missing_a_field_inside_a_list_does_not_quote_its_value(
    service: SecretService,
) -> None:
    """A missing field is reported with the whole input: the dict that holds the value
    (a short one, which pydantic's shortened rendering of that dict does not cut off)."""
    short = "sk_9f2a"
    with tenant("acme"):
        service.store("api", short)
        dumped = service.retrieve("api").model_dump()
    del dumped["name"]

    with pytest.raises(ValidationError) as raised:
        TypeAdapter(list[Secret]).validate_python([dumped])

    assert [(e["type"], e["loc"]) for e in raised.value.errors()] == [("missing", (0, "name"))]
    quoted = short in str(raised.value) or short in repr(raised.value.errors())
    assert not quoted, "the error quotes the value"


# -- settings ---------------------------------------------------------------------------


def test_a_misspelled_setting_keyword_is_refused_by_name() -> None:
    """It was ignored: ``max_value_byte=16`` kept the 64 KiB limit, silently."""
    with pytest.raises(InvalidInput) as raised:
        KeyledgerSettings(max_value_byte=16, create_table=False, lock_timeout_seconds=5)

    assert str(raised.value) == "unknown KeyledgerSettings keyword(s): create_table, max_value_byte"


def test_setting_keywords_match_whatever_their_case_and_subclasses_may_widen_them() -> None:
    """The check refused keywords pydantic-settings accepts (found by review): names in
    another case, a field's own name where the model populates by name, any keyword where
    it allows extras."""
    from pydantic_settings import SettingsConfigDict

    assert KeyledgerSettings(MAX_VALUE_BYTES=5).max_value_bytes == 5
    fallback = KeyledgerSettings(smrt_secret_master_key="lower").smrt_master_key
    assert fallback is not None
    assert fallback.get_secret_value() == "lower"

    class ByName(KeyledgerSettings):
        model_config = SettingsConfigDict(populate_by_name=True)

    named = ByName(smrt_master_key="by name").smrt_master_key
    assert named is not None
    assert named.get_secret_value() == "by name"

    class Extras(KeyledgerSettings):
        model_config = SettingsConfigDict(extra="allow")

    assert Extras(team="payments").max_value_bytes == 65536
    with pytest.raises(InvalidInput, match="max_value_byte"):
        ByName(max_value_byte=1)


def test_setting_keywords_and_the_environment_still_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYLEDGER_MAX_VALUE_BYTES", "32")
    monkeypatch.setenv("KEYLEDGER_SOMETHING_ELSE", "unrelated")  # another tool's: ignored
    monkeypatch.setenv("SMRT_SECRET_MASTER_KEY", "from the environment")

    from_environment = KeyledgerSettings()
    given = KeyledgerSettings(
        max_value_bytes=16,
        create_tables=False,
        SMRT_SECRET_MASTER_KEY="given",  # (the alias, as the variable is named)
        _env_file=None,  # pydantic-settings' own options pass through
    )

    assert from_environment.max_value_bytes == 32
    assert given.max_value_bytes == 16
    assert given.create_tables is False
    assert given.smrt_master_key is not None
    assert given.smrt_master_key.get_secret_value() == "given"


# -- errors rebuilt by other frameworks -------------------------------------------------


def test_a_drift_error_rebuilt_from_its_args_stays_a_drift_error() -> None:
    """Celery's JSON result backend rebuilds an exception as ``cls(*exc.args)``: the
    drift error, whose report was required, came back as a plain Exception."""
    report = DriftReport(
        tenant_id="acme", checked_at=datetime(2026, 1, 1, tzinfo=UTC), ok=False, issues=[],
        summary={"errors": 1},
    )  # fmt: skip
    error = SecretKeyDriftError("acme/api: key drift", report)

    rebuilt = type(error)(*error.args)
    unpickled = pickle.loads(pickle.dumps(error))  # noqa: S301 (our own bytes)

    assert type(rebuilt) is SecretKeyDriftError
    assert str(rebuilt) == "acme/api: key drift"
    assert rebuilt.report is None
    assert unpickled.report == report


# -- the caller's str subclasses --------------------------------------------------------


class _Names(enum.StrEnum):
    API = "api-key"
    PAYMENTS = "payments"


def test_store_returns_plain_strings_for_a_callers_str_enum(service: SecretService) -> None:
    """The enum came back inside the result (where list() gives str), and a process
    without the enum's module could not unpickle it."""
    with tenant("acme"):
        stored = service.store(
            _Names.API,
            "v",
            category=_Names.PAYMENTS,
            description=_Names.PAYMENTS,
            metadata={_Names.API: _Names.PAYMENTS},
        )
        listed = service.list()[0]

    ((key, item),) = stored.metadata.items()
    texts = [stored.name, stored.category, stored.description, key, item]
    assert [type(text) for text in texts] == [str] * 5
    assert stored == listed
    assert b"_Names" not in pickle.dumps(stored)


# -- values -----------------------------------------------------------------------------


def test_a_released_memoryview_value_is_invalid_input_and_nothing_is_written(
    service: SecretService,
) -> None:
    view = memoryview(b"binary value")
    view.release()

    with tenant("acme"):
        with pytest.raises(InvalidInput, match="released memoryview"):
            service.store("api", view)
        with pytest.raises(SecretNotFound):
            service.retrieve("api")


# -- subclasses under a type checker ----------------------------------------------------

_SUBCLASS = textwrap.dedent(
    """
    from keyledger import SecretService


    class AppSecrets(SecretService):
        def app_name(self) -> str:
            return "app"


    def names() -> str:
        with AppSecrets.create("memory:") as service:
            return service.app_name() + AppSecrets.create("memory:").app_name()
    """
)


def test_a_subclass_of_secret_service_type_checks(tmp_path: Path) -> None:
    """``create`` and ``__enter__`` were typed ``-> SecretService``: a subclass's own
    methods were unknown to the type checker on what they returned."""
    mypy = pytest.importorskip("mypy.api")
    module = tmp_path / "app_secrets.py"
    module.write_text(_SUBCLASS)

    out, err, status = mypy.run(
        ["--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(module)]
    )

    assert status == 0, out + err
