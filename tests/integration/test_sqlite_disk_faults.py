"""A SQLite store on a failing disk: real I/O errors, injected under a real process.

``tests/faults/faultfs.c``, preloaded into a child process (LD_PRELOAD), fails the
writes or flushes SQLite makes to the test's files while a control file says so: a full
disk (ENOSPC), an I/O error (EIO), a flush that fails (fsync EIO). The child drives
the library through the failure and back; the test then opens the store afresh and
checks what a user relies on: every refused call raised ``StorageError`` (never a raw
``sqlite3`` error), no value was returned without its read recorded, and the store
reads consistently (values, access counts and the audit model against the stream).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from keyledger import SecretService, super_admin

pytestmark = pytest.mark.slow

SHIM = Path(__file__).resolve().parent.parent / "faults" / "faultfs.c"

CHILD = r"""
import json, sys
from pathlib import Path
from keyledger import KeyledgerError, SecretService, StorageError

url, control = sys.argv[1], Path(sys.argv[2])
service = SecretService.create(url, master_key=sys.argv[3])
out = {"raised": [], "returned": []}

def attempt(what, call):
    try:
        result = call()
    except StorageError as error:
        out["raised"].append([what, "StorageError", str(error)])
        return None
    except Exception as error:
        out["raised"].append([what, type(error).__module__ + "." + type(error).__name__, ""])
        return None
    out["returned"].append(what)
    return result

for i in range(5):
    service.store_for_tenant("acme", f"s{i}", f"v{i}")
control.write_text(sys.argv[4])
attempt("store", lambda: service.store_for_tenant("acme", "new", "n"))
attempt("update", lambda: service.store_for_tenant("acme", "s0", "changed"))
for i in range(3):
    secret = attempt(f"retrieve{i}", lambda: service.retrieve_for_tenant("acme", "s1"))
attempt("rotate", lambda: service.rotate_key_for_tenant("acme"))
control.write_text("")
after = service.retrieve_for_tenant("acme", "s1")
out["after"] = [after.value, after.access_count]
service.store_for_tenant("acme", "later", "l")
service.close()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not sys.platform.startswith("linux"):
        if os.environ.get("CI"):
            pytest.fail("these tests need a C compiler on Linux (CI has one)")
        pytest.skip("needs a C compiler on Linux to build the fault shim")
    built = tmp_path_factory.mktemp("shim") / "faultfs.so"
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-O2", "-o", str(built), str(SHIM), "-ldl"], check=True
    )
    return built


def run_child(shim: Path, tmp_path: Path, master_key: str, fault: str) -> dict[str, Any]:
    directory = tmp_path / "faulty"
    directory.mkdir()
    control = tmp_path / "control"
    control.write_text("")
    env = {
        **os.environ,
        "LD_PRELOAD": str(shim),
        "FAULT_CTL": str(control),
        "FAULT_MATCH": str(directory) + "/",
    }
    url = f"sqlite:///{directory / 'kl.db'}"
    done = subprocess.run(
        [sys.executable, "-c", CHILD, url, str(control), master_key, fault],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout)
    result["url"] = url
    return result


def assert_consistent(url: str, master_key: str) -> SecretService:
    service = SecretService.create(url, master_key=master_key)
    assert service.check_read_models().consistent
    with super_admin():
        reads = [
            e
            for e in service.get_audit_logs(tenant_id="acme", action="read", limit=1000)
            if e.result == "success" and e.secret_name == "s1"
        ]
    (s1,) = [info for info in service.list_for_tenant("acme") if info.name == "s1"]
    assert s1.access_count == len(reads)  # every counted read is in the audit log
    assert service.retrieve_for_tenant("acme", "later").value == "l"
    return service


@pytest.mark.parametrize("fault", ["enospc", "eio"])
def test_writes_on_a_full_or_failing_disk_are_refused_and_nothing_is_half_written(
    shim: Path, tmp_path: Path, master_key: str, fault: str
) -> None:
    out = run_child(shim, tmp_path, master_key, fault)

    failed = {what: kind for what, kind, _ in out["raised"]}
    assert failed == {
        "store": "StorageError",
        "update": "StorageError",
        "retrieve0": "StorageError",
        "retrieve1": "StorageError",
        "retrieve2": "StorageError",
        "rotate": "StorageError",
    }
    assert out["returned"] == []  # no value returned without its read committed
    assert out["after"] == ["v1", 1]  # the disk back: the service goes on
    service = assert_consistent(out["url"], master_key)
    try:
        names = sorted(info.name for info in service.list_for_tenant("acme"))
        assert names == ["later", "s0", "s1", "s2", "s3", "s4"]  # nothing of the failed writes
        assert service.retrieve_for_tenant("acme", "s0").value == "v0"
    finally:
        service.close()


def test_a_commit_whose_flush_fails_says_its_outcome_is_unknown(
    shim: Path, tmp_path: Path, master_key: str
) -> None:
    """The transaction reached the write-ahead log, then fsync failed: SQLite recovers it
    when the store is next opened, so "nothing was written" would be wrong."""
    out = run_child(shim, tmp_path, master_key, "fsync")

    assert out["returned"] == []
    assert {kind for _, kind, _ in out["raised"]} == {"StorageError"}
    assert all("outcome is unknown" in message for _, _, message in out["raised"])
    service = assert_consistent(out["url"], master_key)
    service.close()
