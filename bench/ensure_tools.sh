#!/usr/bin/env bash
# Install the benchmark's system tools (wrk, nginx) when they are missing.
# Needs no standard input; works as root (CI=true) or through sudo when it is available.
set -euo pipefail

missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v taskset >/dev/null 2>&1 || missing+=(util-linux)

if [ "${#missing[@]}" -eq 0 ]; then
    echo "ensure_tools: wrk, nginx and taskset are present"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo -n"
    else
        echo "ensure_tools: need root (or sudo) to install: ${missing[*]}" >&2
        exit 1
    fi
fi

echo "ensure_tools: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq </dev/null
# --no-install-recommends keeps the image small; nginx's service is never started by the bench.
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null
# Debian's nginx package may start a system-wide daemon on :80; the benchmark runs its own.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now nginx >/dev/null 2>&1 || true
fi
echo "ensure_tools: done"
