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
    # PyPI's torch 2.13.0 is a CUDA build: the venv takes ~8 GB, plus the unpacked wheels while pip
    # works. Say so up front: pip's own "[Errno 28] No space left on device" comes minutes later.
    for dir in .venv "${TMPDIR:-/tmp}"; do
        free_gb=$(df -Pk "$dir" | awk 'NR == 2 {print int($4 / 1048576)}')
        if [ "${free_gb:-0}" -lt 12 ]; then
            echo "bootstrap: warning: only ${free_gb} GB free on the disk of $dir; the install needs about 12 GB" >&2
        fi
    done
    # setuptools/wheel in the venv itself: the editable install below runs without build
    # isolation, so it needs no index access for its build backend.
    .venv/bin/python -m pip install --no-cache-dir -r requirements.txt "setuptools>=68" wheel
    .venv/bin/python -m pip install --no-build-isolation --no-deps -e .
    echo "$wanted" > "$stamp"
fi
