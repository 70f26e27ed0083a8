"""`SecretService.backup` (`keyledger db backup`): an online, consistent copy of a SQLite
store. A plain copy of the database file can be an empty store: in WAL mode recent writes
live in the -wal file (found by review: `cp kl.db` of a running store held 0 of 50
secrets)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import shared_store_url
from keyledger import SecretService, StorageError, super_admin

MakeService = Callable[..., SecretService]


def test_a_backup_is_a_whole_store_with_every_value_and_entry(
    make_service: MakeService, backend: str, tmp_path: Path, master_key: str
) -> None:
    service = make_service()
    if backend == "postgres":
        with pytest.raises(StorageError, match="pg_dump"):
            service.backup(str(tmp_path / "copy.db"))
        assert not (tmp_path / "copy.db").exists()
        return
    for i in range(50):
        service.store_for_tenant("acme", f"s{i}", f"v{i}")
    service.retrieve_for_tenant("acme", "s7")
    if backend == "sqlite":  # (what a file copy would have missed: all of it is in the WAL)
        database = Path(str(service._ledger.env.get("SQLITE_DBNAME")))
        naive = tmp_path / "naive.db"
        shutil.copy(database, naive)
        copied = SecretService.create(f"sqlite:///{naive}", master_key=master_key)
        assert copied.list_for_tenant("acme") == []
        copied.close()
    target = tmp_path / "copy.db"

    service.backup(str(target))

    assert stat.S_IMODE(target.stat().st_mode) & 0o077 == 0  # the owner's alone
    restored = SecretService.create(f"sqlite:///{target}", master_key=master_key)
    try:
        assert len(restored.list_for_tenant("acme")) == 50
        secret = restored.retrieve_for_tenant("acme", "s7")
        assert (secret.value, secret.access_count) == ("v7", 2)
        with super_admin():
            reads = restored.get_audit_logs(tenant_id="acme", action="read")
        assert len(reads) == 2
        assert restored.verify_audit().intact
        assert restored.check_read_models().consistent
    finally:
        restored.close()


def test_a_backup_never_writes_over_a_file(service: SecretService, tmp_path: Path) -> None:
    service.store_for_tenant("acme", "s", "v")
    target = tmp_path / "taken.db"
    target.write_bytes(b"precious")

    with pytest.raises(StorageError, match=r"exists: back up into a new file|pg_dump"):
        service.backup(str(target))

    assert target.read_bytes() == b"precious"


def test_a_backup_never_goes_into_the_stores_own_files(
    make_service: MakeService, backend: str
) -> None:
    """SQLite deletes a -journal beside the store when it next opens it (found by
    review)."""
    if backend != "sqlite":
        pytest.skip("the SQLite file's companions")
    service = make_service()
    service.store_for_tenant("acme", "s", "v")
    database = str(service._ledger.env.get("SQLITE_DBNAME"))

    with pytest.raises(StorageError, match="one of the store's own files"):
        service.backup(database + "-journal")

    assert not Path(database + "-journal").exists()


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from keyledger import SecretService

    service = SecretService.create(sys.argv[1], master_key=sys.argv[2])
    stop, started, n = Path(sys.argv[3]), Path(sys.argv[3] + ".started"), 0
    while not stop.exists():
        service.store_for_tenant("busy", f"s{n % 40}", f"v{n}")
        service.retrieve_for_tenant("busy", f"s{n % 40}")
        n += 1
        if n == 5:
            started.touch()
    service.close()
    print(n)
    """
)


@pytest.mark.slow
def test_a_backup_taken_while_another_process_writes_is_consistent(
    make_service: MakeService, backend: str, tmp_path: Path, master_key: str
) -> None:
    if backend != "sqlite":
        pytest.skip("SQLite files: PostgreSQL is backed up with its own tools")
    service = make_service()
    url = shared_store_url(backend, tmp_path)
    service.store_for_tenant("busy", "s0", "first")
    stop = tmp_path / "stop"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, url, master_key, str(stop)], stdout=subprocess.PIPE
    )
    try:
        started = tmp_path / "stop.started"
        deadline = time.monotonic() + 60
        while not started.exists():  # (the writer is under way: a loaded machine took 1.5 s)
            assert writer.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.01)
        targets = [tmp_path / f"copy{i}.db" for i in range(3)]
        for target in targets:
            service.backup(str(target))
            time.sleep(0.1)
    finally:
        stop.touch()
        out, _ = writer.communicate(timeout=60)
    assert writer.returncode == 0
    assert int(out) > 0
    for target in targets:
        copy = SecretService.create(f"sqlite:///{target}", master_key=master_key)
        try:
            assert copy.check_read_models().consistent
            assert copy.verify_audit().intact
            infos = copy.list_for_tenant("busy")
            with super_admin():
                reads = copy.get_audit_logs(tenant_id="busy", action="read", limit=100_000)
            assert sum(info.access_count for info in infos) == len(reads)
        finally:
            copy.close()
        os.unlink(target)
