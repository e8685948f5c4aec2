#!/usr/bin/env bash
# A PACS on this machine for the MedSegX app: Orthanc with its DICOMweb plugin (Debian packages),
# listening on loopback only, holding the sample DICOM series.
#
#   bash scripts/pacs.sh install [--browser]  apt-get install orthanc + orthanc-dicomweb (with --browser
#                                             also chromium + chromium-driver) when missing; fast when present
#   bash scripts/pacs.sh start                install, write the config, run Orthanc in the background,
#                                             wait for it and upload the sample series (built if missing)
#   bash scripts/pacs.sh serve                write the config and run Orthanc in the foreground (tests)
#   bash scripts/pacs.sh upload DIR...        POST every file under DIR to /instances (idempotent)
#   bash scripts/pacs.sh stop                 stop the Orthanc that `start` started
#
#   ORTHANC_HTTP_PORT  HTTP port (default 8042); DICOMweb root: http://127.0.0.1:$ORTHANC_HTTP_PORT/dicom-web
#   ORTHANC_DIR        config, storage, log and pid (default .pacs/, git-ignored)
#
# Orthanc 1.10 (Debian 12) has no bind-address option: its HTTP server listens on every
# interface, and "RemoteAccessAllowed": false makes it refuse any client that is not 127.0.0.1.
# The DICOM (C-STORE/C-FIND) port is off: everything goes through HTTP.
set -euo pipefail
cd "$(dirname "$0")/.."

PORT="${ORTHANC_HTTP_PORT:-8042}"
DIR="$(mkdir -p "${ORTHANC_DIR:-.pacs}" && cd "${ORTHANC_DIR:-.pacs}" && pwd)"
URL="http://127.0.0.1:$PORT"
DICOMWEB_PLUGIN=/usr/share/orthanc/plugins/libOrthancDicomWeb.so
START_TIMEOUT_S="${ORTHANC_START_TIMEOUT:-60}"

have_packages() {
    for tool in "$@"; do
        case "$tool" in
            orthanc) command -v Orthanc > /dev/null || return 1 ;;
            orthanc-dicomweb) [ -f "$DICOMWEB_PLUGIN" ] || return 1 ;;
            chromium) command -v chromium > /dev/null || return 1 ;;
            chromium-driver) command -v chromedriver > /dev/null || return 1 ;;
        esac
    done
}

install() {
    local packages=(orthanc orthanc-dicomweb)
    [ "${1:-}" = "--browser" ] && packages+=(chromium chromium-driver)
    have_packages "${packages[@]}" && return 0
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if ! command -v sudo > /dev/null; then
            echo "pacs: ${packages[*]} missing and not root: install them with apt-get" >&2
            return 1
        fi
        sudo="sudo"
    fi
    echo "pacs: installing ${packages[*]} (apt)"
    $sudo apt-get update -qq
    # The orthanc package's own service is not started (policy-rc.d in containers; we never use it).
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" > /dev/null
}

write_config() {
    mkdir -p "$DIR/storage"
    cat > "$DIR/orthanc.json" <<EOF
{
  "Name": "MedSegX-PACS",
  "StorageDirectory": "$DIR/storage",
  "IndexDirectory": "$DIR/storage",
  "HttpPort": $PORT,
  "RemoteAccessAllowed": false,
  "AuthenticationEnabled": false,
  "DicomServerEnabled": false,
  "WebDavEnabled": false,
  "HttpCompressionEnabled": false,
  "Plugins": ["$DICOMWEB_PLUGIN"],
  "DicomWeb": {"Enable": true, "Root": "/dicom-web/", "EnableWado": true, "WadoRoot": "/wado"}
}
EOF
}

serve() {
    have_packages orthanc orthanc-dicomweb || { echo "pacs: Orthanc is not installed: bash scripts/pacs.sh install" >&2; exit 1; }
    write_config
    exec Orthanc "$DIR/orthanc.json"
}

wait_ready() {
    local pid="$1" deadline=$((SECONDS + START_TIMEOUT_S))
    until curl -sf "$URL/system" > /dev/null; do
        if ! kill -0 "$pid" 2> /dev/null; then
            echo "pacs: Orthanc exited; last lines of $DIR/orthanc.log:" >&2
            tail -20 "$DIR/orthanc.log" >&2
            exit 1
        fi
        [ "$SECONDS" -lt "$deadline" ] || { echo "pacs: Orthanc not answering $URL after ${START_TIMEOUT_S}s" >&2; exit 1; }
        sleep 0.2  # poll interval
    done
}

upload() {
    local count=0 file
    while IFS= read -r -d '' file; do
        curl -sf -X POST -H "Expect:" --data-binary "@$file" "$URL/instances" > /dev/null \
            || { echo "pacs: upload of $file to $URL/instances failed" >&2; exit 1; }
        count=$((count + 1))
    done < <(find "$@" -type f -name '*.dcm' -print0 | sort -z)
    echo "pacs: uploaded $count DICOM files to $URL"
}

start() {
    install
    if [ -f "$DIR/orthanc.pid" ] && kill -0 "$(cat "$DIR/orthanc.pid")" 2> /dev/null; then
        echo "pacs: Orthanc already running (pid $(cat "$DIR/orthanc.pid"))"
    else
        bash scripts/pacs.sh serve > "$DIR/orthanc.log" 2>&1 &
        echo $! > "$DIR/orthanc.pid"
    fi
    wait_ready "$(cat "$DIR/orthanc.pid")"
    if [ ! -d sample-data/dicom/ct_phantom_2 ] || [ ! -d sample-data/dicom/mni152_t1 ]; then
        bash scripts/bootstrap.sh
        .venv/bin/python sample-data/build_sample_data.py --out sample-data/datastore > /dev/null
    fi
    upload sample-data/dicom/ct_phantom_2 sample-data/dicom/mni152_t1
    echo "pacs: Orthanc on $URL (DICOMweb: $URL/dicom-web), log $DIR/orthanc.log"
}

stop() {
    if [ -f "$DIR/orthanc.pid" ]; then
        local pid
        pid="$(cat "$DIR/orthanc.pid")"
        if kill "$pid" 2> /dev/null; then
            while kill -0 "$pid" 2> /dev/null; do sleep 0.2; done
            echo "pacs: Orthanc stopped"
        fi
        rm -f "$DIR/orthanc.pid"
    fi
}

command="${1:-}"
shift || true
case "$command" in
    install) install "$@" ;;
    start) start ;;
    serve) serve ;;
    upload) upload "$@" ;;
    stop) stop ;;
    *) echo "usage: bash scripts/pacs.sh install [--browser] | start | serve | upload DIR... | stop" >&2; exit 2 ;;
esac
