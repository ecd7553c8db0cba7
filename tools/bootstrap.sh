#!/usr/bin/env bash
# Create or update .venv with tierserve and everything it needs. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet --editable ".[dev]"

# perf_analyzer (shipped in the tritonclient wheel) links Debian's libb64.so.0d.
if ! ldconfig -p | grep -q 'libb64\.so\.0d' && command -v apt-get >/dev/null; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -qq libb64-0d >/dev/null 2>&1 \
    || { $sudo apt-get update -qq && $sudo apt-get install -y -qq libb64-0d >/dev/null; } \
    || echo "bootstrap: could not install libb64-0d; perf_analyzer will not run (the server and tests do not need it)" >&2
fi
touch .venv/.installed
