"""Sparse Transformer: factorised (strided / fixed) self-attention.

[1] R. Child, S. Gray, A. Radford, I. Sutskever. "Generating Long Sequences with Sparse
    Transformers." arXiv:1904.10509 (2019). Reference code: openai/sparse_attention.
[2] L. Weng. "The Transformer Family" (2020), section "Sparse Attention Matrix
    Factorization" (its equations are restored in the repo's catalog, T7).

Full causal attention lets position i see S_i = {j : j <= i}. Factorised attention
splits this into p = 2 sparse sets A^(1), A^(2) (each ~sqrt(n) positions) such that every
j <= i is reachable from i in at most two hops (A^(2) then A^(1)):
    Attend(X, S) = (a(x_i, S_i))_i,
    a(x_i, S_i) = softmax((x_i W_q)(x_j W_k)^T_{j in S_i} / sqrt(d_k)) (x_j W_v)_{j in S_i}
  strided, stride l ~ sqrt(n):                                                [1] Sec. 4.2
    A^(1)_i = {t, ..., i}, t = max(0, i - l)          (the previous l positions)
    A^(2)_i = {j : (i - j) mod l = 0}                 (every l-th position: a "column")
  fixed, c summary positions per block of l:
    A^(1)_i = {j : floor(j / l) = floor(i / l)}       (the own block)
    A^(2)_i = {j : j mod l in {l - c, ..., l - 1}}    (the last c of every block)
  and j <= i everywhere (autoregressive). Three ways to use them ([1] Sec. 4.3):
    interleave: layer k attends with A^(k mod p):  attention(X) = W_p Attend(X, A^(k mod p))
    union:      every head attends to the merged set:  W_p Attend(X, A^(1) u A^(2))
    multihead:  heads are split between the patterns, outputs concatenated then W_p
Blocks are pre-activation residual ([1] Sec. 5.2):
    H_k = H_{k-1} + attn(norm(H_{k-1})) then H_k + ff(norm(H_k)), ff = W_2 GeLU(W_1 x)
with W_2 and W_p initialised 1/sqrt(2N) smaller (N layers); position embeddings are
factorised: e_row(floor(i / l)) + e_col(i mod l) (for an 8x8 image with l = 8, exactly the
image row and column, [1] Sec. 5.3). Recomputation ([1] Sec. 5.4) is jax.checkpoint.

What a reader should know about this implementation:
- Blocked attention (attention='blocked', the default): the queries are split in blocks of
  l; each block attends to (a) its own block (fixed; strided: the previous and its own
  block, since A^(1) reaches l back), causal inside, and (b) the gathered summary keys,
  only in layers where some head uses A^(2): strided, the same column of every earlier
  block (a reshape of the keys to (n/l, l) read along the block axis); fixed, the last c
  positions of every block, gathered once ((n/l) c keys). Every mask comes from iota
  inside jit (nothing of size n^2 is a program constant), keys of (a) are masked out of
  (b), and both parts share one softmax over the concatenated keys, so the sets and the
  math are exactly [1]'s: the dense masked reference (attention='dense', the tests'
  oracle) gives the same outputs, losses and gradients to 1e-6 in float32. Memory per
  head O(n (l + n/l)) strided, O(n (l + c n/l)) fixed, instead of O(n^2): local-only
  layers are linear in n; with l ~ sqrt(n) a 4x longer sequence needs ~8x (dense: 16x).
  The paper preset (n = 12,288) traces; pattern='dense' uses jax.nn.dot_product_attention
  (the fused kernel on GPU).
- dtype='bfloat16' computes every matmul in bfloat16; parameters, softmax, LayerNorm,
  the residual stream and the loss stay float32.

Reproduce (CPU demo: sklearn digits as 64-pixel sequences of 17 intensities, l = 8):
    python transformers/sparse_transformer.py --preset quick
  measured: val 1.89 bits/dim (train 1.47) after 800 updates (batch 32, 4 layers, d=64,
  strided, interleave) with blocked attention (1.892 / 1.474; the earlier run with the
  dense reference: 1.89 / 1.47), ~5k pixels/s, 6.3 min wall-clock (1.2 min compiling) on
  a loaded 2-core CPU; on the same held-out images the per-pixel marginal baseline
  scores 2.42 bits/dim and a global intensity histogram 2.96.
Paper scale (GPU; the preset keeps the byte-level stdlib sources, so it traces on CPU):
    python transformers/sparse_transformer.py --preset paper
  on enwik8 itself (the file enwik8 in DIR, downloaded by hand; common.data.REAL_CORPORA):
    python transformers/sparse_transformer.py --preset paper --dataset enwik8 --data-dir DIR \
        --max-chars 0
  bytes; the held-out last 10% is then the official 5M valid + 5M test bytes (90M/5M/5M).
[1] Table 2: 0.99 bits/byte on enwik8 (30 layers, fixed pattern, context 12,288).
  An A^(2) layer's float32 logits there: B H n (l + c n/l) x 4 bytes = 10 GB (dense: 39
  GB); A^(1) layers 0.4 GB. Not run on a GPU yet.

Differences from the paper:
- Attention is blocked in XLA (gathers, one einsum per part), not [1]'s hand-written
  block-sparse GPU kernels: the memory is the sparse sets', but the summary part still
  computes logits for every gathered key, later blocks' included (masked), so half its
  work is wasted.
- Data: sklearn digits (8x8, 17 levels, 1,797 images) or byte text from the Python
  distribution; enwik8 only with --data-dir, held out as valid + test together (the paper
  reports test); no CIFAR-10 or ImageNet 64. The training set is a uint8
  field of the State (an input of the compiled update, ~11 MB per seed for the stdlib bytes),
  cast to int32 after the gather; the validation windows stay small constants.
- No dropout; bfloat16 is an option (dtype), not the default: Adam with warm-up,
  cosine decay and a global-norm clip. Paper optimiser settings marked "memory" in the
  Config were not checked against the text.
- Within an interleaved stack, layer k uses A^(1) for even k and A^(2) for odd k.
- In multihead mode the first half of the heads uses A^(1), the second half A^(2).
- Positions i < l - c have an empty fixed A^(2) (no summary position yet); their
  attention output is 0 (the residual stream carries them), not a softmax over nothing.
"""

