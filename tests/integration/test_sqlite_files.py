"""The files of a SQLite store deleted, moved or replaced under a running service.

SQLite in WAL mode notices none of it: it went on committing into the unlinked file, and
every store, rotation and audited read made afterwards was gone once the process ended
(found by review). keyledger checks that the path still names the file it opened, and
that the write-ahead log is there, before every call: such a call is refused.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyledger import SecretService, StorageError

GONE = "deleted, moved or replaced while this service had it open"


@pytest.fixture
def store(tmp_path: Path, master_key: str) -> Iterator[tuple[SecretService, Path]]:
    path = tmp_path / "kl.db"
    service = SecretService.create(f"sqlite:///{path}", master_key=master_key)
    service.store_for_tenant("acme", "db", "v1")
    yield service, path
    service.close()


def assert_refused(service: SecretService) -> None:
    with pytest.raises(StorageError, match=GONE):
        service.store_for_tenant("acme", "new", "v")
    with pytest.raises(StorageError, match=GONE):
        service.retrieve_for_tenant("acme", "db")  # no value without its read recorded
    with pytest.raises(StorageError, match=GONE):
        service.rotate_key_for_tenant("acme")
    with pytest.raises(StorageError, match=GONE):
        service.list_for_tenant("acme")


def test_a_deleted_database_file_refuses_every_call(
    store: tuple[SecretService, Path], master_key: str
) -> None:
    service, path = store
    kept = path.with_name("kept.db")
    os.link(path, kept)  # (a hard link keeps the content, as an open file does)
    path.unlink()

    assert_refused(service)

    assert not path.exists()  # nothing was written to a new, empty store at the path
    for suffix in ("-wal", "-shm"):
        shutil.copy(str(path) + suffix, str(kept) + suffix)
    reopened = SecretService.create(f"sqlite:///{kept}", master_key=master_key)
    try:
        assert [info.name for info in reopened.list_for_tenant("acme")] == ["db"]
        assert reopened.retrieve_for_tenant("acme", "db").value == "v1"
    finally:
        reopened.close()


def test_a_file_moved_away_and_back_is_used_again(store: tuple[SecretService, Path]) -> None:
    service, path = store
    away = path.with_name("away.db")
    path.rename(away)
    assert_refused(service)

    away.rename(path)

    assert service.retrieve_for_tenant("acme", "db").value == "v1"
    service.store_for_tenant("acme", "new", "v")
    assert sorted(i.name for i in service.list_for_tenant("acme")) == ["db", "new"]


def test_a_database_file_replaced_by_another_refuses_every_call(
    store: tuple[SecretService, Path], tmp_path: Path, master_key: str
) -> None:
    service, path = store
    other = SecretService.create(f"sqlite:///{tmp_path / 'other.db'}", master_key=master_key)
    other.close()
    os.replace(tmp_path / "other.db", path)  # a "restore" by copying a file over it

    assert_refused(service)


def test_a_deleted_write_ahead_log_refuses_writes(store: tuple[SecretService, Path]) -> None:
    service, path = store
    Path(str(path) + "-wal").unlink()

    with pytest.raises(StorageError, match=GONE):
        service.store_for_tenant("acme", "new", "v")
    with pytest.raises(StorageError, match=GONE):
        service.retrieve_for_tenant("acme", "db")


def test_a_store_opened_through_a_symlink_works(tmp_path: Path, master_key: str) -> None:
    """SQLite puts the -wal beside the file the link names: looking for it beside the
    link refused every write (found by review)."""
    (tmp_path / "real").mkdir()
    (tmp_path / "links").mkdir()
    real = tmp_path / "real" / "kl.db"
    SecretService.create(f"sqlite:///{real}", master_key=master_key).close()
    link = tmp_path / "links" / "kl.db"
    link.symlink_to(real)
    service = SecretService.create(f"sqlite:///{link}", master_key=master_key)
    try:
        service.store_for_tenant("acme", "db", "v1")
        assert service.retrieve_for_tenant("acme", "db").value == "v1"
    finally:
        service.close()


def test_a_relative_path_keeps_naming_the_same_file_after_a_chdir(
    tmp_path: Path, master_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connections opened after a chdir (a new thread's writer) opened another, empty
    file (found by review)."""
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    service = SecretService.create("sqlite:///kl.db", master_key=master_key)
    try:
        service.store_for_tenant("acme", "db", "v1")
        monkeypatch.chdir(tmp_path / "elsewhere")
        done: list[str] = []
        thread = threading.Thread(  # a new thread: a new writer connection
            target=lambda: done.append(service.retrieve_for_tenant("acme", "db").value)
        )
        thread.start()
        thread.join()
        assert done == ["v1"]
        assert not (tmp_path / "elsewhere" / "kl.db").exists()
    finally:
        service.close()


def test_a_deleted_shared_memory_file_refuses_writes(store: tuple[SecretService, Path]) -> None:
    """Another process opening the store then makes a new one, and the two no longer see
    each other's locks: the file was corrupted (found by review)."""
    service, path = store
    Path(str(path) + "-shm").unlink()

    with pytest.raises(StorageError, match=GONE):
        service.store_for_tenant("acme", "new", "v")


def test_maintenance_writes_are_refused_too(store: tuple[SecretService, Path]) -> None:
    service, path = store
    Path(str(path) + "-wal").unlink()

    with pytest.raises(StorageError, match=GONE):
        service.rebuild_read_models()
