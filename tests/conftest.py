"""Test setup: 8 simulated CPU devices, JAX on the CPU, repo root importable; the
helpers every test module shares (fixtures and plain functions).

Randomness: tests draw from ``jax.random.key(<literal>)`` or ``np.random.default_rng(
<literal>)``; nothing depends on Python's salted ``hash``, so a failure replays.
"""
import contextlib
import json
import os
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# 8 simulated CPU devices; XLA's cheapest CPU compile (the tests' programs are tiny and
# compiling dominates; TPU compiles from this host are unaffected: checked on the remat
# test's memory and FLOPs).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0"
                           " --xla_llvm_disable_expensive_passes=true").strip()
# Many tests compile the same programs (the tiny model's steps): one compilation cache
# for the session (shared by pytest-xdist's workers, which get the same run id) and
# inherited by the command-line runs the tests start. It changes no result, only how
# often XLA compiles.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"kestrel-xla-cache-{_RUN}") if _RUN else
    tempfile.mkdtemp(prefix="kestrel-xla-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# Workers (and the command lines tests start) may load libtpu for AOT compiles at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


def tiny(spec: str = "experiments/configs/base.py:tiny", **overrides):
  """A config from ``spec`` with quiet logging, no plot, no TensorBoard, and
  ``overrides`` given as ``a__b=value`` (``a.b``) keyword arguments."""
  from experiments.configs import load, override
  fields = {"train.progress": "log", "train.plot": False, "train.tensorboard": False}
  fields.update({k.replace("__", "."): v for k, v in overrides.items()})
  return override(load(os.path.join(ROOT, spec) if not os.path.isabs(spec) else spec), fields)


def records(workdir) -> list[dict]:
  """The records of ``<workdir>/metrics.jsonl``."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


@contextlib.contextmanager
def placed(mesh):
  """Trace for ``mesh`` with Kestrel's rules table (``lm.sharding.placed``) and the mesh set."""
  from lm import sharding
  with jax.set_mesh(mesh), sharding.placed(mesh):
    yield


def assert_close(a, b, tol: float = 1e-5):
  """Relative-to-scale closeness: |a - b| <= tol * (|b| + max(1, max |b|))."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.abs(b).max(initial=0))))


def topology_or_skip(name: str = "v5e:2x2"):
  """The devices of a TPU topology for AOT compiles (libtpu), else skip the test."""
  from lm import aot
  try:
    return aot.topology_devices(name)
  except Exception as e:  # noqa: BLE001 - no libtpu here
    pytest.skip(f"no TPU topology (libtpu missing?): {e}")


def conformance_params(cases: dict, impls, runs: dict, refusal) -> list:
  """``pytest.param(impl, case)`` for a conformance suite: every (implementation, case)
  pair that ``refusal`` says is refused (to check the refusal), and the supported pairs
  of ``runs`` (implementation -> case names; an implementation not in ``runs`` runs
  every case). The runs must be supported."""
  for impl, names in runs.items():
    for name in names:
      assert refusal(impl, cases[name]) is None, (impl, name)
  return [pytest.param(impl, name, id=f"{impl}-{name}")
          for name, case in cases.items() for impl in impls
          if refusal(impl, case) is not None or name in runs.get(impl, (name,))]


def triton_h100_lowering(monkeypatch):
  """(abstract one-device H100 mesh, list that collects the verification result of every
  Triton module lowered) for lowering GPU kernels on a host without a GPU; skips the test
  when this jax has no Triton lowering or abstract devices."""
  try:
    from jax._src.pallas.triton import lowering as triton_lowering
    from jax.sharding import AbstractDevice, AbstractMesh
  except ImportError as e:
    pytest.skip(f"no Triton lowering / abstract devices in this jax: {e}")
  verified = []
  lower_module = triton_lowering.lower_jaxpr_to_triton_module

  def lower_and_verify(*args, **kwargs):  # the lowering itself does not verify the module
    result = lower_module(*args, **kwargs)
    verified.append(result.module.operation.verify())
    return result

  monkeypatch.setattr(triton_lowering, "lower_jaxpr_to_triton_module", lower_and_verify)
  device = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda")
  return AbstractMesh((1,), ("d",), abstract_device=device), verified


def data_config(**overrides):
  """``base.py:tiny``'s data group at 4 x 16 tokens, with ``overrides`` set."""
  from experiments.configs.base import get_config
  c = get_config("tiny").data
  c.seq_len, c.batch_size = 16, 4
  for k, v in overrides.items():
    c[k] = v
  return c
