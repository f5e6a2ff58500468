"""Transformer-XL: segment-level recurrence with relative positional attention.

[1] Z. Dai, Z. Yang, Y. Yang, J. Carbonell, Q. V. Le, R. Salakhutdinov. "Transformer-XL:
    Attentive Language Models Beyond a Fixed-Length Context." ACL 2019, arXiv:1901.02860.
    Reference code: kimiyoung/transformer-xl (pytorch/mem_transformer.py).

A vanilla Transformer LM sees one fixed window at a time. Transformer-XL reads a long text
as B parallel streams, one segment of L tokens per update, and keeps, for every layer n,
the layer's input on the previous segment(s) as a memory of M positions that the current
segment attends to, without back-propagating into it:

    h~^{n-1}_{tau+1} = [SG(m^{n-1}_tau) o h^{n-1}_{tau+1}]       (concat along length) [1] Sec. 3.2
    q = h^{n-1}_{tau+1} W_q,  k = h~ W_{k,E},  v = h~ W_v
    m^{n-1}_{tau+1} = last M positions of [m^{n-1}_tau o h^{n-1}_{tau+1}]

Absolute positions cannot tell the memory from the segment, so the score of query i and
key j uses the distance i - j, a sinusoid r_{i-j} and two learnt vectors u, v:

    a_ij = q_i^T k_j  + q_i^T W_{k,R} r_{i-j}  + u^T k_j  + v^T W_{k,R} r_{i-j}      [1] Sec. 3.3
         =   (a) content   (b) content-position  (c) global content  (d) global position
    A_ij = softmax_j((a_ij) / sqrt(d_head)) over j in [mems; segment] with j <= M + i
    r_d  = [sin(d w_k), cos(d w_k)],  w_k = 10000^(-2k/d_model)

(a)+(c) = (q_i + u)^T k_j and (b)+(d) = (q_i + v)^T W_{k,R} r_{M+i-j} are two matrix
products; the second is computed for every (i, distance) pair and then moved to the
(i, j) layout by the "relative shift" (pad one column, reshape, drop a row) of [1] App. B.
Each layer is post-LayerNorm: h = LN(h + Attn(h)); h = LN(h + FFN(h)).

Evaluation reads the validation split as contiguous streams with a longer memory
(`eval_mem_len`) than training, which the relative encoding allows ([1] Sec. 3.3).

Reproduce (CPU demo, pydoc reference manual, char-level, 2 layers of d=64, L=M=32):
    python transformers/transformer_xl.py --preset quick
    -> measured: val 2.22 bits/char (1.54 nats) after 800 updates (410k tokens), evaluated
       with a 96-token memory; 2.32 bits/char with --mem-len 0 --eval-mem-len 0 (the
       add-0.1 bigram: 3.3 bits/char). ~12k tokens/s, 27 s compile + 35 s loop on a
       shared 2-core CPU (load ~25). The same trained model evaluated with memory 0 / 32 /
       96 / 192: 2.36 / 2.216 / 2.221 / 2.237 bits/char: at this size and training length
       a memory longer than in training does not help yet ([1] gains from it at scale).
Paper setting (GPU; 12 layers, d=512; the preset keeps the byte-level stdlib sources, so
it traces on CPU):
    python transformers/transformer_xl.py --preset paper
  on [1]'s corpora, downloaded by hand into DIR (common.data.REAL_CORPORA; nothing is fetched):
    python transformers/transformer_xl.py --preset paper --corpus enwik8 --data-dir DIR
    python transformers/transformer_xl.py --preset paper --corpus text8 --data-dir DIR
    python transformers/transformer_xl.py --preset paper --corpus wikitext-103 --data-dir DIR \
        --no-byte-level --val-fraction 0.0045
  enwik8 / text8 (90M / 5M / 5M): the held-out val_fraction 0.1 is the official valid + test
  text. WikiText-103 joins wiki.{train,valid,test}.tokens: valid + test are 463k of its
  103.7M tokens, so val_fraction ~0.0045 holds out about them (the exact value is their
  share of the files' characters).
[1] Table 2: 1.06 bits/char on enwik8 with the 12-layer model (0.99 with 24 layers).

Differences from the paper:
- Data: by default the Python standard library's sources (bytes) or pydoc's reference
  manual (chars); enwik8/text8/WikiText-103 only with --data-dir (above), held out as valid
  + test together (the paper reports test). WikiText-103 is modelled as characters (or
  bytes), not [1]'s 267k-word vocabulary, so its numbers are bits/char, not word
  perplexity; 'copy' is a synthetic
  stream whose second half of every segment repeats the first half of the previous one.
- No adaptive softmax/embedding (a byte or char vocabulary does not need one); the output
  layer is tied to the embedding, as in [1]'s code. No `same_length` or `clamp_len`
  evaluation tricks; the embedding is not multiplied by sqrt(d_model).
- u and v are shared by all layers as in [1]'s code by default; `untie_r` gives each layer
  its own (as XLNet does).
- The memory keeps a count of valid slots: the first segment of a stream attends to no
  memory, like the reference code's empty memory, but with a fixed array shape for XLA.
- Cosine learning-rate decay to 0 with Adam and gradient clipping at 0.25, as the reference
  enwik8 script; no mixed precision, no multi-GPU data parallelism.
- Initialisation: flax's defaults (dense kernels lecun normal, std 1/sqrt(fan_in); the
  embedding, tied to the output, normal with std 1/sqrt(d_model); LayerNorm scale 1), not
  [1]'s code's (pytorch/train.py weights_init: every Linear and Embedding weight normal(0,
  0.02), LayerNorm scale normal(1, 0.02), adaptive-embedding projections normal(0, 0.01)).
  Only u and v use [1]'s normal(0, 0.02). [1]'s small embedding is paired with its
  sqrt(d_model) embedding scale, which this file also leaves out (above).
"""

