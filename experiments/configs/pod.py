"""Configs a TPU user launches: the same model code, meshes sized for real slices.

  --config=experiments/configs/pod.py:<name>, name one of
    125m-v5e8   ~125M model on one v5e host (v5e:2x4, 8 chips), data parallel
    1b-v5p64    ~1B model on v5p-64 (v5p:4x4x2, 32 chips), data 2 x fsdp 16
    1b-v5e256   ~1B model on v5e-256 (v5e:16x16, 256 chips), data 16 x fsdp 16

``target_topology`` says which slice each is sized for; check it fits before
launching: ``python -m experiments.compile --config=... --topology=<target>``.
Layers are scanned (``model.scan_layers``): compile time does not grow with depth.
The embedded corpus and byte tokenizer are placeholders at this scale: point
``data.source=files`` / ``data.path`` at your corpus.
"""
from experiments.configs import base, unknown_arg

# name: (base size or model dims, target topology, mesh, batch, seq_len, steps)
_1B = dict(d_model=2048, n_layers=20, n_heads=16, n_kv_heads=8, d_ff=5632)
PODS = {
    "125m-v5e8": ("125m", None, "v5e:2x4", {"data": -1}, 64, 1024, 20_000),
    "1b-v5p64": ("125m", _1B, "v5p:4x4x2", {"data": 2, "fsdp": -1}, 256, 2048, 50_000),
    "1b-v5e256": ("125m", _1B, "v5e:16x16", {"data": 16, "fsdp": -1}, 256, 2048, 50_000),
}


def get_config(name: str = "1b-v5p64"):
  if name not in PODS:
    raise unknown_arg("pod.py", name, PODS)
  size, model, topology, mesh, batch, seq_len, steps = PODS[name]
  c = base.get_config(size)
  c.name = f"pod-{name}"
  c.target_topology = topology
  if model:
    c.model.update(model)
  for axis in c.mesh:
    c.mesh[axis] = mesh.get(axis, 1)
  c.data.batch_size, c.data.seq_len = batch, seq_len
  c.train.steps = steps
  c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 50, 1000, 1000
  c.optimizer.learning_rate = 1e-3
  c.model.scan_layers = True  # one compiled block whatever the depth (lm.model)
  return c
