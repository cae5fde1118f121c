"""Base experiment: a decoder-only transformer LM on the embedded corpus.

Usage: ``--config=experiments/configs/base.py:<size>`` with size one of
``tiny`` (tests, seconds on a CPU), ``default`` (the README's default experiment, with
the shipped BPE tokenizer: about 6 minutes on a 2-core CPU), ``small`` (~10M, one accelerator) and ``125m``
(~125M parameters at GPT-2-small width and depth, accelerators).

Every field of every experiment is here. The groups of the libraries and of the
loss terms are made from their config dataclasses (``group``), whose docstrings
describe each field and whose defaults are the defaults: ``model.moe``
(``moe.config.MoEConfig``), ``model.linear`` (``attention.linear.LinearConfig``),
``model.sparse`` (``attention.spec.BlockSparse``, plus ``enabled``),
``model.hierarchical`` (``attention.spec.Hierarchical``; ``block=0``: off),
``optimizer`` (``optim.chain.OptimizerConfig``, with ``muon`` and ``namo``), ``quant``
(``lm.quant.QuantConfig``), ``prune`` (``lm.prune.PruneConfig``) and one
group per loss term of ``lm.losses`` (``distill``: ``lm.losses.distill.DistillConfig``).
"""
import ml_collections

from attention.linear import LinearConfig
from attention.spec import BlockSparse, Hierarchical
from experiments.configs import group, unknown_arg
from lm import losses
from lm.lora import LoraConfig
from lm.prune import PruneConfig
from lm.quant import QuantConfig
from moe.config import MoEConfig
from optim.chain import OptimizerConfig

# name: (d_model, n_layers, n_heads, n_kv_heads, d_ff, seq_len, batch_size, steps)
SIZES = {
    "tiny": (64, 2, 4, 2, 192, 64, 8, 40),
    # default: the shipped BPE at the training FLOPs of 500 byte-level steps (records/
    # 2026-11-29-tokenizers: 1.95 vs 2.09 held-out bits per byte at equal FLOPs)
    "default": (192, 4, 6, 2, 512, 128, 16, 360),
    "small": (384, 6, 6, 2, 1024, 512, 32, 5000),
    "125m": (768, 12, 12, 4, 3840, 1024, 64, 20000),
}