import functools
import math
from dataclasses import dataclass

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
    """Transformer-XL char/byte LM; defaults are [1]'s 12-layer enwik8 model."""

    corpus: str = "stdlib"
    """text: 'pydoc' (reference manual), 'stdlib' (Python sources), 'this', 'copy', or a real
    corpus of common.data.REAL_CORPORA read from data_dir ([1]: enwik8, text8, wikitext-103)"""
    data_dir: str | None = None
    """folder of a real corpus when `corpus` names one: common.data.REAL_CORPORA"""
    byte_level: bool = True
    """model UTF-8 bytes (256 symbols, like enwik8) instead of the text's characters"""
    max_chars: int = 0
    """truncate the corpus to this many characters (0: all of it)"""
    copy_vocab: int = 16
    """'copy' corpus: number of distinct random tokens"""
    copy_chars: int = 200_000
    """'copy' corpus: length of the synthetic stream"""
    n_layer: int = 12
    """number of layers"""
    d_model: int = 512
    """model width"""
    n_head: int = 8
    """attention heads"""
    d_head: int = 64
    """width of each head"""
    d_inner: int = 2048
    """hidden width of the position-wise feed-forward network"""
    untie_r: bool = False
    """a separate u, v per layer (XLNet) instead of one pair shared by all layers ([1])"""
    dropout: float = 0.1
    """dropout on embeddings, positional sinusoids, attention output and feed-forward"""
    dropatt: float = 0.0
    """dropout on the attention probabilities"""
    tgt_len: int = 512
    """segment length L: tokens predicted per stream per update"""
    mem_len: int = 512
    """memory length M during training (0: no recurrence, a vanilla segment LM)"""
    eval_tgt_len: int = 128
    """segment length at evaluation"""
    eval_mem_len: int = 2100
    """memory length at evaluation (may exceed mem_len: relative positions generalise)"""
    batch_size: int = 22
    """parallel streams B"""
    lr: float = 2.5e-4
    """peak Adam learning rate"""
    warmup_steps: int = 0
    """linear warm-up updates before the cosine decay"""
    max_grad_norm: float = 0.25
    """global gradient-norm clip"""
    total_updates: int = 400_000
    """optimiser updates (the cosine decays to 0 at the last one)"""
    val_fraction: float = 0.1
    """last fraction of the corpus held out for evaluation"""
    eval_batch: int = 4
    """parallel validation streams"""
    eval_segments: int = 64
    """validation segments per stream (fewer if the split is too short)"""

    @property
    def num_updates(self) -> int:
        return self.total_updates

    @property
    def steps_per_update(self) -> int:
        return self.batch_size * self.tgt_len  # tokens per update

    def validate(self):
        for name in (
            "n_layer",
            "d_model",
            "n_head",
            "d_head",
            "d_inner",
            "tgt_len",
            "eval_tgt_len",
            "batch_size",
            "total_updates",
            "eval_batch",
            "eval_segments",
            "copy_vocab",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("mem_len", "eval_mem_len", "warmup_steps", "max_chars"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.corpus not in ("pydoc", "stdlib", "this", "copy", *data.REAL_CORPORA):
            raise ValueError(f"corpus must be pydoc, stdlib, this, copy or one of "
                             f"{', '.join(data.REAL_CORPORA)}, got {self.corpus!r}")
        if self.corpus in data.REAL_CORPORA and self.data_dir is None:
            data.text_corpus(self.corpus)  # text_corpus's ValueError: pass data_dir
        if self.d_model % 2:
            raise ValueError(f"d_model must be even (sin/cos pairs), got {self.d_model}")
        for name in ("dropout", "dropatt"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.corpus == "copy" and (self.tgt_len % 2 or self.eval_tgt_len != self.tgt_len):
            raise ValueError(
                f"corpus='copy' needs an even tgt_len (got {self.tgt_len}) and "
                f"eval_tgt_len == tgt_len (got {self.eval_tgt_len})"
            )
        if self.corpus == "copy" and self.copy_chars < 4 * self.tgt_len * self.batch_size:
            raise ValueError(
                f"copy_chars={self.copy_chars} must be >= 4 * tgt_len * "
                f"batch_size = {4 * self.tgt_len * self.batch_size}"
            )


PRESETS = {
    "quick": dict(
        corpus="pydoc",
        byte_level=False,
        n_layer=2,
        d_model=64,
        n_head=4,
        d_head=16,
        d_inner=256,
        dropout=0.0,
        tgt_len=32,
        mem_len=32,
        eval_tgt_len=32,
        eval_mem_len=96,
        batch_size=16,
        lr=2e-3,
        warmup_steps=50,
        total_updates=800,
        eval_batch=8,
        eval_segments=48,
    ),
    "paper": dict(),
}


# --- DATA ---


@functools.cache
def load_corpus(
    corpus: str,
    byte_level: bool,
    max_chars: int,
    val_fraction: float,
    tgt_len: int,
    copy_vocab: int,
    copy_chars: int,
    data_dir: str | None = None,
):
    """(train ids, val ids, vocab size); the ids as numpy uint8 (uint16 above 256 symbols):
    `init` puts them in the State, so they enter the compiled chunks as an input, not as a
    constant of each program; stream_segment casts to int32 after the gather. The 'copy'
    stream is random tokens, except that the second half of every segment (t % L >= L/2)
    repeats the first half of the previous segment: x_t = x_{t - 3L/2} (segments start at
    multiples of L). A real corpus (common.data.REAL_CORPORA) is read from `data_dir`."""
    if corpus != "copy":
        train, val, vocab = data.char_corpus(corpus, val_fraction, max_chars or None, byte_level,
                                             data_dir)
        return compact(train, len(vocab)), compact(val, len(vocab)), len(vocab)
    L = tgt_len
    x = np.random.default_rng(0).integers(0, copy_vocab, copy_chars).astype(np.int32)
    t = np.arange(2 * L, copy_chars)
    t = t[t % L >= L // 2]
    x[t] = x[t - 3 * L // 2]  # sources sit in first halves, never copies themselves
    cut = int(copy_chars * (1 - val_fraction)) // L * L
    return compact(x[:cut], copy_vocab), compact(x[cut:], copy_vocab), copy_vocab


def compact(ids, vocab: int):
    """ids in the narrowest unsigned type that holds `vocab` symbols."""
    return ids.astype(np.uint8 if vocab <= 256 else np.uint16 if vocab <= 65536 else np.int32)


def stream_segment(ids, seg, batch: int, length: int):
    """Segment `seg` (traced int) of `batch` contiguous streams that split `ids` evenly:
    inputs (B, L) and next-token targets (B, L)."""
    stream_len = ids.shape[0] // batch // length * length
    starts = jnp.arange(batch) * stream_len + seg * length
    w = jax.vmap(lambda s: jax.lax.dynamic_slice(ids, (s,), (length + 1,)))(starts)
    w = w.astype(jnp.int32)  # ids are stored uint8/uint16
    return w[:, :-1], w[:, 1:]


def num_segments(n_ids: int, batch: int, length: int) -> int:
    """Segments per stream such that every target stays inside the stream's ids."""
    return (n_ids // batch // length * length - 1) // length


# --- NETWORKS ---


def sinusoid(pos, d_model: int):
    """r_d = [sin(d w), cos(d w)] with w_k = 10000^(-2k/d_model); pos (K,) -> (K, d)."""
    inv_freq = 1.0 / 10000 ** (jnp.arange(0, d_model, 2.0) / d_model)
    x = pos[:, None] * inv_freq[None]
    return jnp.concatenate([jnp.sin(x), jnp.cos(x)], -1)


def rel_shift(x):
    """[1] App. B: x[..., i, c] holds the score of query i with r_{K-1-c} (K keys, Lq
    queries, the last query at distance 0 from the last key). Returns y[..., i, j] =
    x[..., i, j + Lq - 1 - i], the score with r_{M+i-j}, M = K - Lq; entries with j > M + i
    (the future) are junk and must be masked."""
    *lead, q, k = x.shape
    x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, 0), (1, 0)])  # (..., Lq, K+1)
    x = x.reshape(*lead, k + 1, q)
    return x[..., 1:, :].reshape(*lead, q, k)  # (..., Lq, K)


def causal_mem_mask(q_len: int, mem_len: int, mem_valid):
    """(Lq, M+Lq) bool: query i sees valid memory slots and segment keys j <= i."""
    j = jnp.arange(mem_len + q_len)[None]
    i = jnp.arange(q_len)[:, None]
    return (j <= mem_len + i) & (j >= mem_len - mem_valid)


class RelMultiHeadAttn(nn.Module):
    """Multi-head attention over [SG(mem); h] with the relative score a_ij of [1] Sec. 3.3."""

    n_head: int
    d_head: int
    d_model: int
    dropatt: float = 0.0

    @nn.compact
    def __call__(self, h, mem, r, mask, u, v, deterministic=True):
        # h (B, L, d), mem (B, M, d), r (K, d) = r_{K-1} .. r_0, mask (L, K), u/v (H, Dh)
        hd = (self.n_head, self.d_head)
        cat = jnp.concatenate([jax.lax.stop_gradient(mem), h], 1)  # h~ (B, K, d)
        q = nn.DenseGeneral(hd, use_bias=False, name="q")(h)  # (B, L, H, Dh)
        k = nn.DenseGeneral(hd, use_bias=False, name="k")(cat)  # W_{k,E}: (B, K, H, Dh)
        val = nn.DenseGeneral(hd, use_bias=False, name="v")(cat)  # (B, K, H, Dh)
        kr = nn.DenseGeneral(hd, use_bias=False, name="r")(r)  # W_{k,R} r: (K, H, Dh)
        ac = jnp.einsum("bihd,bjhd->bhij", q + u, k)  # terms (a) + (c)
        bd = rel_shift(jnp.einsum("bihd,jhd->bhij", q + v, kr))  # terms (b) + (d)
        score = (ac + bd) / math.sqrt(self.d_head)  # (B, H, L, K)
        score = jnp.where(mask, score, -1e30)
        p = nn.Dropout(self.dropatt)(jax.nn.softmax(score, -1), deterministic)
        out = jnp.einsum("bhij,bjhd->bihd", p, val)  # (B, L, H, Dh)
        return nn.DenseGeneral(self.d_model, axis=(-2, -1), use_bias=False, name="o")(out)


class XLLayer(nn.Module):
    """Post-LN block: h = LN(h + Attn(h)); h = LN(h + FFN(h))."""

    n_head: int
    d_head: int
    d_model: int
    d_inner: int
    dropout: float = 0.0
    dropatt: float = 0.0

    @nn.compact
    def __call__(self, h, mem, r, mask, u, v, deterministic=True):
        drop = lambda x: nn.Dropout(self.dropout)(x, deterministic)
        a = RelMultiHeadAttn(self.n_head, self.d_head, self.d_model, self.dropatt, name="attn")(
            h, mem, r, mask, u, v, deterministic
        )
        h = nn.LayerNorm(epsilon=1e-5, name="ln_attn")(h + drop(a))
        f = nn.Dense(self.d_model, name="ff2")(drop(nn.relu(nn.Dense(self.d_inner, name="ff1")(h))))
        return nn.LayerNorm(epsilon=1e-5, name="ln_ff")(h + drop(f))


class TransformerXL(nn.Module):
    """tokens (B, L), mems (n_layer, B, M, d), mem_valid (valid trailing memory slots) ->
    logits (B, L, V), each layer's input (n_layer, B, L, d) for the next memory, and the
    last hidden state (B, L, d). `mask` (L, M+L) overrides the causal memory mask."""

    vocab: int
    n_layer: int
    d_model: int
    n_head: int
    d_head: int
    d_inner: int
    untie_r: bool = False
    dropout: float = 0.0
    dropatt: float = 0.0

    @nn.compact
    def __call__(self, tokens, mems, mem_valid, mask=None, deterministic=True):
        L, M = tokens.shape[1], mems.shape[2]
        embed = nn.Embed(self.vocab, self.d_model, name="embed")
        h = nn.Dropout(self.dropout)(embed(tokens), deterministic)  # (B, L, d)
        r = sinusoid(jnp.arange(M + L - 1, -1, -1.0), self.d_model)  # r_{K-1} .. r_0
        r = nn.Dropout(self.dropout)(r, deterministic)
        mask = causal_mem_mask(L, M, mem_valid) if mask is None else mask
        init = nn.initializers.normal(0.02)
        uv_shape = (self.n_head, self.d_head)
        if not self.untie_r:
            u, v = self.param("u", init, uv_shape), self.param("v", init, uv_shape)
        inputs = []
        for n in range(self.n_layer):
            inputs.append(h)  # m^{n-1}: memory stores each layer's input
            if self.untie_r:
                u = self.param(f"u_{n}", init, uv_shape)
                v = self.param(f"v_{n}", init, uv_shape)
            h = XLLayer(
                self.n_head,
                self.d_head,
                self.d_model,
                self.d_inner,
                self.dropout,
                self.dropatt,
                name=f"layer_{n}",
            )(h, mems[n], r, mask, u, v, deterministic)
        h = nn.Dropout(self.dropout)(h, deterministic)
        logits = embed.attend(h) + self.param("out_bias", nn.initializers.zeros, (self.vocab,))
        return logits, jnp.stack(inputs), h


def make_model(cfg: Config, vocab: int) -> TransformerXL:
    return TransformerXL(
        vocab,
        cfg.n_layer,
        cfg.d_model,
        cfg.n_head,
        cfg.d_head,
        cfg.d_inner,
        cfg.untie_r,
        cfg.dropout,
        cfg.dropatt,
    )


def next_mems(mems, inputs, mem_valid):
    """m_{tau+1} = last M positions of [m_tau o h_{tau+1}], per layer (no gradient)."""
    M, L = mems.shape[2], inputs.shape[2]
    new = jnp.concatenate([mems, inputs], 2)[:, :, L:]  # (n_layer, B, M, d)
    return jax.lax.stop_gradient(new), jnp.minimum(mem_valid + L, M)


# --- LOSS ---


def lm_loss(logits, targets):
    """Mean next-token negative log-likelihood in nats (bits/char = nats / ln 2)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def copy_accuracy(logits, targets):
    """'copy' corpus: accuracy on the copied tokens (targets L/2-1 .. L-2 of a segment)."""
    L = targets.shape[1]
    sl = slice(L // 2 - 1, L - 1)
    return (logits[:, sl].argmax(-1) == targets[:, sl]).mean()


# --- UPDATE ---


@struct.dataclass
class State:
    params: dict
    opt_state: optax.OptState
    key: jax.Array
    step: jax.Array
    start: jax.Array
    """segment index at which this seed's streams begin"""
    mems: jax.Array
    """(n_layer, B, max(M, 1), d): each layer's input on the last M positions of every
    stream"""
    mem_valid: jax.Array
    """how many trailing memory slots hold real context (0 at a stream's start)"""
    use_memory: jax.Array
    """1, traced: 0 masks the memory out of every read (training and evaluate), so one
    program can also run the model without memory"""
    train_ids: jax.Array
    """(T,) uint8 training ids (load_corpus): an input of the compiled chunks, not a
    constant; one copy per seed (pydoc 0.4 MB, stdlib 11 MB)"""
    val_ids: jax.Array
    """(T_val,) uint8 validation ids, read by evaluate"""


def _data(cfg: Config):
    return load_corpus(
        cfg.corpus,
        cfg.byte_level,
        cfg.max_chars,
        cfg.val_fraction,
        cfg.tgt_len,
        cfg.copy_vocab,
        cfg.copy_chars,
        cfg.data_dir,
    )


def _optimizer(cfg: Config):
    sched = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, cfg.warmup_steps, max(cfg.total_updates, cfg.warmup_steps + 1)
    )
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), optax.adam(sched))


