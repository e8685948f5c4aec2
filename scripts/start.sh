#!/usr/bin/env bash
# The README's first command: set up the environment, build the sample studies, and run the
# MedSegX MONAI Label server on http://127.0.0.1:${PORT:-8000} with the embedded default model.
# Extra arguments go to `monailabel start_server`, e.g. `--conf device cuda --conf cache_size 128`.
#   STUDIES=<folder or DICOMweb URL>  serve other studies instead of the sample datastore
#   HOST / PORT                       where to listen (default 127.0.0.1:8000)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# MONAI Label's launcher runs `python` from PATH, and dcmqi's itkimage2segimage lives here too.
export PATH="$PWD/.venv/bin:$PATH"

if [ -z "${STUDIES:-}" ]; then
    python sample-data/build_sample_data.py --out sample-data/datastore > /dev/null
    STUDIES=sample-data/datastore
fi
echo "start: MedSegX on http://${HOST:-127.0.0.1}:${PORT:-8000} (studies: $STUDIES)"
exec monailabel start_server --app apps/medsegx --studies "$STUDIES" \
    --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" "$@"