import functools
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from common import data, run

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """Sparse Transformer LM; defaults are [1]'s enwik8 model (from memory where marked)."""

    dataset: str = "stdlib"
    """'digits' (sklearn 8x8 images as 64-pixel sequences), a byte corpus 'pydoc'/'stdlib', or
    a real corpus of common.data.REAL_CORPORA read from data_dir as bytes ([1]: enwik8)"""
    data_dir: str | None = None
    """folder of a real corpus when `dataset` names one: common.data.REAL_CORPORA"""
    max_chars: int = 20_000_000
    """byte corpora: truncate the text to this many characters (0: all)"""
    seq_len: int = 12_288
    """sequence length n (digits: must be 64)"""
    pattern: str = "fixed"
    """'strided', 'fixed' or 'dense' (full causal attention, the baseline)"""
    mode: str = "interleave"
    """how the two sets are used: 'interleave', 'union' or 'multihead'"""
    stride: int = 128
    """l: block length / stride (~sqrt(n); 8 = the digits' image width)"""
    summary: int = 32
    """c: summary positions per block of the fixed pattern"""
    d_model: int = 512
    """model width"""
    n_heads: int = 8
    """attention heads"""
    d_ff: int = 2048
    """feed-forward hidden width"""
    n_layers: int = 30
    """residual blocks N"""
    attention: str = "blocked"
    """'blocked' (each query block gathers its local and summary keys: memory linear in n
    per block) or 'dense' (the O(n^2) masked reference, the tests' oracle)"""
    dtype: str = "float32"
    """compute dtype of the matmuls: 'float32' or 'bfloat16' (parameters, softmax,
    LayerNorm and loss stay float32)"""
    checkpoint: bool = True
    """recompute each block's activations in the backward pass (jax.checkpoint)"""
    batch_size: int = 8
    """sequences per update"""
    lr: float = 3.5e-4
    """peak Adam learning rate (memory)"""
    warmup_steps: int = 5000
    """linear learning-rate warm-up (memory)"""
    total_steps: int = 120_000
    """updates (cosine decay to 0 over them)"""
    max_grad_norm: float = 1.0
    """global gradient-norm clip"""
    eval_windows: int = 8
    """byte corpora: evenly spaced validation windows for evaluate()"""

    @property
    def num_updates(self) -> int:
        return self.total_steps

    @property
    def steps_per_update(self) -> int:
        return self.batch_size * self.seq_len  # pixels or bytes per update

    def validate(self):
        checks = [
            ("dataset", self.dataset in ("digits", "pydoc", "stdlib", *data.REAL_CORPORA),
             f"must be 'digits', 'pydoc', 'stdlib' or one of {', '.join(data.REAL_CORPORA)}"),
            ("seq_len", self.dataset != "digits" or self.seq_len == 64,
             "must be 64 for digits (8 x 8 pixels)"),
            ("pattern", self.pattern in ("strided", "fixed", "dense"),
             "must be 'strided', 'fixed' or 'dense'"),
            ("attention", self.attention in ("blocked", "dense"), "must be 'blocked' or 'dense'"),
            ("dtype", self.dtype in ("float32", "bfloat16"), "must be 'float32' or 'bfloat16'"),
            ("mode", self.mode in ("interleave", "union", "multihead"),
             "must be 'interleave', 'union' or 'multihead'"),
            ("stride", 1 <= self.stride <= self.seq_len, f"must be in [1, {self.seq_len}]"),
            ("summary", 1 <= self.summary <= self.stride, f"must be in [1, {self.stride}]"),
            ("d_model", self.d_model % self.n_heads == 0,
             f"must be divisible by n_heads={self.n_heads}"),
            ("n_heads", self.mode != "multihead" or self.n_heads % 2 == 0,
             "must be even in multihead mode (half the heads per pattern)"),
            ("total_steps", self.total_steps >= 1, "must be >= 1"),
        ]
        for name, ok, msg in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} {msg}")
        if self.dataset in data.REAL_CORPORA and self.data_dir is None:
            data.text_corpus(self.dataset)  # text_corpus's ValueError: pass data_dir


