#!/usr/bin/env bash
# The README's first command: set up the environment, build the sample studies, and run the
# MedSegX MONAI Label server on http://127.0.0.1:${PORT:-8000} with the embedded default model.
# Extra arguments go to `monailabel start_server`, e.g. `--conf device cuda --conf cache_size 128`; it runs
# through the app's launcher (apps/medsegx/lib/compat.py: MONAI Label without the ~200 MiB of imports the
# server never uses, docs/MONAILABEL_COMPAT.md #10).
#   STUDIES=<folder or DICOMweb URL>  serve other studies instead of the sample datastore
#   HOST / PORT                       where to listen (default 127.0.0.1:8000)
#   PACS=orthanc                      the whole stack: Orthanc + DICOMweb on 127.0.0.1:${ORTHANC_HTTP_PORT:-8042}
#                                     (scripts/pacs.sh: installed with apt, sample CT + MR series uploaded),
#                                     served from its DICOMweb; Orthanc stops when the server does
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# MONAI Label's launcher runs `python` from PATH, and dcmqi's itkimage2segimage lives here too.
export PATH="$PWD/.venv/bin:$PATH"

if [ "${PACS:-}" = "orthanc" ]; then
    bash scripts/pacs.sh start
    trap 'bash scripts/pacs.sh stop' EXIT
    STUDIES="http://127.0.0.1:${ORTHANC_HTTP_PORT:-8042}/dicom-web"
    # MONAI Label lists only CT series unless told (QIDO list match: CT or MR)
    ct_and_mr='{"Modality": "CT,MR"}'
    export MONAI_LABEL_DICOMWEB_SEARCH_FILTER="${MONAI_LABEL_DICOMWEB_SEARCH_FILTER:-$ct_and_mr}"
    echo "start: MedSegX on http://${HOST:-127.0.0.1}:${PORT:-8000} (studies: $STUDIES; OHIF: /ohif/)"
    python apps/medsegx/lib/compat.py start_server --app apps/medsegx --studies "$STUDIES" \
        --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" "$@"
    exit $?
elif [ -n "${PACS:-}" ]; then
    echo "start: PACS=$PACS is not supported (PACS=orthanc)" >&2
    exit 2
fi

if [ -z "${STUDIES:-}" ]; then
    python sample-data/build_sample_data.py --out sample-data/datastore > /dev/null
    STUDIES=sample-data/datastore
fi
echo "start: MedSegX on http://${HOST:-127.0.0.1}:${PORT:-8000} (studies: $STUDIES)"
exec python apps/medsegx/lib/compat.py start_server --app apps/medsegx --studies "$STUDIES" \
    --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" "$@"
