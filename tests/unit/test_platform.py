"""keyledger on a platform without fork hooks (Windows): a clear ImportError."""

from __future__ import annotations

import subprocess
import sys


def test_importing_without_fork_hooks_says_a_posix_system_is_needed() -> None:
    """Its modules register fork hooks at import: without ``os.register_at_fork`` the
    import failed deep inside with an AttributeError that named none of this."""
    script = "import os; del os.register_at_fork; import keyledger"
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: keyledger needs a POSIX system (Linux, macOS)")
