#!/usr/bin/env bash
# Create or update .venv with tierserve and everything it needs. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet --editable ".[dev]"

# Debian packages the tools and tests use: libb64-0d for perf_analyzer (shipped in the tritonclient wheel),
# prometheus (promtool and a real Prometheus), redis-server (shared state across servers), nginx (the load balancer
# of the several-servers tests). The server itself needs none of them.
debian_packages=(libb64-0d prometheus redis-server nginx)
missing=()
for package in "${debian_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
    export DEBIAN_FRONTEND=noninteractive
    # --no-install-recommends: no node exporter or service started; the tests start what they need on free ports
    { $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
      || { $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }; } \
      || echo "bootstrap: could not install ${missing[*]}; the tests that need them will fail (the server does not)" >&2
  else
    echo "bootstrap: no apt-get; install ${missing[*]} for perf_analyzer and the operations tests" >&2
  fi
fi
touch .venv/.installed
