#!/usr/bin/env bash
# One idempotent set-up for `make demo` and `make test`: system libraries (when root),
# a .venv with every pinned dependency, and the package itself in editable mode.
# Second run with nothing changed: a hash comparison, well under 30 s.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

apt_pkgs="libusb-1.0-0 libegl1 libgl1-mesa-dri libosmesa6"
missing=""
for p in $apt_pkgs; do
  dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] apt-get install:$missing"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null) \
      || echo "[setup] WARNING: apt-get failed; MuJoCo rendering / RealSense may not work"
  else
    echo "[setup] missing system libraries; run: sudo apt-get install -y$missing"
  fi
fi

stamp="$VENV/.magma_ros_stamp"
want=$(cat requirements.txt setup.py setup.cfg | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip 2>&1 | { grep -v "^WARNING: Location" || true; }
echo "[setup] installing pinned dependencies into $VENV (first time: a few minutes)"
"$VENV/bin/pip" install -q -r requirements.txt 2>&1 | { grep -v "^WARNING: Location" || true; }
"$VENV/bin/pip" install -q --no-deps --no-build-isolation -e . 2>&1 | { grep -vE "^WARNING: Location|BuildBackendWarning|editable_wheel|with strategy|Editable installation" || true; }
echo "$want" > "$stamp"
echo "[setup] done"
