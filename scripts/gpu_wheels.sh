#!/usr/bin/env bash
# Downloads (here, where PyPI is reachable) the wheels the GPU machine lacks into .whl/,
# which git ignores: the device call carries .whl and benchmarks/gpu_check.sh installs
# them. The GPU image has jax 0.11.2, flax, optax, orbax, tokenizers, sentencepiece,
# tensorboard, pytest; it lacks the rest of requirements.txt that the checks import.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
pin() { grep -i "^$1==" requirements.txt | head -1; }
PY=${PY:-.venv/bin/python}
for spec in "$(pin grain)" "$(pin ml-collections)" "$(pin qwix)" "$(pin array-record)" \
            "$(pin tensorboardx)" portpicker; do
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d .whl "$spec"
done
ls -la .whl
