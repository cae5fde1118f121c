"""The platform programs are traced for.

Usually the default backend's; a CPU host that compiles ahead of time for a TPU
topology traces TPU programs (TPU kernels, native collectives), so the runtime
enters ``target("tpu")`` around the trace. Every registry reads ``current()``.
"""
import contextlib
import contextvars

import jax

PLATFORMS = ("cpu", "gpu", "tpu")
_TARGET = contextvars.ContextVar("kestrel_target_platform", default=None)


@contextlib.contextmanager
def target(name: str):
  """Within this context, programs are traced for ``name`` (cpu, gpu or tpu)."""
  if name not in PLATFORMS:
    raise ValueError(f"platform={name!r}: unknown. Fix: use one of {PLATFORMS}")
  token = _TARGET.set(name)
  try:
    yield
  finally:
    _TARGET.reset(token)


def current() -> str:
  """``target``'s platform, else the default backend's (``cuda``/``rocm`` -> ``gpu``)."""
  name = _TARGET.get() or jax.default_backend()
  return "gpu" if name in ("cuda", "rocm") else name
