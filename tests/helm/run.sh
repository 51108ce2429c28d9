#!/usr/bin/env bash
# Checks for helm/rerank-service and the Dockerfile (see check_chart.py), runnable on a machine with
# only python3 + pip: creates/reuses the venv .tools/helm-venv (repo-relative, git-ignored), installs
# tests/helm/requirements.txt quietly when it changed, runs the checks.
# Last line: `helm: N passed, M failed`; exit status non-zero on any failure.
#
#   tests/helm/run.sh            # from anywhere
#   PYTHON=python3.12 tests/helm/run.sh
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$ROOT/.tools/helm-venv"
REQ="$ROOT/tests/helm/requirements.txt"
PYTHON="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONDONTWRITEBYTECODE=1

setup_failed() {
  echo "tests/helm: $*" >&2
  echo "helm: 0 passed, 1 failed"
  exit 1
}

if [ ! -x "$VENV/bin/python" ]; then
  mkdir -p "$ROOT/.tools"
  "$PYTHON" -m venv "$VENV" >/dev/null \
    || setup_failed "could not create $VENV with '$PYTHON -m venv' (on Debian/Ubuntu: apt-get install python3-venv)"
fi

stamp="$VENV/.requirements.sha256"
want="$( (cat "$REQ"; "$VENV/bin/python" -c 'import sys; print(sys.version)') | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$VENV/bin/python" -m pip install --quiet -r "$REQ" \
    || setup_failed "pip install -r tests/helm/requirements.txt failed"
  echo "$want" >"$stamp"
fi

cd "$ROOT" && exec "$VENV/bin/python" "$ROOT/tests/helm/check_chart.py"
