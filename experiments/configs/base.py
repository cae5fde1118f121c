"""Base experiment: a decoder-only transformer LM on the embedded corpus.

Usage: ``--config=experiments/configs/base.py:<size>`` with size one of
``tiny`` (tests, seconds on a CPU), ``default`` (the README's default experiment:
a few minutes on a 2-core CPU), ``small`` (~10M, one accelerator) and ``125m``
(~125M parameters at GPT-2-small width and depth, accelerators).
"""
import ml_collections

# name: (d_model, n_layers, n_heads, n_kv_heads, d_ff, seq_len, batch_size, steps)
SIZES = {
    "tiny": (64, 2, 4, 2, 192, 64, 8, 40),
    "default": (192, 4, 6, 2, 512, 128, 16, 500),
    "small": (384, 6, 6, 2, 1024, 512, 32, 5000),
    "125m": (768, 12, 12, 4, 3840, 1024, 64, 20000),
}


def get_config(size: str = "default") -> ml_collections.ConfigDict:
  if size not in SIZES:
    raise ValueError(f"base.py: unknown size {size!r}; choose one of {sorted(SIZES)}")
  d, n_layers, heads, kv_heads, d_ff, seq_len, batch, steps = SIZES[size]
  c = ml_collections.ConfigDict()
  c.name = f"base-{size}"
  c.seed = 0

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
  c.model.remat = False  # recompute each block in the backward pass (activation memory / FLOPs)
  # Token mixer per layer, the pattern cycled over the layers: S = softmax attention,
  # L = linear attention (attention/linear.py). "LLLS": three linear layers per softmax one.
  c.model.layer_pattern = "S"
  c.model.linear = ml_collections.ConfigDict()
  c.model.linear.variant = "2mamba"  # ssd (Mamba-2) | mamba2s | 2mamba (2Mamba2Furious)
  c.model.linear.chunk_size = 64  # chunked SSD: quadratic within a chunk, a state across chunks
  c.model.sliding_window = 0  # softmax layers: > 0 attends to the last n tokens only
  # Trainable block-sparse softmax attention (attention/sparse.py, SpargeAttention2's
  # hybrid rule; experiments/configs/sparse_attention.py). The parameters are unchanged.
  c.model.sparse = ml_collections.ConfigDict()
  c.model.sparse.enabled = False
  c.model.sparse.block_q = 64  # query block (tokens); data.seq_len must be a multiple
  c.model.sparse.block_k = 64  # key block (tokens); TPU kernels prefer 128
  c.model.sparse.top_k = 0.03  # fraction of a row's causally valid key blocks kept by rank
  c.model.sparse.top_p = 0.2  # plus the fewest blocks whose pooled softmax mass reaches p
  c.model.sparse.sink_blocks = 1  # leading key blocks always kept
  c.model.sparse.local_blocks = 0  # key blocks before the diagonal always kept
  # Hierarchical softmax attention (attention/hierarchical.py): tokens of the own and the
  # previous local_blocks blocks, one pooled summary per older block. block=0: off.
  # Set model.attention_impl=blocked for the block-skipping path (xla: its dense twin).
  c.model.hierarchical = ml_collections.ConfigDict()
  c.model.hierarchical.block = 0
  c.model.hierarchical.local_blocks = 1
  # Context parallelism of softmax attention over mesh.sequence (attention/context.py).
  c.model.context_parallel = "none"  # none | ulysses | headwise | ring
  c.model.heads_per_stage = 1  # headwise: heads per device per stage (Untied Ulysses' U / C)
  # Mixture of experts (moe/; experiments/configs/moe.py). num_experts=0: dense model.
  c.model.moe = ml_collections.ConfigDict()
  c.model.moe.num_experts = 0  # routed experts per MoE layer; 0 = every layer dense
  c.model.moe.every = 1  # MoE in every n-th layer (layers n-1, 2n-1, ...), dense SwiGLU elsewhere
  c.model.moe.top_k = 2  # experts per token (1: Switch, 2: Mixtral)
  c.model.moe.d_ff = 0  # width of each routed expert; 0 = model.d_ff (fine-grained: smaller)
  c.model.moe.num_shared = 0  # always-on shared experts of width moe.d_ff (DeepSeek)
  c.model.moe.score = "softmax"  # softmax | sigmoid (DeepSeek-V3)
  c.model.moe.dispatch = "dropless"  # dropless | dropping | reference (moe/dispatch.py)
  c.model.moe.capacity_factor = 1.25  # dropping: slots per expert = cf * tokens * k / E
  c.model.moe.gmm_impl = "auto"  # dropless grouped matmul: auto | ragged_dot | pallas | megablox | xla
  c.model.moe.expert_parallel = "none"  # none | ragged | fixed: all-to-all over mesh.expert
  c.model.moe.load_balance_coef = 0.01  # Switch balancing loss coefficient (0 disables)
  c.model.moe.z_loss_coef = 1e-3  # ST-MoE router z-loss coefficient (0 disables)
  c.model.moe.bias_update_rate = 0.0  # auxiliary-loss-free balancing step (DeepSeek: 1e-3)

  # Distillation fine-tuning (lm/distill.py): the student (this model, e.g. with
  # model.sparse.enabled) starts from a dense teacher's parameters and learns its
  # next-token distributions. The logged loss and eval_loss stay the cross-entropy.
  c.distill = ml_collections.ConfigDict()
  c.distill.teacher = ""  # "": off; else a dense run's workdir (or its checkpoints/ folder)
  c.distill.loss = "kl"  # kl: T^2 KL(teacher || student) | kl+ce: plus ce_weight x cross-entropy
  c.distill.ce_weight = 1.0  # kl+ce only: weight of the student's cross-entropy
  c.distill.temperature = 1.0  # T: both distributions are softmax(logits / T)

  c.data = ml_collections.ConfigDict()
  c.data.source = "embedded"  # embedded | files | synthetic
  c.data.path = ""  # files: a folder, a file or a glob of text files
  c.data.tokenizer = "byte"
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

  c.train = ml_collections.ConfigDict()
  c.train.steps = steps
  c.train.log_every = max(steps // 30, 1)
  c.train.eval_every = max(steps // 6, 1)
  c.train.eval_batches = 4
  c.train.checkpoint_every = max(steps // 3, 1)
  c.train.keep_checkpoints = 2
  c.train.progress = "auto"  # auto (bar on a terminal) | bar | log
  c.train.plot = True  # write loss_curve.png into the workdir at the end

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"  # adamw | muon | namo | namo_d
  c.optimizer.learning_rate = 3e-3
  c.optimizer.schedule = "cosine"  # cosine | wsd | constant
  c.optimizer.warmup_steps = c.train.get_ref("steps") // 20  # follows train.steps overrides
  c.optimizer.decay_fraction = 0.2  # wsd: share of steps spent decaying
  c.optimizer.min_lr_ratio = 0.1  # final learning rate / peak
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.1
  c.optimizer.clip_norm = 1.0  # 0 disables global-norm clipping
  c.optimizer.freeze_axes = ()  # logical axes whose parameters are frozen, e.g. ('vocab',)
  c.optimizer.muon = ml_collections.ConfigDict()
  c.optimizer.muon.learning_rate = 0.02
  c.optimizer.muon.momentum = 0.95
  c.optimizer.muon.nesterov = True
  c.optimizer.muon.ns_steps = 5
  c.optimizer.muon.weight_decay = 0.0
  # None: Jordan's sqrt(max(1, fan_out / fan_in)); a number r: Moonlight's
  # r * sqrt(max(fan_in, fan_out)) (0.2 matches AdamW's update RMS).
  c.optimizer.muon.consistent_rms = ml_collections.config_dict.placeholder(float)
  c.optimizer.muon.ns_dtype = "bfloat16"  # Newton-Schulz iterations (float32: optax's own)
  c.optimizer.muon.per_head = False  # True: each attention head's projection is its own matrix
  # NAMO / NAMO-D (Zhang, Liu, Schaeffer 2026; optim/namo.py): Adam-style norm
  # adaptation of Muon's orthogonalised momentum, for the matrix group.
  c.optimizer.namo = ml_collections.ConfigDict()
  c.optimizer.namo.learning_rate = 1.2e-2  # the paper's GPT-2-small peak (NAMO-D: 9e-3)
  c.optimizer.namo.b1 = 0.95
  c.optimizer.namo.b2 = 0.99
  c.optimizer.namo.eps = 1e-8
  c.optimizer.namo.weight_decay = 0.1
  c.optimizer.namo.weight_decay_mode = "adaptive"  # adaptive (the paper) | lr (AdamW-style)
  c.optimizer.namo.nesterov = True
  c.optimizer.namo.ns_steps = 5
  c.optimizer.namo.ns_dtype = "bfloat16"
  c.optimizer.namo.scale = 0.2  # step scale s = scale * sqrt(max(m, n))
  c.optimizer.namo.clamp_c = 0.5  # NAMO-D: per-column scales clamped to [c, 1/c] x mean
  c.optimizer.namo.per_head = False

  return c