PRESETS = {
    "quick": dict(dataset="digits", seq_len=64, pattern="strided", mode="interleave", stride=8,
                  summary=2, d_model=64, n_heads=4, d_ff=256, n_layers=4, checkpoint=False,
                  batch_size=32, lr=3e-3, warmup_steps=100, total_steps=800),
    "paper": dict(),
}

# --- DATA ---

BOS = 17  # digits: start token in front of the 64 pixels (intensities 0..16)


@functools.cache
def dataset(name: str, max_chars: int, data_dir: str | None = None):
    """(train, val) as numpy int32 and the vocabulary size; jitted callers make them device
    constants. Digits: (N, 64) pixel rasters, a fixed shuffle, the last 297 images held
    out. Text (built-in or a real corpus from data_dir): byte ids, last 10% held out."""
    if name == "digits":
        images, _ = data.digits()
        x = images.reshape(len(images), 64).astype(np.int32)
        x = x[np.random.default_rng(0).permutation(len(x))]
        return x[:1500], x[1500:], 18
    train, val, _ = data.char_corpus(name, 0.1, max_chars or None, True, data_dir)
    return train, val, 256


def batch(key, cfg: Config, ids=None):
    """Inputs and next-token targets (B, n): digits prefixed with BOS, or byte windows, from
    `ids` (the State's uint8 training set; the numpy training set when None)."""
    if ids is None:
        ids = dataset(cfg.dataset, cfg.max_chars, cfg.data_dir)[0]
    ids = jnp.asarray(ids)
    if cfg.dataset != "digits":  # cast after the gather: no int32 copy of the whole corpus
        x, y = data.lm_windows(key, ids, cfg.batch_size, cfg.seq_len)
        return x.astype(jnp.int32), y.astype(jnp.int32)
    x = ids[jax.random.randint(key, (cfg.batch_size,), 0, ids.shape[0])].astype(jnp.int32)
    return jnp.concatenate([jnp.full((x.shape[0], 1), BOS), x[:, :-1]], 1), x


