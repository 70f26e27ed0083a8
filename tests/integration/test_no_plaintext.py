"""No plaintext value, TDEK or AMK is ever written: not to the SQLite files, logs or errors."""

from __future__ import annotations

import base64
import logging
import os
import secrets
import sqlite3
import stat
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from keyledger import (
    DecryptionFailed,
    InvalidInput,
    KeyledgerError,
    MasterKeyUnavailable,
    SecretDisabled,
    SecretExpired,
    SecretNotFound,
    SecretService,
    tenant,
)
from keyledger.infrastructure.crypto import MasterKey
from keyledger.infrastructure.settings import KeyledgerSettings

SNAPSHOT_STORES = 105  # more than the snapshotting interval of secrets (100)


def _forms(raw: bytes) -> dict[str, bytes]:
    """Every encoding of ``raw`` that a leak could take on disk."""
    return {
        "raw": raw,
        "hex": raw.hex().encode(),
        "HEX": raw.hex().upper().encode(),
        "base64": base64.b64encode(raw),
        "base64-unpadded": base64.b64encode(raw).rstrip(b"="),
        "urlsafe-base64": base64.urlsafe_b64encode(raw).rstrip(b"="),
    }


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


def _read_files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir()) if path.is_file()}


def _find(files: dict[str, bytes], needles: dict[str, bytes]) -> list[str]:
    """Every (file, needle) where the needle occurs: the leaks."""
    return [
        f"{label} in {name}"
        for name, content in files.items()
        for label, needle in needles.items()
        if needle and needle in content
    ]


class Scenario:
    """Distinctive values and keys, and everything the service did with them."""

    def __init__(self) -> None:
        self.amk_a = secrets.token_hex(32)
        self.amk_b = secrets.token_hex(32)
        tag = secrets.token_hex(6)
        self.values: dict[str, str | bytes] = {
            "str-v1": f"PLAINTEXT-str-first-{tag}-do-not-leak",
            "str-v2": f"PLAINTEXT-str-second-{tag}-do-not-leak",
            "bytes": b"\x00\x9fPLAINTEXT-bytes-" + secrets.token_bytes(40),
            "unicode": f"PLAINTEXT-ünïcödé-秘密-{tag}",
            "other-tenant": f"PLAINTEXT-other-tenant-{tag}",
            "deleted": f"PLAINTEXT-deleted-{tag}",
            "disabled": b"PLAINTEXT-disabled-" + secrets.token_bytes(24),
            "after-amk-change": f"PLAINTEXT-after-amk-change-{tag}",
        }
        self.snapshot_values = [f"PLAINTEXT-snap-{i:03d}-{tag}" for i in range(SNAPSHOT_STORES)]

    def value_needles(self) -> dict[str, bytes]:
        needles: dict[str, bytes] = {}
        every = {**self.values, **{f"snap-{i}": v for i, v in enumerate(self.snapshot_values)}}
        for label, value in every.items():
            raw = _as_bytes(value)
            needles[f"value {label} raw"] = raw
            for form, encoded in _forms(raw).items():
                if form != "raw":
                    needles[f"value {label} {form}"] = encoded
        return needles

    def amk_needles(self) -> dict[str, bytes]:
        needles: dict[str, bytes] = {}
        for label, hex_text in (("A", self.amk_a), ("B", self.amk_b)):
            for form, encoded in _forms(bytes.fromhex(hex_text)).items():
                needles[f"AMK {label} {form}"] = encoded
        return needles

    def run_part_one(self, url: str) -> None:
        """Stores, reads, updates, rotation, re-encryption, disable, delete under AMK A."""
        with SecretService.create(url, master_key=self.amk_a) as service:
            with tenant("tenant-acme", user_id="alice", ip_address="203.0.113.7"):
                service.store("str-secret", self.values["str-v1"], metadata={"owner": "ops"})
                service.store("bytes-secret", self.values["bytes"], category="binary")
                service.store("unicode-secret", self.values["unicode"])
                service.store("doomed", self.values["deleted"])
                service.store("sleepy", self.values["disabled"])
                assert service.retrieve("str-secret").value == self.values["str-v1"]
                assert service.retrieve("bytes-secret").value == self.values["bytes"]
                service.store("str-secret", self.values["str-v2"])
                service.rotate_key()
                assert service.reencrypt_all().failed == 0
                assert service.retrieve("str-secret").value == self.values["str-v2"]
                assert service.disable("sleepy")
                assert service.delete("doomed")
                for value in self.snapshot_values:
                    service.store("snapshotted", value)
                assert service.retrieve("snapshotted").value == self.snapshot_values[-1]
            with tenant("tenant-globex"):
                service.store("str-secret", self.values["other-tenant"])
                assert service.retrieve("str-secret").value == self.values["other-tenant"]

    def run_part_two(self, url: str, directory: Path) -> dict[str, bytes]:
        """A master-key change (B current, A previous); returns the files as seen while open."""
        service = SecretService.create(
            url, master_key=self.amk_b, previous_master_keys=[self.amk_a]
        )
        try:
            with tenant("tenant-acme"):
                assert service.retrieve("bytes-secret").value == self.values["bytes"]
                service.rotate_key()
                service.store("after-change", self.values["after-amk-change"])
                assert service.reencrypt_all().failed == 0
                assert service.retrieve("unicode-secret").value == self.values["unicode"]
                assert service.retrieve("after-change").value == self.values["after-amk-change"]
            return _read_files(directory)
        finally:
            service.close()


