#!/usr/bin/env bash
# Every GPU check of the speed issue in one run (at most ~10 minutes on one H100 / H200):
# the GPU kernel tests, the train step before / after the GPU settings (dense and MoE),
# the optimizer overhead, the kernel benchmarks, and two setting variants. Tables go to
# $OUT (default benchmarks/results/gpu-<date>/), one file per check, written as each ends.
#
# Here (PyPI reachable), once:   bash scripts/gpu_wheels.sh      (fills .whl/, git-ignored)
# Then on the GPU machine:       bash benchmarks/gpu_check.sh    (the device tool: carry .whl)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-$(date +%F)}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
PY=${PY:-python3}
# cuda, not a silent CPU fallback (the tests' conftest defaults JAX_PLATFORMS to cpu).
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import jax; print(jax.__version__, jax.devices())" >> "$OUT/gpu.txt" 2>&1

step() {  # step NAME SECONDS COMMAND...: runs COMMAND with a limit, logs to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== $name ($(date +%T))"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "   exit $? ($(date +%T))"; tail -n 12 "$OUT/$name.log"
}
FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false"
# 1. Our GPU kernels compiled for the GPU, against their references.
step kernel_tests 120 $PY -m pytest -q -p no:cacheprovider -rs tests/test_attention_conformance.py \
  tests/test_gmm_conformance.py -k compiled_on_gpu
# 2. The 125M dense step: before (base.py, no flags) and after (gpu.py), side by side.
step train_125m_before 100 $PY benchmarks/train_step.py --config=experiments/configs/base.py:125m \
  --impls=xla,jax_nn --steps=10 --out="$OUT/train_step.md"
step train_125m_after 100 $PY benchmarks/train_step.py --config=experiments/configs/gpu.py:125m \
  --impls=jax_nn,xla --steps=10 --out="$OUT/train_step.md"
# 3. The MoE of equal active FLOPs (8 experts, top-2, half-width experts).
step train_moe 100 $PY benchmarks/train_step.py --config=experiments/configs/gpu.py:moe \
  --impls=jax_nn --steps=10 --out="$OUT/train_step.md"
# 4. Muon / NAMO update share of the step.
step optim 150 $PY benchmarks/optim.py --config=experiments/configs/gpu.py:125m \
  --optimizers=adamw,muon,namo --steps=8 --out="$OUT/optim.md"
# 5. Our kernels against cuDNN attention and lax.ragged_dot.
step attention 90 $PY benchmarks/attention.py --lengths=2048,8192 --densities=0.5,0.25,0.1 \
  --dtype=bfloat16 --out="$OUT/attention.md"
step moe_layer 60 $PY benchmarks/moe.py --experts=8,64 --dtype=bfloat16 \
  --impls=ragged_dot,pallas_gpu,xla --out="$OUT/moe.md"
# 6. Variants of the settings: command buffers off; bf16 master weights.
step train_cmdbuf_off 80 $PY benchmarks/train_step.py --config=experiments/configs/gpu.py:125m \
  --impls=jax_nn --steps=10 --set "train.xla_flags=$FLAGS --xla_gpu_enable_command_buffer=" \
  --out="$OUT/train_step.md"
step train_bf16_params 80 $PY benchmarks/train_step.py --config=experiments/configs/gpu.py:125m \
  --impls=jax_nn --steps=10 --set model.param_dtype=bfloat16 --out="$OUT/train_step.md"
echo "done: $OUT"
