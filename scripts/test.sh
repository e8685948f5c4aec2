#!/usr/bin/env bash
# The README's test command: set up the environment (idempotent) and run the whole test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/unit -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# tests/pacs: Orthanc + DICOMweb and headless Chromium from apt (instant when present); without them
# (not root, no sudo) those tests are skipped with the reason
bash scripts/pacs.sh install --browser || echo "test: could not install Orthanc/Chromium; tests/pacs will skip" >&2
export PATH="$PWD/.venv/bin:$PATH"
# Two cores: keep torch from oversubscribing them while a test server runs beside pytest.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
set +e
.venv/bin/python -m pytest -q -rs "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    # pytest's "no tests collected": say so instead of failing on a selection that matched nothing.
    echo "pytest collected no tests (exit 5)"
    exit 0
fi
exit "$status"