def _data_keys(db_path: Path, amks: dict[str, MasterKey]) -> dict[str, bytes]:
    """Unwrap every stored TDEK with the AMK that wrapped it (the test knows the AMKs)."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT tenant_id, version, amk_id, wrapped FROM kl_key_material")
        return {
            f"TDEK {tenant_id} v{version}": amks[amk_id].unwrap(tenant_id, version, bytes(wrapped))
            for tenant_id, version, amk_id, wrapped in rows.fetchall()
        }
    finally:
        conn.close()


@pytest.fixture(scope="module")
def scanned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Scenario, list[dict[str, bytes]]]:
    directory = tmp_path_factory.mktemp("no-plaintext")
    url = f"sqlite:///{directory / 'keyledger.db'}"
    scenario = Scenario()
    scenario.run_part_one(url)
    after_part_one = _read_files(directory)
    while_open = scenario.run_part_two(url, directory)
    after_close = _read_files(directory)
    return scenario, [after_part_one, while_open, after_close]


def test_the_scan_reads_the_database_files_it_is_meant_to_scan(
    scanned: tuple[Scenario, list[dict[str, bytes]]],
) -> None:
    _, snapshots = scanned
    names = {name for files in snapshots for name in files}
    assert "keyledger.db" in names
    assert "keyledger.db-wal" in snapshots[1]
    # Names and tenant ids are not secret: finding them proves the scan sees the data.
    for files in snapshots:
        content = b"".join(files.values())
        assert b"tenant-acme" in content
        assert b"snapshotted" in content


def test_no_plaintext_value_is_in_any_database_file(
    scanned: tuple[Scenario, list[dict[str, bytes]]],
) -> None:
    scenario, snapshots = scanned
    needles = scenario.value_needles()
    leaks = [leak for files in snapshots for leak in _find(files, needles)]
    assert leaks == []


def test_no_master_key_is_in_any_database_file(
    scanned: tuple[Scenario, list[dict[str, bytes]]],
) -> None:
    scenario, snapshots = scanned
    needles = scenario.amk_needles()
    leaks = [leak for files in snapshots for leak in _find(files, needles)]
    assert leaks == []


def test_no_unwrapped_tdek_is_in_any_database_file(
    scanned: tuple[Scenario, list[dict[str, bytes]]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    scenario, snapshots = scanned
    db_copy = tmp_path_factory.mktemp("tdek-source") / "copy.db"
    db_copy.write_bytes(snapshots[-1]["keyledger.db"])
    amks = {
        MasterKey(bytes.fromhex(hex_text)).amk_id: MasterKey(bytes.fromhex(hex_text))
        for hex_text in (scenario.amk_a, scenario.amk_b)
    }
    tdeks = _data_keys(db_copy, amks)
    # acme: v1, v2 under A, v3 under B; globex: v1 under A.
    assert sorted(tdeks) == [
        "TDEK tenant-acme v1",
        "TDEK tenant-acme v2",
        "TDEK tenant-acme v3",
        "TDEK tenant-globex v1",
    ]
    assert all(len(raw) == 32 for raw in tdeks.values())
    needles = {
        f"{label} {form}": encoded
        for label, raw in tdeks.items()
        for form, encoded in _forms(raw).items()
    }
    leaks = [leak for files in snapshots for leak in _find(files, needles)]
    assert leaks == []


# -- logs and exceptions -------------------------------------------------------------------


def _enable_all_debug_logging(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for name in list(logging.root.manager.loggerDict):
        caplog.set_level(logging.DEBUG, logger=name)
    for name in ("keyledger", "eventsourcing", "sqlite3", "pydantic", "cryptography"):
        caplog.set_level(logging.DEBUG, logger=name)


def _error_texts(error: BaseException) -> str:
    parts = [str(error), repr(error), *map(str, error.args)]
    parts.extend(traceback.format_exception(error))
    return "\n".join(parts)


def test_no_value_or_key_appears_in_logs_or_error_messages(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    _enable_all_debug_logging(caplog)
    url = f"sqlite:///{tmp_path / 'logs.db'}"
    amk = secrets.token_hex(32)
    wrong_amk = secrets.token_hex(32)
    tag = secrets.token_hex(6)
    values: dict[str, str | bytes] = {
        "api": f"LOGCHECK-api-{tag}",
        "binary": b"LOGCHECK-binary-" + secrets.token_bytes(16),
        "disabled": f"LOGCHECK-disabled-{tag}",
        "expired": f"LOGCHECK-expired-{tag}",
    }
    oversized = f"LOGCHECK-oversized-{tag}-" + "x" * 70_000
    errors: list[BaseException] = []

    def expect(kind: type[KeyledgerError], call: Callable[[], object]) -> None:
        with pytest.raises(kind) as caught:
            call()
        errors.append(caught.value)

    with SecretService.create(url, master_key=amk) as service, tenant("tenant-logs", user_id="bob"):
        for name, value in values.items():
            service.store(name, value)
        service.store(
            "expired", values["expired"], expires_at=datetime.now(UTC) - timedelta(seconds=1)
        )
        assert service.retrieve("api").value == values["api"]
        assert service.retrieve("binary").value == values["binary"]
        service.disable("disabled")
        service.rotate_key()
        service.reencrypt_all()
        expect(SecretDisabled, lambda: service.retrieve("disabled"))
        expect(SecretExpired, lambda: service.retrieve("expired"))
        expect(SecretNotFound, lambda: service.retrieve("missing"))
        expect(InvalidInput, lambda: service.store("too-big", oversized))
        expect(InvalidInput, lambda: service.store("bad\nname", values["api"]))
        service.get_audit_logs()
        service.list()
        service.delete("api")
    with SecretService.create(url, master_key=wrong_amk) as service, tenant("tenant-logs"):
        expect(DecryptionFailed, lambda: service.retrieve("binary"))
        expect(MasterKeyUnavailable, lambda: service.store("binary", values["binary"]))

    assert len(errors) == 7
    forbidden: dict[str, str] = {}
    for label, value in values.items():
        raw = _as_bytes(value)
        forbidden[f"value {label}"] = raw.decode("latin-1")
        forbidden[f"value {label} repr"] = repr(value)
        forbidden[f"value {label} base64"] = base64.b64encode(raw).decode()
    forbidden["oversized value"] = oversized[:40]
    for label, hex_text in (("amk", amk), ("wrong amk", wrong_amk)):
        forbidden[f"{label} hex"] = hex_text
        forbidden[f"{label} HEX"] = hex_text.upper()
        forbidden[f"{label} base64"] = base64.b64encode(bytes.fromhex(hex_text)).decode()
    log_text = caplog.text + "\n".join(
        f"{record.getMessage()} {record.args!r} {record.exc_text or ''}"
        for record in caplog.records
    )
    error_text = "\n".join(_error_texts(error) for error in errors)
    assert [label for label, text in forbidden.items() if text in log_text] == []
    assert [label for label, text in forbidden.items() if text in error_text] == []
    # Every failure has a message, so the check is not vacuous.
    assert all(str(error) for error in errors)
    # DEBUG records of keyledger's loggers are captured, so the log check is not vacuous.
    logging.getLogger("keyledger.probe").debug("probe-record")
    assert "probe-record" in caplog.text


def test_a_new_sqlite_store_is_readable_by_its_owner_only(tmp_path: Path, master_key: str) -> None:
    """The database holds wrapped keys, ciphertexts, metadata and who read what: under the
    usual umask of 022 its file, WAL and shared-memory file are still created 0600."""
    previous = os.umask(0o022)
    try:
        service = SecretService.create(f"sqlite:///{tmp_path}/k.db", master_key=master_key)
        service.store_for_tenant("acme", "db", "value")
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
        service.close()
    finally:
        os.umask(previous)
    assert modes == {"k.db": 0o600, "k.db-wal": 0o600, "k.db-shm": 0o600}


def test_an_existing_sqlite_file_keeps_the_mode_its_owner_gave_it(
    tmp_path: Path, master_key: str
) -> None:
    path = tmp_path / "k.db"
    path.touch(mode=0o640)
    path.chmod(0o640)
    service = SecretService.create(f"sqlite:///{path}", master_key=master_key)
    service.store_for_tenant("acme", "db", "value")
    service.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def _reported(error: BaseException) -> str:
    """What an error tracker records of ``error``: its traceback with every frame's locals
    (keyledger's frames: the test's own holds the value it stored)."""
    frames = [
        (frame, line)
        for frame, line in traceback.walk_tb(error.__traceback__)
        if frame.f_code.co_filename != __file__
    ]
    stack = traceback.StackSummary.extract(iter(frames), capture_locals=True)
    return "".join(stack.format()) + repr(error)


@contextmanager
def _storing(tmp_path: Path, master_key: str, value: str) -> Iterator[SecretService]:
    """A SQLite service (1 s lock timeout) holding ``value`` as t1's secret "api"."""
    service = SecretService.create(
        f"sqlite:///{tmp_path / 'kl.db'}",
        master_key=master_key,
        settings=KeyledgerSettings(lock_timeout_seconds=1),
    )
    try:
        service.store_for_tenant("t1", "api", value)
        yield service
    finally:
        service.close()


