#!/usr/bin/env bash
# Creates .venv with a Python >= 3.12 and installs the pinned requirements plus Kestrel
# (editable). Does nothing when .venv is already up to date with requirements.txt/setup.py.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KESTREL_VENV:-.venv}
STAMP="$VENV/.kestrel-installed"
# jax extra: tpu (default; libtpu also gives TPU AOT compiles on any host), or
# cuda12 / cuda13 on NVIDIA machines (installed on top, same jax version).
EXTRA=${KESTREL_JAX_EXTRA:-tpu}
case "$EXTRA" in tpu|cuda12|cuda13) ;; *)
  echo "error: KESTREL_JAX_EXTRA=$EXTRA: unknown. Fix: use tpu, cuda12 or cuda13" >&2; exit 1;;
esac

py_ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }

find_python() {
  local c
  if [ -n "${KESTREL_PYTHON:-}" ]; then
    py_ok "$KESTREL_PYTHON" && { echo "$KESTREL_PYTHON"; return; }
    echo "KESTREL_PYTHON=$KESTREL_PYTHON is not a Python >= 3.12" >&2; return 1
  fi
  for c in python3.12 python3.13 python3.14 python3; do
    if command -v "$c" >/dev/null 2>&1 && py_ok "$c"; then command -v "$c"; return; fi
  done
  # pyenv shims fail unless PYENV_VERSION is set, so look in its versions folder directly.
  local roots=()
  command -v pyenv >/dev/null 2>&1 && roots+=("$(pyenv root)")
  roots+=("${PYENV_ROOT:-$HOME/.pyenv}" /usr/local /usr /opt/python)
  for r in "${roots[@]}"; do
    for c in "$r"/versions/3.1[2-9]*/bin/python3 "$r"/bin/python3.1[2-9] "$r"/3.1[2-9]*/bin/python3; do
      if [ -x "$c" ] && py_ok "$c"; then echo "$c"; return; fi
    done
  done
  return 1
}

if [ -x "$VENV/bin/python" ] && py_ok "$VENV/bin/python" && [ -f "$STAMP" ] \
   && [ "$STAMP" -nt requirements.txt ] && [ "$STAMP" -nt setup.py ] \
   && [ "$(cat "$STAMP")" = "$EXTRA" ]; then
  exit 0
fi

if [ ! -x "$VENV/bin/python" ] || ! py_ok "$VENV/bin/python"; then
  if ! PY=$(find_python); then
    echo "error: Kestrel needs Python >= 3.12 (jax 0.12 and flax 0.12 require it) and none was found." >&2
    echo "       Looked for python3.12/3.13/3.14/python3 on PATH and under pyenv's versions folder." >&2
    echo "       Fix: install Python 3.12+ (e.g. 'pyenv install 3.12') or set KESTREL_PYTHON=/path/to/python3.12." >&2
    exit 1
  fi
  echo "bootstrap: creating $VENV with $PY ($("$PY" --version))"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -r requirements.txt
if [ "$EXTRA" != tpu ]; then
  JAX_VERSION=$(sed -n 's/^jax\[tpu\]==\([^ ]*\).*/\1/p' requirements.txt)
  "$VENV/bin/python" -m pip install --quiet "jax[$EXTRA]==$JAX_VERSION"
fi
"$VENV/bin/python" -m pip install --quiet --no-deps -e .
echo "$EXTRA" > "$STAMP"
echo "bootstrap: $VENV ready ($("$VENV/bin/python" --version), jax[$EXTRA])"
