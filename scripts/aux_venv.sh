#!/usr/bin/env bash
# Build (idempotently) a second virtual environment for a real third-party reader or client that
# pins versions the model venv cannot share (LeRobot pins another torch; openpi-client pins numpy<2).
#   scripts/aux_venv.sh NAME      -> builds $MAGMA_ROS_CACHE/venvs/NAME from test/aux_venvs/NAME.txt,
#                                    prints the venv's python on the last line
# A second run with the requirements unchanged is a hash comparison. The tests call this through
# conftest.aux_python(NAME); `make test` builds every venv listed in test/aux_venvs/ first.
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1
req="test/aux_venvs/$name.txt"
[ -f "$req" ] || { echo "aux_venv: no requirements file $req" >&2; exit 2; }
cache=${MAGMA_ROS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/magma_ros}
venv="$cache/venvs/$name"
stamp="$venv/.stamp"
want=$(sha256sum "$req" | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
  echo "$venv/bin/python"
  exit 0
fi
mkdir -p "$cache/venvs"
# One builder at a time per venv (two test processes may ask at once).
exec 9>"$cache/venvs/.$name.lock"
flock 9
if ! { [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; }; then
  echo "[aux_venv] building $venv from $req (first time: minutes)" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >&2
  "$venv/bin/pip" install -q -r "$req" >&2
  echo "$want" > "$stamp"
fi
echo "$venv/bin/python"