def get_config(size: str = "default") -> ml_collections.ConfigDict:
  if size not in SIZES:
    raise unknown_arg("base.py", size, SIZES)
  d, n_layers, heads, kv_heads, d_ff, seq_len, batch, steps = SIZES[size]
  c = ml_collections.ConfigDict()
  c.name = f"base-{size}"
  c.seed = 0
  c.target_topology = ""  # the TPU slice a config is sized for (pod.py), e.g. v5p:4x4x2

  # Device mesh (lm/sharding.py): sizes per axis, -1 fills the remaining devices.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.dcn = 1  # slices (multi-slice TPU), data parallel over the data-center network
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.expert = 1
  c.mesh.sequence = 1
  c.mesh.tensor = 1

  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 0  # 0: the tokenizer's vocabulary, padded up to a multiple of 128
  c.model.d_model = d
  c.model.n_layers = n_layers
  c.model.n_heads = heads
  c.model.n_kv_heads = kv_heads
  c.model.head_dim = 0  # 0: d_model // n_heads
  c.model.d_ff = d_ff
  c.model.tie_embeddings = False
  c.model.rope_theta = 10_000.0
  c.model.norm_eps = 1e-6
  c.model.dtype = "bfloat16"  # compute dtype of activations and matmuls
  c.model.param_dtype = "float32"
  c.model.attention_impl = "xla"  # see attention.ops.available_implementations()
  # What each block keeps for the backward pass (lm.config.REMAT_POLICIES): none | full
  # (its input only) | dots | dots_no_batch | offload; the rest is recomputed there.
  c.model.remat = "none"
  # Scan over layers (lm.model): the blocks' weights stacked on a leading `layers` axis
  # and run by one lax.scan over units of the layer pattern's period (hybrid: e.g. LLLS
  # is one unit), so compile time stops growing with depth. Same init and numbers.
  c.model.scan_layers = False
  # Token mixer per layer, the pattern cycled over the layers: S = softmax attention,
  # L = linear attention (attention/linear.py). "LLLS": three linear layers per softmax one.
  c.model.layer_pattern = "S"
  c.model.linear = group(LinearConfig())
  c.model.sliding_window = 0  # softmax layers: > 0 attends to the last n tokens only
  # Softmax layers: width of a causal depthwise conv on q, k, v (the linear layers' short
  # conv; the recall ablation's control). 0: none.
  c.model.qkv_conv = 0
  # Trainable block-sparse softmax attention (attention/sparse.py, SpargeAttention2's
  # hybrid rule; experiments/configs/sparse_attention.py). The parameters are unchanged.
  c.model.sparse = group(BlockSparse(block_q=64, block_k=64), enabled=False)
  # Hierarchical softmax attention (attention/hierarchical.py): tokens of the own and the
  # previous local_blocks blocks, one pooled summary per older block. block=0: off.
  # Set model.attention_impl=blocked for the block-skipping path (xla: its dense twin).
  c.model.hierarchical = group(Hierarchical())
  c.model.hierarchical.block = 0
  # Context parallelism of softmax attention over mesh.sequence (attention/context.py).
  c.model.context_parallel = "none"  # none | ulysses | headwise | ring | zigzag
  c.model.heads_per_stage = 1  # headwise: heads per device per stage (Untied Ulysses' U / C)
  # Mixture of experts (moe/; experiments/configs/moe.py). num_experts=0: dense model.
  c.model.moe = group(MoEConfig())

  c.data = ml_collections.ConfigDict()
  # Sources (lm/data): embedded | files | jsonl | parquet | arrayrecord | mixture | synthetic
  # | preference (DPO pairs: a JSONL of prompt/chosen/rejected, or synthetic:reverse|upper)
  c.data.source = "embedded"
  c.data.path = ""  # a file, a folder or a glob of shards (files, jsonl, parquet, arrayrecord)
  c.data.field = "text"  # jsonl: the field holding each document's text
  c.data.column = "text"  # parquet: the column holding each document's text
  c.data.eval_path = ""  # held-out data of the same kind; empty: split by document
  # byte | bpe (shipped, 4096 tokens) | a tokenizer.json / .model (experiments.tokenizer)
  c.data.tokenizer = "bpe" if size == "default" else "byte"
  c.data.bos = False  # BOS before each document
  c.data.eos = True  # EOS after each document
  c.data.shuffle_window = 1024  # train rows in random order within windows of this many rows
  c.data.workers = 0  # grain worker processes building batches (0: in the train process)
  # source="mixture": {name: {source, path, field, column, eval_path, weight}}
  c.data.mixture = ml_collections.ConfigDict()
  c.data.stages = ()  # curriculum: ((step, {name: weight}), ...) in increasing steps
  c.data.seq_len = seq_len
  c.data.batch_size = batch
  c.data.val_fraction = 0.05  # share of documents held out for eval
  c.data.shuffle_seed = 0
  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.task = "mqar"  # mqar | copy
  c.data.synthetic.num_pairs = 8  # mqar: key-value pairs per example
  c.data.synthetic.num_queries = 8  # mqar: queries per example
  c.data.synthetic.copy_len = 16  # copy: length of the string to copy
  c.data.synthetic.vocab = 64  # symbols drawn from token ids [2, 2 + vocab)
  # mqar: queries at random slots over the rest of the sequence (Zoology's layout; the
  # distance to the pairs grows with seq_len) instead of right after the pairs.
  c.data.synthetic.spread = False

  c.train = ml_collections.ConfigDict()
  c.train.steps = steps
  c.train.log_every = max(steps // 30, 1)
  c.train.eval_every = max(steps // 6, 1)
  c.train.eval_batches = 4
  c.train.checkpoint_every = max(steps // 3, 1)
  c.train.keep_checkpoints = 2
  c.train.progress = "auto"  # auto (bar on a terminal) | bar | log
  c.train.plot = True  # write loss_curve.png into the workdir at the end
  c.train.tensorboard = True  # write TensorBoard events into <workdir>/tensorboard
  # A trained run's workdir to start from (its newest weights; same architecture) when
  # this workdir has no checkpoint: QAT, pruning or fine-tuning of a trained model.
  c.train.init_from = ""
  # Model FLOP utilisation (lm/flops.py): the per-device dense bf16 peak in TFLOP/s;
  # 0 looks the device up in lm.flops.PEAK_TFLOPS (no MFU on CPU or unknown devices).
  c.train.peak_tflops = 0.0
  # (first, last): trace steps first..last with jax.profiler into <workdir>/tensorboard
  # (TensorBoard's profile tab, the xprof plugin); () traces nothing.
  c.train.profile_steps = ()
  # XLA flags for this run (added to $XLA_FLAGS before JAX starts its backend; a process
  # whose JAX already runs, e.g. a notebook, says they were not applied).
  c.train.xla_flags = ""

  # AdamW, or Muon / NAMO / NAMO-D on the matrices with AdamW on the rest (optim/).
  c.optimizer = group(OptimizerConfig())
  c.optimizer.warmup_steps = c.train.get_ref("steps") // 20  # follows train.steps overrides

  # Compression (lm/quant.py, lm/prune.py): weight / activation quantization (ptq: the
  # run is read back quantized; qat: trained quantized) and pruning masks.
  c.quant = group(QuantConfig())
  c.prune = group(PruneConfig())
  # Low-rank adapters on a frozen base run (lm/lora.py): set lora.init_from to its
  # workdir; lora.base_quant=int4|nf4 is QLoRA.
  c.lora = group(LoraConfig())

  # One group per loss term that has settings (lm/losses/): e.g. distill (distillation
  # fine-tuning from a teacher run: set distill.teacher to its workdir).
  for term in losses.TERMS.values():
    if term.group:
      c[term.group] = group(term.Config())

  return c
