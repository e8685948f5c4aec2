#!/usr/bin/env bash
# Set up .venv for the app, the trainer and the tests; safe to run again (it is, by start.sh and test.sh).
#   - creates .venv with Python 3.11 when missing (PYTHON=... picks another interpreter);
#   - installs requirements.txt and the package (editable) only when requirements.txt or
#     pyproject.toml changed since the last successful install (stamp: .venv/.bootstrap-stamp).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    PYTHON="${PYTHON:-$(command -v python3.11 || true)}"
    if [ -z "$PYTHON" ]; then
        echo "bootstrap: python3.11 not found; install it or set PYTHON=/path/to/python3.11" >&2
        exit 1
    fi
    echo "bootstrap: creating .venv with $PYTHON"
    "$PYTHON" -m venv .venv
fi

stamp=.venv/.bootstrap-stamp
wanted="$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$wanted" ]; then
    echo "bootstrap: installing requirements.txt and the medsegx package"
    # setuptools/wheel in the venv itself: the editable install below runs without build
    # isolation, so it needs no index access for its build backend.
    .venv/bin/python -m pip install -r requirements.txt "setuptools>=68" wheel
    .venv/bin/python -m pip install --no-build-isolation --no-deps -e .
    echo "$wanted" > "$stamp"
fi
