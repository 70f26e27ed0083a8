"""The README's library quick start runs as printed, and runs again on the store it left.

A user copies it into a file and runs it, then runs it again: the first version of it
failed the second time (its last call disabled the secret, and a store keeps a disabled
secret disabled; found by review).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def quick_start() -> str:
    section = README.read_text().split("## Library quick start", 1)[1]
    found = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert found is not None
    return found.group(1)


def test_the_library_quick_start_runs_as_printed_twice(tmp_path: Path, master_key: str) -> None:
    script = tmp_path / "quick_start.py"
    script.write_text(quick_start())
    environment = {**os.environ, "KEYLEDGER_MASTER_KEY": master_key}

    for _ in range(2):
        done = subprocess.run(
            [sys.executable, str(script)],
            cwd=tmp_path,
            env=environment,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "keyledger.db").exists()