def _failing_for_the_lock(tmp_path: Path, call: Callable[[], object]) -> KeyledgerError:
    """The error of ``call`` while another connection holds SQLite's write lock (as
    another process writing would)."""
    blocker = sqlite3.connect(tmp_path / "kl.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(KeyledgerError) as raised:
            call()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    return raised.value


def test_a_retrieve_whose_read_cannot_be_recorded_reports_no_plaintext(
    tmp_path: Path, master_key: str
) -> None:
    """The value is withheld (fail closed), and so is it from the failure's traceback: the
    frame that decrypted it is in there, and error trackers record frame locals."""
    value = "sk_live_" + secrets.token_hex(16)
    with _storing(tmp_path, master_key, value) as service:
        service.retrieve_for_tenant("t1", "api")  # cached: the next read decrypts at once
        error = _failing_for_the_lock(tmp_path, lambda: service.retrieve_for_tenant("t1", "api"))

    report = _reported(error)
    assert "retrieve" in report  # the retrieving frames are in it, locals and all
    assert value not in report


def test_a_reencryption_whose_commit_fails_reports_no_plaintext(
    tmp_path: Path, master_key: str
) -> None:
    value = "sk_live_" + secrets.token_hex(16)
    with _storing(tmp_path, master_key, value) as service, tenant("t1"):
        service.rotate_key()
        error = _failing_for_the_lock(tmp_path, service.reencrypt_all)

    report = _reported(error)
    assert "reencrypt" in report
    assert value not in report
