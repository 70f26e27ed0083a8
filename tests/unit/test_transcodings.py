"""The transcoder with a reused encoder writes exactly the library's bytes."""

from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from eventsourcing.persistence import (
    DatetimeAsISO,
    DecimalAsStr,
    JSONTranscoder,
    TranscodingNotRegisteredError,
    UUIDAsHex,
)

from keyledger.infrastructure.transcodings import BytesAsBase64, ReusedEncoderTranscoder


def _registered(transcoder: JSONTranscoder) -> JSONTranscoder:
    for transcoding in (UUIDAsHex(), DecimalAsStr(), DatetimeAsISO(), BytesAsBase64()):
        transcoder.register(transcoding)
    return transcoder


STATES: list[Any] = [
    {},
    {
        "timestamp": datetime(2026, 11, 30, 12, 0, 1, 123456, tzinfo=UTC),
        "originator_topic": "keyledger.domain.secret:Secret",
        "tenant_id": "acme",
        "name": "stripe-api-key",
        "envelope": b"\x01\x00\xff" * 30,
        "key_version": 3,
        "category": None,
        "metadata": {"owner": "billing", "ünïcode": '日本語 \u2028 "quoted" \\ /'},
        "expires_at": datetime(2027, 1, 1, tzinfo=timezone(timedelta(hours=-5))),
        "disabled": False,
        "revived": True,
        "actor": {"user_id": "alice", "ip_address": None, "user_agent": "curl/8\ttab"},
        "ids": [uuid4(), uuid4()],
        "ratio": 0.1,
        "big": 2**70,
        "amount": Decimal("12.50"),
        "nested": [{"a": [1, 2, {"b": None}]}, (), []],
    },
    "a bare string",
    [1, "two", None, True],
]


@pytest.mark.parametrize("state", STATES)
def test_the_reused_encoder_writes_the_librarys_bytes(state: Any) -> None:
    library = _registered(JSONTranscoder())
    reused = _registered(ReusedEncoderTranscoder())

    encoded = reused.encode(state)

    assert encoded == library.encode(state)
    assert reused.decode(encoded) == library.decode(encoded)


def test_an_unregistered_type_is_refused_as_by_the_library() -> None:
    reused = _registered(ReusedEncoderTranscoder())

    with pytest.raises(TranscodingNotRegisteredError):
        reused.encode({"value": object()})


def test_threads_encoding_one_shared_state_at_once_all_succeed() -> None:
    """No shared circular-reference memo: threads encoding the same dict (a cached
    actor, say) at once never see each other's markers."""
    reused = _registered(ReusedEncoderTranscoder())
    shared = {"actor": {"user_id": "alice"}, "at": datetime.now(UTC), "blob": b"x" * 64}
    expected = _registered(JSONTranscoder()).encode(shared)
    failures: list[BaseException] = []

    def encode_many() -> None:
        try:
            for _ in range(2000):
                assert reused.encode(shared) == expected
        except BaseException as error:  # reported below
            failures.append(error)

    threads = [threading.Thread(target=encode_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert failures == []


class MarkedTranscoder(JSONTranscoder):
    """A transcoder the process environment names (test_the_process_environment_...)."""


def test_the_process_environment_does_not_choose_the_store_or_its_format(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The library reads its settings from the process environment too, its own names
    and keyledger-prefixed ones, ahead of what keyledger passes: the database URL names
    the store, and events are stored one way."""
    from keyledger import SecretService

    monkeypatch.setenv("KEYLEDGER_SQLITE_DBNAME", str(tmp_path / "elsewhere.db"))
    monkeypatch.setenv("SQLITE_DBNAME", str(tmp_path / "elsewhere2.db"))
    monkeypatch.setenv("TRANSCODER_TOPIC", f"{__name__}:MarkedTranscoder")
    monkeypatch.setenv("COMPRESSOR_TOPIC", "zlib")
    named = tmp_path / "named.db"
    with SecretService.create(f"sqlite:///{named}", master_key="ab" * 32) as service:
        assert type(service._ledger.mapper.transcoder) is ReusedEncoderTranscoder
        service.store_for_tenant("t", "n", "v")
        assert service.retrieve_for_tenant("t", "n").value == "v"

    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".db") == ["named.db"]
    with sqlite3.connect(named) as conn:
        states = [bytes(row[0]) for row in conn.execute("SELECT state FROM stored_events")]
    assert states
    assert all(state.startswith(b'{"timestamp":') for state in states)  # JSON, uncompressed