# --- NETWORKS ---


def pattern_sets(pattern: str, i, j, stride: int, summary: int, causal: bool = True):
    """Membership of key j in the query i's sets A^(1), A^(2) ([1] Sec. 4.2), broadcasting
    over numpy or jax index arrays: the same closed forms build the dense masks and the
    blocked gathers' masks. 'dense' gives the full causal set twice. causal=False drops
    j <= i (a broken variant)."""
    allowed = (j <= i) | (not causal)
    if pattern == "strided":
        a1 = (i - j <= stride) & (j - i <= stride)  # t = max(0, i - l), ..., i
        a2 = (i - j) % stride == 0  # every l-th position back
    elif pattern == "fixed":
        a1 = j // stride == i // stride  # own block
        a2 = j % stride >= stride - summary  # the last c positions of every block
    else:
        a1 = a2 = (j <= i) | True
    return a1 & allowed, a2 & allowed


def pattern_masks(pattern: str, n: int, stride: int, summary: int, causal: bool = True):
    """The two sets as numpy boolean (n, n) masks A1[i, j], A2[i, j] (for the tests)."""
    return pattern_sets(pattern, np.arange(n)[:, None], np.arange(n)[None, :], stride,
                        summary, causal)


def head_sets(cfg: Config, layer: int) -> tuple[int, ...]:
    """The set each head of a layer attends with: 0 = A^(1), 1 = A^(2), 2 = their union."""
    h = cfg.n_heads
    if cfg.mode == "interleave":  # Attend(X, A^(k mod p))
        return (layer % 2,) * h
    if cfg.mode == "union":  # Attend(X, A^(1) u A^(2))
        return (2,) * h
    return (0,) * (h // 2) + (1,) * (h - h // 2)  # multihead: half the heads per pattern


def head_masks(cfg: Config, sets, i, j, causal: bool = True):
    """(H, ...) masks of the heads' sets at query positions i and key positions j (jax
    arrays from iota, so nothing of size n^2 is a program constant); one broadcast mask
    (1, ...) when every head uses the same set."""
    a1, a2 = pattern_sets(cfg.pattern, i, j, cfg.stride, cfg.summary, causal)
    options = {0: lambda: a1, 1: lambda: a2, 2: lambda: a1 | a2}
    if len(set(sets)) == 1:
        return options[sets[0]]()[None]
    built = {s: options[s]() for s in set(sets)}
    return jnp.stack([built[s] for s in sets])


def layer_masks(cfg: Config, layer: int, causal: bool = True, n: int | None = None):
    """(H or 1, n, n) dense masks of one layer for the configured integration mode."""
    pos = jnp.arange(n or cfg.seq_len)
    return head_masks(cfg, head_sets(cfg, layer), pos[:, None], pos[None, :], causal)


def masked_softmax(logits, mask):
    """softmax over the keys inside the set, in float32. A query whose set is empty (fixed
    A^(2) before the first summary position) gets all-zero weights: a softmax over nothing
    but masked logits would be uniform over ALL positions, the future included."""
    logits = jnp.where(mask, logits.astype(jnp.float32), -1e9)
    return jax.nn.softmax(logits, -1) * mask.any(-1, keepdims=True)


def masked_attention(q, k, v, mask):
    """Dense masked reference: softmax(q k^T / sqrt(d_k) + M) v with M = -1e9 outside the
    set. q, k, v: (B, H, n, d_k); mask: (H or 1, n, n) bool. O(n^2) memory per head."""
    logits = jnp.einsum("bhid,bhjd->bhij", q, k).astype(jnp.float32) / np.sqrt(q.shape[-1])
    return masked_softmax(logits, mask).astype(v.dtype) @ v


def blocked_attention(q, k, v, cfg: Config, sets, causal: bool = True):
    """The same sets, gathered per block of l queries instead of masked out of n x n.
    q, k, v: (B, H, n, d_k) -> (B, H, n, d_k). Each query block (b) attends to
      (a) local keys: its own block (fixed) or the previous and its own block (strided:
          A^(1) reaches l back), causal inside;
      (b) summary keys, only where some head uses A^(2): strided, the same column of every
          earlier block (a reshape to (n/l, l) read along the block axis); fixed, the last
          c positions of every block, gathered once ((n/l) c keys). Keys already in (a)
          are masked out of (b), so every key of the set counts once.
    The two parts' logits share one softmax (concatenated keys). Memory per head:
    O(n (l + n/l)) strided, O(n (l + c n/l)) fixed, instead of O(n^2)."""
    B, H, n, dk = q.shape
    l, c = cfg.stride, cfg.summary
    nb = -(-n // l)  # blocks (n padded to nb * l with keys past the end: masked)
    pad = ((0, 0), (0, 0), (0, nb * l - n), (0, 0))
    qb, kb, vb = (jnp.pad(t, pad).reshape(B, H, nb, l, dk) for t in (q, k, v))  # (B,H,nb,l,dk)
    b = jnp.arange(nb)[:, None, None]  # query block
    i = b * l + jnp.arange(l)[:, None]  # (nb, l, 1) query positions

    def mask(j, extra=True):
        return head_masks(cfg, sets, i, j, causal) & (j >= 0) & (j < n) & extra

    # (a) local keys
    if cfg.pattern == "strided":
        def with_prev(t):  # (B, H, nb, 2l, dk): block b - 1 (zeros before 0), then b
            prev = jnp.pad(t, ((0, 0), (0, 0), (1, 0), (0, 0), (0, 0)))[:, :, :-1]
            return jnp.concatenate([prev, t], 3)
        k_loc, v_loc = with_prev(kb), with_prev(vb)
        j_loc = (b - 1) * l + jnp.arange(2 * l)  # (nb, 1, 2l)
    else:
        k_loc, v_loc, j_loc = kb, vb, b * l + jnp.arange(l)
    logits = [jnp.einsum("bhnqd,bhnkd->bhnqk", qb, k_loc)]  # (B, H, nb, l, |local|)
    masks = [mask(j_loc)]
    # (b) summary keys
    summary = any(s != 0 for s in sets)
    if summary and cfg.pattern == "strided":
        m = jnp.arange(nb)  # key block; column = the query's column r
        logits.append(jnp.einsum("bhnrd,bhmrd->bhnrm", qb, kb))  # (B, H, nb, l, nb)
        masks.append(mask(m * l + jnp.arange(l)[:, None], m < b - 1))
        v_sum = vb
    elif summary:
        k_sum, v_sum = (t[:, :, :, l - c:].reshape(B, H, nb * c, dk) for t in (kb, vb))
        j_sum = (jnp.arange(nb)[:, None] * l + jnp.arange(l - c, l)).reshape(-1)  # (nb c,)
        logits.append(jnp.einsum("bhnqd,bhkd->bhnqk", qb, k_sum))  # (B, H, nb, l, nb c)
        masks.append(mask(j_sum, j_sum // l < b))
    # one softmax over the concatenated keys (a single log-sum-exp)
    probs = masked_softmax(jnp.concatenate(logits, -1) / np.sqrt(dk),
                           jnp.concatenate(masks, -1)).astype(v.dtype)
    out = jnp.einsum("bhnqk,bhnkd->bhnqd", probs[..., :k_loc.shape[3]], v_loc)
    if summary and cfg.pattern == "strided":
        out = out + jnp.einsum("bhnrm,bhmrd->bhnrd", probs[..., k_loc.shape[3]:], v_sum)
    elif summary:
        out = out + jnp.einsum("bhnqk,bhkd->bhnqd", probs[..., k_loc.shape[3]:], v_sum)
    return out.reshape(B, H, nb * l, dk)[:, :, :n]


def attention(q, k, v, cfg: Config, layer: int, causal: bool = True):
    """One layer's attention, (B, H, n, d_k) -> (B, H, n, d_k), by cfg.attention."""
    if cfg.attention == "dense":  # the O(n^2) masked reference (the tests' oracle)
        return masked_attention(q, k, v, layer_masks(cfg, layer, causal, q.shape[2]))
    if cfg.pattern == "dense":  # full causal attention: the fused kernel (flash on GPU)
        out = jax.nn.dot_product_attention(*(t.transpose(0, 2, 1, 3) for t in (q, k, v)),
                                           is_causal=causal)
        return out.transpose(0, 2, 1, 3)
    return blocked_attention(q, k, v, cfg, head_sets(cfg, layer), causal)


class Block(nn.Module):
    """Pre-activation residual block: x + attn(LN(x)), then + ff(LN(.)) ([1] Sec. 5.2)."""

    cfg: Config
    layer: int
    causal: bool = True

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        B, n, d = x.shape
        # [1] Sec. 5.2: W_2 and W_p start 1/sqrt(2N) smaller than the other layers.
        small = nn.initializers.variance_scaling(1.0 / (2 * c.n_layers), "fan_in",
                                                 "truncated_normal")
        h = nn.LayerNorm()(x)
        dense = functools.partial(nn.Dense, dtype=jnp.dtype(c.dtype))  # float32 params
        qkv = dense(3 * d, use_bias=False, name="qkv")(h)
        q, k, v = (t.reshape(B, n, c.n_heads, -1).transpose(0, 2, 1, 3)  # (B, H, n, d_k)
                   for t in jnp.split(qkv, 3, -1))
        a = attention(q, k, v, c, self.layer, self.causal)  # (B, H, n, d_k)
        a = a.transpose(0, 2, 1, 3).reshape(B, n, d)  # (B, n, d)
        x = x + dense(d, kernel_init=small, name="proj")(a)  # W_p; float32 residual stream
        h = nn.gelu(dense(c.d_ff, name="ff_in")(nn.LayerNorm()(x)))
        return x + dense(d, kernel_init=small, name="ff_out")(h)  # W_2


class SparseTransformer(nn.Module):
    """tokens (B, n) -> logits (B, n, vocab); output i depends on tokens <= i only."""

    cfg: Config
    vocab: int
    causal: bool = True

    @nn.compact
    def __call__(self, tokens):
        c = self.cfg
        n = tokens.shape[1]
        pos = np.arange(n)
        x = nn.Embed(self.vocab, c.d_model)(tokens)
        # factorised position embedding: row floor(i / l) and column i mod l ([1] Sec. 5.3)
        x = x + nn.Embed(-(-c.seq_len // c.stride), c.d_model, name="pos_row")(pos // c.stride)
        x = x + nn.Embed(c.stride, c.d_model, name="pos_col")(pos % c.stride)
        block = nn.remat(Block) if c.checkpoint else Block  # [1] Sec. 5.4 recomputation
        for layer in range(c.n_layers):
            x = block(c, layer, self.causal, name=f"block_{layer}")(x)
        return nn.Dense(self.vocab, dtype=jnp.dtype(c.dtype))(nn.LayerNorm()(x))


# --- LOSS ---


def nll(params, model, tokens, targets):
    """Mean negative log-likelihood in nats per dimension (pixel or byte)."""
    logits = model.apply(params, tokens).astype(jnp.float32)  # the loss in float32
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


# --- UPDATE ---


@struct.dataclass
class State:
    params: Any
    opt_state: Any
    key: jax.Array
    step: jax.Array
    train_ids: jax.Array
    """the training set as uint8 (bytes or pixel levels): an input of the compiled update,
    not a constant baked into it (the paper preset's stdlib bytes: ~11 MB per seed)"""


def make_model(cfg: Config) -> SparseTransformer:
    return SparseTransformer(cfg, dataset(cfg.dataset, cfg.max_chars, cfg.data_dir)[2])


def optimizer(cfg: Config):
    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps,
                                               max(cfg.total_steps, cfg.warmup_steps + 1))
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), optax.adam(sched))


def init(key, cfg: Config) -> State:
    k_params, key = jax.random.split(key)
    params = make_model(cfg).init(k_params, jnp.zeros((1, cfg.seq_len), jnp.int32))
    train_ids = jnp.asarray(dataset(cfg.dataset, cfg.max_chars, cfg.data_dir)[0], jnp.uint8)
    return State(params, optimizer(cfg).init(params), key, jnp.zeros((), jnp.int32), train_ids)


def update(state: State, cfg: Config):
    key, k_data = jax.random.split(state.key)
    tokens, targets = batch(k_data, cfg, state.train_ids)
    loss, grads = jax.value_and_grad(nll)(state.params, make_model(cfg), tokens, targets)
    upd, opt_state = optimizer(cfg).update(grads, state.opt_state, state.params)
    metrics = {"losses/loss": loss, "charts/bits_per_dim": data.bits(loss),
               "charts/grad_norm": optax.tree.norm(grads)}
    new = State(optax.apply_updates(state.params, upd), opt_state, key, state.step + 1,
                state.train_ids)
    return new, metrics


def val_set(cfg: Config):
    """Digits: every held-out image; text: fixed, evenly spaced windows."""
    val = dataset(cfg.dataset, cfg.max_chars, cfg.data_dir)[1]
    if cfg.dataset == "digits":
        val = jnp.asarray(val)
        return jnp.concatenate([jnp.full((val.shape[0], 1), BOS), val[:, :-1]], 1), val
    starts = np.linspace(0, val.shape[0] - cfg.seq_len - 1, cfg.eval_windows).astype(np.int32)
    w = jnp.asarray(np.stack([val[s:s + cfg.seq_len + 1] for s in starts]))
    return w[:, :-1], w[:, 1:]


def evaluate(state: State, cfg: Config):
    tokens, targets = val_set(cfg)
    model = make_model(cfg)
    chunk = cfg.batch_size
    pad = -tokens.shape[0] % chunk  # evaluate in batches of batch_size (padded, masked)
    tok = jnp.pad(tokens, ((0, pad), (0, 0))).reshape(-1, chunk, tokens.shape[1])
    tgt = jnp.pad(targets, ((0, pad), (0, 0))).reshape(-1, chunk, tokens.shape[1])
    valid = (jnp.arange(tok.shape[0] * chunk) < tokens.shape[0]).reshape(-1, chunk)

    def one(total, xs):
        t, y, m = xs
        logits = model.apply(state.params, t).astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return total + (ce.mean(-1) * m).sum(), None

    loss = jax.lax.scan(one, 0.0, (tok, tgt, valid))[0] / tokens.shape[0]
    return {"val_loss": loss, "val_bits_per_dim": data.bits(loss)}


# --- MAIN ---


def main(argv=None):
    return run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                    doc=__doc__, summary_keys=["val_loss", "val_bits_per_dim",
                                               "losses/loss", "charts/bits_per_dim"])


if __name__ == "__main__":
    main()