def init(key, cfg: Config) -> State:
    train_ids, val_ids, vocab = _data(cfg)
    k_param, k_start, key = jax.random.split(key, 3)
    model = make_model(cfg, vocab)
    # orbax cannot save zero-size arrays: with mem_len = 0 the state keeps one unused slot
    mems = jnp.zeros((cfg.n_layer, cfg.batch_size, max(cfg.mem_len, 1), cfg.d_model))
    tokens = jnp.zeros((cfg.batch_size, cfg.tgt_len), jnp.int32)
    params = model.init(k_param, tokens, mems[:, :, : cfg.mem_len], 0)["params"]
    n_seg = num_segments(len(train_ids), cfg.batch_size, cfg.tgt_len)
    start = jax.random.randint(k_start, (), 0, n_seg)
    return State(
        params,
        _optimizer(cfg).init(params),
        key,
        jnp.array(0, jnp.int32),
        start,
        mems,
        jnp.array(0, jnp.int32),
        jnp.array(1, jnp.int32),
        jnp.asarray(train_ids),
        jnp.asarray(val_ids),
    )


def update(state: State, cfg: Config):
    _, _, vocab = _data(cfg)
    ids = state.train_ids
    model = make_model(cfg, vocab)
    n_seg = num_segments(ids.shape[0], cfg.batch_size, cfg.tgt_len)
    seg = (state.start + state.step) % n_seg
    inputs, targets = stream_segment(ids, seg, cfg.batch_size, cfg.tgt_len)
    mem_valid = jnp.where(seg == 0, 0, state.mem_valid)  # a stream restarts: forget
    key, k_drop = jax.random.split(state.key)
    mems = state.mems[:, :, : cfg.mem_len]  # (n_layer, B, M, d)

    def loss_fn(params):
        logits, layer_inputs, _ = model.apply(
            {"params": params},
            inputs,
            mems,
            mem_valid * state.use_memory,
            deterministic=False,
            rngs={"dropout": k_drop},
        )
        return lm_loss(logits, targets), (logits, layer_inputs)

    (loss, (logits, layer_inputs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    upd, opt_state = _optimizer(cfg).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, upd)
    mems, mem_valid = next_mems(mems, layer_inputs, mem_valid)
    if cfg.mem_len == 0:
        mems = state.mems  # the unused slot
    metrics = {
        "losses/loss": loss,
        "charts/bits_per_char": data.bits(loss),
        "charts/grad_norm": optax.tree.norm(grads),
    }
    if cfg.corpus == "copy":
        metrics["charts/copy_accuracy"] = copy_accuracy(logits, targets)
    return state.replace(
        params=params,
        opt_state=opt_state,
        key=key,
        step=state.step + 1,
        mems=mems,
        mem_valid=mem_valid,
    ), metrics


def evaluate(state: State, cfg: Config):
    """Validation NLL over `eval_segments` consecutive segments of `eval_batch` streams,
    carrying a memory of `eval_mem_len` positions (empty at the start)."""
    _, _, vocab = _data(cfg)
    ids = state.val_ids
    B, L = cfg.eval_batch, cfg.eval_tgt_len
    n_seg = min(cfg.eval_segments, num_segments(ids.shape[0], B, L))
    model = make_model(cfg, vocab)

    def step(carry, seg):
        mems, valid = carry
        inputs, targets = stream_segment(ids, seg, B, L)
        logits, layer_inputs, _ = model.apply(
            {"params": state.params}, inputs, mems, valid * state.use_memory
        )
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        return next_mems(mems, layer_inputs, valid), (nll, copy_accuracy(logits, targets))

    mems = jnp.zeros((cfg.n_layer, B, cfg.eval_mem_len, cfg.d_model))
    _, (nll, acc) = jax.lax.scan(step, (mems, jnp.array(0, jnp.int32)), jnp.arange(n_seg))
    out = {"val_loss": nll.mean(), "val_bits_per_char": data.bits(nll.mean())}
    if cfg.corpus == "copy":
        out["val_copy_accuracy"] = acc[1:].mean()  # segment 0 has no previous segment
    return out


# --- MAIN ---


def main(argv=None):
    return run.main(
        Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv, doc=__doc__
    )


if __name__ == "__main__":
    main()
