#!/usr/bin/env bash
# The test suite on another Python than the main one (`make test-compat`).
#
#   scripts/test-compat.sh PYTHON [PYTEST ARGS...]
#
# Makes .venv-<version> with that interpreter (once), installs keyledger there in
# editable mode with its dev extras, and runs pytest with the given arguments. An
# interpreter that is not installed is reported and skipped, unless REQUIRE_PYTHONS=1.
set -euo pipefail
cd "$(dirname "$0")/.."
wanted=$1
shift
# The interpreter on the PATH, or one that pyenv installed but does not put on the PATH
# (its shims answer only for the versions selected).
python=""
for candidate in "$wanted" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"${wanted#python}".*/bin/"$wanted"; do
    if "$candidate" -c "" >/dev/null 2>&1; then
        python=$candidate
        break
    fi
done
if [ -z "$python" ]; then
    if [ "${REQUIRE_PYTHONS:-0}" = 1 ]; then
        echo "test-compat: $wanted is not installed" >&2
        exit 1
    fi
    echo "test-compat: $wanted is not installed: skipped"
    exit 0
fi
version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
venv=".venv-$version"
stamp="$venv/.installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    test -x "$venv/bin/python" || "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -e '.[dev]'
    touch "$stamp"
fi
echo "test-compat: Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())')"
exec "$venv/bin/pytest" -q -p no:cacheprovider "$@"
