#!/usr/bin/env bash
# Set up everything on first use: a .venv with the package and its extras, and the data.
# Re-running is cheap: it only reinstalls when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# System packages (Debian): Fashion-MNIST's IDX files and Chromium for the browser test.
# Only where we are root and apt-get exists; elsewhere torchvision downloads the data.
want=()
[ -d /usr/share/datasets/fashion-mnist ] || want+=(dataset-fashion-mnist)
[ -x /usr/bin/chromium ] || want+=(chromium)
if [ ${#want[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: apt-get install ${want[*]}"
    apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${want[@]}" >/dev/null || \
        echo "setup: could not install ${want[*]} (continuing; see README for other ways to get the data)"
fi

stamp=.venv/.ccatoolkit-installed
want_stamp=$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PYTHON" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want_stamp" ]; then
    echo "setup: installing ccatoolkit[dev] into .venv (first time: a few minutes)"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[dev]"
    echo "$want_stamp" > "$stamp"
fi
