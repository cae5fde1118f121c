"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023).

Each round a draft model proposes ``gamma`` tokens one by one; the target scores the
row's newest token and all proposals in one call (gamma + 1 positions); proposals
are accepted left to right and one more token comes from the target, so a round
emits between 1 and gamma + 1 tokens for one target call.

- Greedy (temperature 0): proposal i is accepted while it equals the target's argmax
  at its position; the extra token is the target's argmax after the accepted ones.
  The output equals the target's own greedy output exactly.
- Sampling: proposal d_i, drawn from the draft's distribution q_i, is accepted with
  probability min(1, p_i(d_i) / q_i(d_i)) (p_i the target's); at the first rejection
  the extra token is drawn from norm(max(0, p_i - q_i)), after gamma acceptances from
  p_{gamma+1}. Every emitted token then follows the target's distribution (with the
  same temperature / top-k / top-p, ``lm.decode.sampling.distribution``).

After a round both caches keep the row's newest token and the accepted proposals:
softmax layers by lowering the length (rejected keys stay in slots a length masks,
and rings have ``gamma`` slots of slack, ``attention.cache``), linear-attention
layers by recomputing their state from the inputs they saw (``Transformer.commit``).
The draft is fed its last proposal too (gamma + 1 draft calls per round), so it never
needs a catch-up call.

Drafts (``lm.decode.drafts``): another run with the same tokenizer, or efficient
versions of the target itself.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lm import decode
from lm.decode.sampling import Sampling, distribution, draw, row_keys, sample

SAMPLE, ACCEPT, DRAFT, EXTRA = 0, 1, 2, 3  # random streams (sampling.row_keys)


def accept(p_BGV, q_BGV, d_BG, s: Sampling, keys_BG):
  """(accepted count [B], extra token [B]) for proposals ``d_BG`` drawn from ``q``
  under target distributions ``p_BGV`` (gamma + 1 positions: the last is used
  after gamma acceptances). ``keys_BG``: uniforms' keys; the extra token's key is
  ``keys_BG`` of the first rejected position folded with EXTRA."""
  B, G = d_BG.shape
  p_d = jnp.take_along_axis(p_BGV[:, :G], d_BG[..., None], axis=-1)[..., 0]
  if s.greedy:
    ok = d_BG == jnp.argmax(p_BGV[:, :G], axis=-1)
  else:
    q_d = jnp.take_along_axis(q_BGV, d_BG[..., None], axis=-1)[..., 0]
    u = jax.vmap(jax.vmap(lambda k: jax.random.uniform(k)))(keys_BG)
    ok = u * q_d < p_d  # u < p / q, with q(d) > 0 for a drawn d
  n_acc = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
  rows = jnp.arange(B)
  p_next = p_BGV[rows, n_acc]
  q_next = jnp.concatenate([q_BGV, jnp.zeros_like(q_BGV[:, :1])], axis=1)[rows, n_acc]
  residual = jnp.maximum(p_next - q_next, 0.0)
  total = jnp.sum(residual, axis=-1, keepdims=True)
  residual = jnp.where(total > 0, residual / jnp.where(total > 0, total, 1.0), p_next)
  if s.greedy:
    extra = jnp.argmax(p_next, axis=-1).astype(jnp.int32)
  else:
    k = jax.vmap(lambda k: jax.random.fold_in(k, EXTRA))(
        jnp.concatenate([keys_BG, keys_BG[:, -1:]], axis=1)[rows, n_acc])
    extra = draw(residual, k)
  return n_acc, extra


