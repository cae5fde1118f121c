"""Ahead-of-time compilation of the real train step for a TPU topology, on any host.

With ``jax[tpu]`` installed, ``jax.experimental.topologies`` describes the devices
of a TPU slice (or several slices) without owning one; lowering the train step
with ``ShapeDtypeStruct`` inputs sharded over a mesh of those devices and
compiling it runs the real TPU compiler, which reports per-device memory and
FLOPs.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections

from core.errors import ConfigError

# HBM per chip in GiB (Google Cloud TPU documentation).
HBM_GIB_PER_CHIP = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32, "tpu7x": 192}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "7x": "tpu7x", "ironwood": "tpu7x"}


def parse_topology(name: str) -> tuple[str, int]:
  """'v5p:4x4x4' -> ('v5p', 64 chips)."""
  gen, sep, dims = name.partition(":")
  gen = _ALIASES.get(gen.lower(), gen.lower())
  try:
    chips = math.prod(int(d) for d in dims.split("x"))
  except ValueError:
    chips = 0
  if not sep or gen not in HBM_GIB_PER_CHIP or chips <= 0:
    raise ConfigError("--topology", name, "expected <generation>:<AxB[xC]> with generation one "
                      f"of {', '.join(HBM_GIB_PER_CHIP)}", "use e.g. v5p:4x4x4 or v5e:16x16")
  return gen, chips


def topology_devices(name: str, num_slices: int = 1) -> list:
  """The devices of ``num_slices`` TPU slices of topology ``name``, on any host."""
  from jax.experimental import topologies
  parse_topology(name)
  topo = topologies.get_topology_desc(platform="tpu", topology_name=name,
                                      chip_config_name="default", num_slices=num_slices)
  return list(topo.devices)


class DoesNotFit(RuntimeError):
  """The compiler ran out of HBM for the step (or the report's peak exceeds HBM)."""


@dataclasses.dataclass
class CompileReport:
  topology: str
  num_slices: int
  devices: int
  mesh: dict
  hbm_bytes: float  # per device
  param_bytes: int  # per device
  opt_bytes: int  # per device
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  compiler_flops: float  # per device per step, from cost analysis
  model_flops: float  # per device per step, lm.flops.train_flops
  params: int
  scanned: bool = False  # model.scan_layers: the compiler counts the loop body once

  @property
  def peak_bytes(self) -> int:
    """Arguments (state, batch) + outputs not aliased onto them + temporaries + code."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.code_bytes)

  @property
  def fits(self) -> bool:
    return self.peak_bytes <= self.hbm_bytes


def _per_device_bytes(tree) -> int:
  total = 0
  for x in jax.tree.leaves(tree):
    shard = x.sharding.shard_shape(x.shape)
    total += math.prod(shard) * jnp.dtype(x.dtype).itemsize
  return total


def lower_train_step(config: ml_collections.ConfigDict, devices):
  """(the experiment, its train step lowered with abstract inputs) on ``devices``."""
  from lm import experiment  # the runtime, imported late: this module is also a library
  exp = experiment.build(config, devices=devices)
  return exp, exp.train_step.lower(exp.state.abstract, exp.abstract_batch(), exp.abstract_aux())


def compile_train_step(config: ml_collections.ConfigDict, topology: str,
                       num_slices: int = 1) -> CompileReport:
  """Lowers and compiles ``config``'s train step for ``topology``; returns the report."""
  gen, chips = parse_topology(topology)
  devices = topology_devices(topology, num_slices)
  exp, lowered = lower_train_step(config, devices)
  c = exp.config
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
      detail = next((l for l in str(e).splitlines() if "memory" in l.lower()), str(e))
      raise DoesNotFit(f"{topology}: the TPU compiler says: {detail.strip()}") from e
    raise
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  from lm.flops import train_flops
  from lm.model import active_param_count
  abstract = exp.state.abstract  # its params: what trains (LoRA: the adapters)
  params = active_param_count(c.model, exp.model.params)
  n = len(devices)
  return CompileReport(
      topology=topology, num_slices=num_slices, devices=n, mesh=dict(exp.mesh.shape),
      hbm_bytes=HBM_GIB_PER_CHIP[gen] * 2**30 * chips * num_slices / n,
      param_bytes=_per_device_bytes(abstract["params"]),
      opt_bytes=_per_device_bytes(abstract["opt_state"]),
      argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
      alias_bytes=mem.alias_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
      code_bytes=mem.generated_code_size_in_bytes,
      compiler_flops=float(cost.get("flops", float("nan"))),
      model_flops=train_flops(c.model, c.data.batch_size, c.data.seq_len) / n,
      params=params, scanned=c.model.scan_layers)


def format_report(r: CompileReport) -> str:
  gib = lambda b: f"{b / 2**30:8.3f} GiB"
  mesh = " x ".join(f"{a}={s}" for a, s in r.mesh.items() if s > 1) or "1"
  lines = [
      f"topology {r.topology} x{r.num_slices} slice(s): {r.devices} devices, mesh {mesh}, "
      f"{r.params / 1e6:.1f}M parameters",
      f"  per device   parameters {gib(r.param_bytes)}   optimizer {gib(r.opt_bytes)}",
      f"               arguments  {gib(r.argument_bytes)}   temporaries {gib(r.temp_bytes)}   "
      f"code {gib(r.code_bytes)}",
      f"               peak ~     {gib(r.peak_bytes)}   of HBM {gib(r.hbm_bytes)} "
      f"({100 * r.peak_bytes / r.hbm_bytes:.1f}%)",
      f"  FLOPs/step per device: compiler {r.compiler_flops:.3e}, model estimate "
      f"{r.model_flops:.3e} (ratio {r.compiler_flops / r.model_flops:.2f})"
      + (" -- layers are scanned: the compiler counts the loop body once" if r.scanned
         else ""),
  ]
  return "\n".join(lines)
