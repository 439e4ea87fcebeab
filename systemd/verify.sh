#!/usr/bin/env bash
# Checks the unit files with systemd-analyze (CI runs it from .ci/run):
# - `verify`: syntax, unknown keys, bad values. It exits 0 on warnings such as an
#   unknown key, so any output at all fails here. It also insists that ExecStart's
#   program exists, so it runs on copies whose ExecStart points at this checkout's
#   interpreter ($PYTHON, default .venv/bin/python) instead of /opt/dicom-node/venv.
# - `security --offline`: fails when a unit's exposure rises above $MAX_EXPOSURE
#   (tenths: 20 is 2.0; today serve 1.2, worker 1.4). Skipped where systemd-analyze
#   is older than 250 (no --offline).
# Skipped with a message where systemd-analyze is missing.
# Usage: bash systemd/verify.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "systemd/verify.sh: no systemd-analyze here, unit files not checked"
    exit 0
fi

python="${PYTHON:-.venv/bin/python}"
case "$python" in /*) ;; *) python="$PWD/$python" ;; esac
if [ ! -x "$python" ]; then
    echo "systemd/verify.sh: $python is not executable (set PYTHON)" >&2
    exit 1
fi
max_exposure="${MAX_EXPOSURE:-20}"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
status=0

for unit in systemd/*.service; do
    copy="$tmp/$(basename "$unit")"
    sed "s|^ExecStart=/opt/dicom-node/venv/bin/python |ExecStart=$python |" "$unit" >"$copy"
    if ! grep -q "^ExecStart=$python " "$copy"; then
        echo "$unit: ExecStart does not start with /opt/dicom-node/venv/bin/python" >&2
        status=1
    fi
done

for copy in "$tmp"/*.service; do
    name="$(basename "$copy")"
    if ! out="$(systemd-analyze verify --man=no "$copy" 2>&1)" || [ -n "$out" ]; then
        printf '%s\n' "${out:-systemd-analyze verify failed}" | sed "s|$tmp/|systemd/|g" >&2
        echo "systemd/$name: verify FAILED" >&2
        status=1
    else
        echo "systemd/$name: verify OK"
    fi
done

if systemd-analyze --help 2>&1 | grep -q -- '--offline'; then
    for unit in systemd/*.service; do
        if out="$(systemd-analyze security --offline=true --threshold="$max_exposure" "$unit" 2>&1)"; then
            printf '%s\n' "$out" | grep 'Overall exposure'
        else
            printf '%s\n' "$out" | grep -e '✗' -e 'Overall exposure' >&2 || printf '%s\n' "$out" >&2
            echo "$unit: exposure above $max_exposure (tenths) FAILED" >&2
            status=1
        fi
    done
else
    echo "systemd/verify.sh: systemd-analyze has no --offline, security not checked"
fi

exit "$status"