class Speculative:
  """A target ``decode.Decoder`` and a draft ``decode.Model`` with ``gamma`` proposals.

  Both decoders are built with ``gamma`` slots of slack; ``generate`` returns what
  ``Decoder.generate`` does plus ``acceptance_rate`` (accepted / proposed),
  ``alpha`` (accepted / examined: proposals after a round's first rejection are not
  examined; Leviathan et al.'s per-token acceptance, for which the expected tokens per
  target call are (1 - alpha^(gamma + 1)) / (1 - alpha)) and ``tokens_per_target_call``
  (emitted tokens / target calls, the prompt's excluded)."""

  def __init__(self, target: decode.Model, draft: decode.Model, *, gamma: int, max_len: int,
               cache_dtype: str = "bfloat16", mesh=None):
    if gamma < 1:
      from core.errors import ConfigError
      raise ConfigError("--draft_tokens", gamma, "must be >= 1", "use e.g. 4")
    self.gamma = gamma
    self.target = decode.Decoder(target, max_len=max_len, cache_dtype=cache_dtype, slack=gamma,
                                 mesh=mesh)
    self.draft = decode.Decoder(draft, max_len=max_len, cache_dtype=cache_dtype, slack=gamma,
                                mesh=mesh)

  def generate(self, req: decode.Request):
    t, d = self.target, self.draft
    t.check_request(req)
    tokens, lengths, B = t.pad_prompts(req.prompts)
    Bp = tokens.shape[0]
    s, N = req.sampling, req.max_new_tokens
    logits, tcache = t.prefill(tokens, lengths)
    _, dcache = d.prefill(tokens, lengths)
    rows = jnp.arange(Bp, dtype=jnp.int32)
    first = sample(logits, s, row_keys(s.seed, rows, jnp.asarray(lengths)))
    eos = -1 if req.eos_id is None else req.eos_id
    zeros = jnp.zeros((Bp,), jnp.int32)
    carry = {"tcache": tcache, "dcache": dcache, "cur": first,
             "out": jnp.zeros((Bp, t.max_len), jnp.int32).at[:, 0].set(first),
             "n": jnp.where(first == eos, 0, 1),
             "done": jnp.asarray(np.arange(Bp) >= B) | (first == eos) | (N <= 1),
             "rounds": zeros, "accepted": zeros + 0, "examined": zeros + 0}
    loop = t.jit(("speculative", s, eos, self.gamma),
                 functools.partial(_rounds, t.model, d.model, s, eos, self.gamma),
                 donate=(2,))
    carry = loop(t.model.params, d.model.params, carry, jnp.int32(N))
    out, n = np.asarray(carry["out"]), np.asarray(carry["n"])
    rounds, acc = np.asarray(carry["rounds"])[:B], np.asarray(carry["accepted"])[:B]
    examined = np.asarray(carry["examined"])[:B]
    emitted = np.maximum(n[:B] - 1, 0)
    return {"tokens": [out[b, :n[b]].tolist() for b in range(B)],
            "steps": int(rounds.max(initial=0)) + 1,
            "acceptance_rate": float(acc.sum() / max(rounds.sum() * self.gamma, 1)),
            "alpha": float(acc.sum() / max(examined.sum(), 1)),
            "tokens_per_target_call": float(emitted.sum() / max(rounds.sum(), 1))}


def _rounds(tmodel, dmodel, s: Sampling, eos: int, gamma: int, tparams, dparams, carry, N):
  B = carry["cur"].shape[0]
  rows = jnp.arange(B, dtype=jnp.int32)
  G = gamma

  def body(c):
    live = ~c["done"]
    n_live = live.astype(jnp.int32)
    start = c["tcache"]["lengths"]  # position of cur

    def draft_step(dc, i):
      dcache, tok = dc
      logits, dcache, ex = decode.extend(dmodel, dparams, dcache, tok[:, None], n_live,
                                         keep=("inputs",))
      q = distribution(logits[:, 0], s)
      nxt = sample(logits[:, 0], s, row_keys(s.seed, rows, start + i + 1, DRAFT))
      return (dcache, nxt), (tok, q, ex["inputs"])

    (dcache, _), (fed_GB, q_GBV, d_inputs) = jax.lax.scan(
        draft_step, (c["dcache"], c["cur"]), jnp.arange(G + 1))
    fed = fed_GB.T  # [B, G + 1]: cur, d_1 .. d_G
    proposals = fed[:, 1:]
    q = jnp.moveaxis(q_GBV, 0, 1)[:, :G]
    logits, tcache, ex = decode.extend(tmodel, tparams, c["tcache"], fed, n_live * (G + 1),
                                       keep=("inputs",))
    p = distribution(logits, s)
    keys = jax.vmap(lambda i: row_keys(s.seed, rows, start + i + 1, ACCEPT))(jnp.arange(G))
    n_acc, extra = accept(p, q, proposals, s, jnp.moveaxis(keys, 0, 1))
    keep_n = jnp.where(live, n_acc + 1, 0)
    tcache = decode.commit(tmodel, tparams, c["tcache"], tcache, ex["inputs"], keep_n)
    d_in = {k: jnp.moveaxis(v[:, :, 0], 0, 1) for k, v in d_inputs.items()}
    dcache = decode.commit(dmodel, dparams, c["dcache"], dcache, d_in, keep_n)
    # Emit d_1 .. d_{n_acc}, then the extra token; stop at EOS or N tokens.
    i = jnp.arange(G + 1)[None, :]
    emit = jnp.where(i < n_acc[:, None], jnp.concatenate([proposals, proposals[:, :1]], 1),
                     extra[:, None])
    count = n_acc + 1
    is_eos = (emit == eos) & (i < count[:, None])
    first_eos = jnp.where(jnp.any(is_eos, 1), jnp.argmax(is_eos, 1), G + 1)
    count = jnp.minimum(jnp.minimum(count, first_eos), N - c["n"])
    count = jnp.where(live, count, 0)
    slot = jnp.where(i < count[:, None], c["n"][:, None] + i, c["out"].shape[1])
    out = c["out"].at[rows[:, None], slot].set(emit, mode="drop")
    n = c["n"] + count
    done = c["done"] | (live & jnp.any(is_eos, 1)) | (n >= N)
    return {"tcache": tcache, "dcache": dcache, "cur": jnp.where(live, extra, c["cur"]),
            "out": out, "n": n, "done": done, "rounds": c["rounds"] + n_live,
            "accepted": c["accepted"] + jnp.where(live, n_acc, 0),
            "examined": c["examined"] + jnp.where(live, jnp.minimum(n_acc + 1, G), 0)}

  return jax.lax.while_loop(lambda c: jnp.any(~c["done"]), body, carry)
