"""Adaptive attention span: each head learns how far back it looks.

[1] S. Sukhbaatar, E. Grave, P. Bojanowski, A. Joulin. "Adaptive Attention Span in
    Transformers." ACL 2019, arXiv:1905.07799. Reference code: facebookresearch/adaptive-span.
[2] Z. Dai et al. "Transformer-XL." ACL 2019, arXiv:1901.02860 (the cached memory).

A character LM attends to at most S past tokens. Each head has a learnable span z in
[0, S] and multiplies its attention weights by a soft mask that is 1 up to distance z,
falls linearly to 0 over a ramp of R tokens, and is 0 beyond, then renormalises:

    e_ij = q_i^T (k_j + p_{i-j}) / sqrt(d_head)   (p: learned per-distance key embedding)
    m_z(x) = min(max((R + z - x) / R, 0), 1),  x = i - j                    [1] Sec. 3.1
    a_ij = m_z(i-j) exp(e_ij) / sum_{r=i-S}^{i-1} m_z(i-r) exp(e_ir)
    y_i  = sum_j a_ij v_j,   j = i-S .. i-1 (the current token enters via the residual)
    loss = NLL + lambda * sum over layers of (mean over the layer's H heads of z)  [1] Sec. 3.1

The L1 term lets a head keep a long span only if the likelihood pays for it; z gets a
gradient only through the distances on its ramp, (z, z + R). The dynamic variant
([1] Sec. 3.2) predicts the span of every query from its input: z_t = S sigmoid(v^T x_t + b).
As in [1], every layer keeps the previous S hidden states of each stream as a memory
that the segment attends to without gradient (Transformer-XL [2] recurrence, copied from
transformer_xl.py so this file stands alone).

Reproduce (CPU demo, pydoc reference manual, char-level, 2 layers of d=64, S=64, L=32):
    python transformers/adaptive_span.py --preset quick
    -> measured: val 2.43 bits/char (1.68 nats) after 800 updates (410k tokens); the 8 heads'
       mean span is 2.9 tokens and the longest 22 of S = 64 (with lambda 8e-4: every span
       ~0 and 2.55 bits/char). ~29k tokens/s, 36 s compile + 16 s loop on a shared 2-core
       CPU (Transformer-XL's quick preset, same size: 2.22 bits/char).
Paper setting (GPU; 12 layers, S=8192; the preset keeps the byte-level stdlib sources, so
it traces on CPU):
    python transformers/adaptive_span.py --preset paper
  on [1]'s corpora, downloaded by hand into DIR (common.data.REAL_CORPORA; nothing is fetched):
    python transformers/adaptive_span.py --preset paper --corpus enwik8 --data-dir DIR
    python transformers/adaptive_span.py --preset paper --corpus text8 --data-dir DIR
  DIR holds the file enwik8 or text8 (90M / 5M / 5M): the held-out val_fraction 0.1 is then
  the official valid + test text.
[1] Table 1: 1.02 bits/char on enwik8 with 12 layers (39M parameters), 0.98 with 24 layers;
the average span is a few hundred tokens although S = 8192.

Differences from the paper:
- Data: by default the Python standard library's sources (bytes) or pydoc's reference
  manual (chars); enwik8/text8 only with --data-dir (above), held out as valid + test
  together (the paper reports test); 'local' is a synthetic stream where only short context helps.
- The memory always holds S positions; [1]'s code trims keys (and its cache) to the largest
  current span + R to save compute. The result is the same; only the cost differs.
- The mask is the paper's m_z(x) at the key's distance x = i - j >= 1. [1]'s code builds it
  from a template that is 0 at distance 1, which gives m_z(x - 1): its spans reach one
  token further than the paper's z (z = 0 keeps distance 1 whole there, 3/4 of it at R = 4
  here). The renormalisation follows [1]'s code: softmax, times m_z, divided by the
  sum + 1e-8. A row with no visible key (the first token of a stream) gives y = 0.
- The dynamic span's initialisation is not given in [1] (its code has no dynamic variant):
  the sigmoid's bias starts at logit(clip(span_init, 0.1, 0.9)), so with the default
  span_init = 0 the dynamic spans start at z = 0.1 S, where the sigmoid still has slope
  0.09 (the static span starts at z = span_init * S, as [1]'s code).
- Initialisation: flax's defaults (dense kernels lecun normal, std 1/sqrt(fan_in), biases
  0; token embedding normal with std 1/sqrt(d_model)), not [1]'s code's, which keeps
  PyTorch's defaults (Linear weights and biases uniform in +-1/sqrt(fan_in), i.e. std
  1/sqrt(3 fan_in); embedding normal(0, 1)). The key position embeddings p_x are normal(0,
  1) as there. ([1]'s code has no normal(0, 0.02) init; that is Transformer-XL's.)
- z = S * s with s in [0, 1] clipped after every step, as in [1]'s code; Adagrad
  (lr 0.07, linear warm-up, clip 0.03) as in [1]; optax's Adagrad starts its accumulator
  at 0.1, torch's at 0.
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
    """Adaptive-span char/byte LM; defaults are [1]'s 12-layer enwik8 model."""

    corpus: str = "stdlib"
    """text: 'pydoc' (reference manual), 'stdlib' (Python sources), 'this', 'local', or a real
    corpus of common.data.REAL_CORPORA read from data_dir ([1]: enwik8, text8)"""
    data_dir: str | None = None
    """folder of a real corpus when `corpus` names one: common.data.REAL_CORPORA"""
    byte_level: bool = True
    """model UTF-8 bytes (256 symbols, like enwik8) instead of the text's characters"""
    max_chars: int = 0
    """truncate the corpus to this many characters (0: all of it)"""
    local_vocab: int = 16
    """'local' corpus: number of distinct tokens"""
    local_chars: int = 100_000
    """'local' corpus: length of the synthetic stream"""
    n_layer: int = 12
    """number of layers"""
    d_model: int = 512
    """model width"""
    n_head: int = 8
    """attention heads (d_head = d_model / n_head)"""
    d_inner: int = 2048
    """hidden width of the position-wise feed-forward network"""
    dropout: float = 0.3
    """dropout on attention weights and feed-forward"""
    attn_span: int = 8192
    """maximum span S (= memory length per layer)"""
    adapt_span: bool = True
    """learn the soft span mask (False: plain attention over the S-window)"""
    dynamic_span: bool = False
    """predict z per query, z_t = S sigmoid(v^T x_t + b) ([1] Sec. 3.2)"""
    span_ramp: int = 32
    """ramp length R of the soft mask"""
    span_init: float = 0.0
    """initial z / S (dynamic span: its sigmoid starts at clip(span_init, 0.1, 0.9))"""
    span_loss: float = 5e-7
    """coefficient lambda of the L1 penalty on the spans"""
    tgt_len: int = 512
    """segment length L: tokens predicted per stream per update"""
    batch_size: int = 64
    """parallel streams B"""
    lr: float = 0.07
    """peak Adagrad learning rate"""
    warmup_steps: int = 32_000
    """linear warm-up updates (then constant, as [1])"""
    max_grad_norm: float = 0.03
    """global gradient-norm clip"""
    total_updates: int = 600_000
    """optimiser updates"""
    val_fraction: float = 0.1
    """last fraction of the corpus held out for evaluation"""
    eval_batch: int = 4
    """parallel validation streams"""
    eval_segments: int = 64
    """validation segments per stream (fewer if the split is too short)"""
    remat: bool = True
    """recompute each layer in the backward pass (jax.checkpoint): the scores of one layer
    are B H L (L + S) floats, 9 GB at the paper's sizes, and only one layer's live at once"""

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

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
            "d_inner",
            "attn_span",
            "span_ramp",
            "tgt_len",
            "batch_size",
            "total_updates",
            "eval_batch",
            "eval_segments",
            "local_vocab",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "max_chars", "span_loss"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.corpus not in ("pydoc", "stdlib", "this", "local", *data.REAL_CORPORA):
            raise ValueError(f"corpus must be pydoc, stdlib, this, local or one of "
                             f"{', '.join(data.REAL_CORPORA)}, got {self.corpus!r}")
        if self.corpus in data.REAL_CORPORA and self.data_dir is None:
            data.text_corpus(self.corpus)  # text_corpus's ValueError: pass data_dir
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        if not 0 <= self.span_init <= 1:
            raise ValueError(f"span_init must be in [0, 1], got {self.span_init}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


PRESETS = {
    "quick": dict(
        corpus="pydoc",
        byte_level=False,
        n_layer=2,
        d_model=64,
        n_head=4,
        d_inner=256,
        dropout=0.0,
        attn_span=64,
        span_ramp=8,
        span_loss=8e-5,
        tgt_len=32,
        batch_size=16,
        lr=0.1,
        warmup_steps=50,
        max_grad_norm=1.0,
        total_updates=800,
        eval_batch=8,
        eval_segments=48,
        remat=False,
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
    local_vocab: int,
    local_chars: int,
    data_dir: str | None = None,
):
    """(train ids, val ids, vocab size); the ids as numpy uint8 (uint16 above 256 symbols):
    `init` puts them in the State, so they enter the compiled chunks as an input, not as a
    constant of each program; stream_segment casts to int32 after the gather. The 'local'
    stream is random tokens in which x_t = x_{t-2} whenever t % 4 >= 2: only distance 1
    from the query (which predicts x_t from position t-1) helps, any longer span is
    useless. A real corpus (common.data.REAL_CORPORA) is read from `data_dir`."""
    if corpus != "local":
        train, val, vocab = data.char_corpus(corpus, val_fraction, max_chars or None, byte_level,
                                             data_dir)
        return compact(train, len(vocab)), compact(val, len(vocab)), len(vocab)
    x = np.random.default_rng(0).integers(0, local_vocab, local_chars).astype(np.int32)
    t = np.arange(local_chars)
    t = t[t % 4 >= 2]
    x[t] = x[t - 2]
    cut = int(local_chars * (1 - val_fraction)) // 4 * 4
    return compact(x[:cut], local_vocab), compact(x[cut:], local_vocab), local_vocab


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


def span_mask(x, z, ramp):
    """[1] Sec. 3.1: m_z(x) = min(max((R + z - x) / R, 0), 1), x = i - j (the paper's
    equation; [1]'s code gives m_z(x - 1), see the docstring)."""
    return jnp.clip((ramp + z - x) / ramp, 0.0, 1.0)


def rel_shift(x):
    """Transformer-XL's relative shift ([2] App. B): x[..., i, c] holds the score of query
    i with the embedding of distance K-1-c; returns y[..., i, j] = score at distance
    M + i - j, M = K - Lq. Entries with j > M + i are junk and must be masked."""
    *lead, q, k = x.shape
    x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, 0), (1, 0)])  # (..., Lq, K+1)
    x = x.reshape(*lead, k + 1, q)
    return x[..., 1:, :].reshape(*lead, q, k)  # (..., Lq, K)


def window_mask(q_len: int, mem_len: int, span: int, mem_valid):
    """(Lq, M+Lq) bool: query i sees keys at distance 1..S that are real context."""
    j = jnp.arange(mem_len + q_len)[None]
    dist = mem_len + jnp.arange(q_len)[:, None] - j
    return (dist >= 1) & (dist <= span) & (j >= mem_len - mem_valid)


def span_attention_weights(scores, window, dist, z, ramp, adapt: bool = True):
    """scores (B, H, L, K), window (L, K) bool, dist (L, K), z broadcastable to
    (B, H, L, 1). Softmax over the window; with `adapt`, times m_z(i - j), renormalised."""
    p = jax.nn.softmax(jnp.where(window, scores, -1e30), -1) * window  # empty rows -> 0
    if not adapt:
        return p
    p = p * span_mask(dist, z, ramp)  # Eq. (masked a_ij), numerator
    return p / (p.sum(-1, keepdims=True) + 1e-8)  # renormalise over the window


DYNAMIC_INIT_MIN = 0.1
"""The dynamic span's sigmoid starts at z/S in [0.1, 0.9]: at span_init = 0 a sigmoid would
start at its flat tail (slope sigma' = 1e-4 at logit(1e-4)) and the span would barely move;
[1]'s static z/S is the parameter itself, slope 1 from any start."""


class SpanAttention(nn.Module):
    """Multi-head attention over [SG(mem); h] with a learned soft span per head."""

    n_head: int
    d_model: int
    span: int
    ramp: float
    span_init: float
    adapt: bool = True
    dynamic: bool = False
    dropout: float = 0.0

    @nn.compact
    def __call__(self, h, mem, pos, window, deterministic=True):
        # h (B, L, d), mem (B, M, d), pos (K, Dh) key embedding by column, window (L, K)
        d_head = self.d_model // self.n_head
        hd = (self.n_head, d_head)
        cat = jnp.concatenate([jax.lax.stop_gradient(mem), h], 1)  # (B, K, d)
        q = nn.DenseGeneral(hd, use_bias=False, name="q")(h)  # (B, L, H, Dh)
        k = nn.DenseGeneral(hd, use_bias=False, name="k")(cat)  # (B, K, H, Dh)
        v = nn.DenseGeneral(hd, use_bias=False, name="v")(cat)  # (B, K, H, Dh)
        cont = jnp.einsum("bihd,bjhd->bhij", q, k)  # q_i^T k_j
        loc = rel_shift(jnp.einsum("bihd,jd->bhij", q, pos))  # q_i^T p_{i-j}
        scores = (cont + loc) / math.sqrt(d_head)  # (B, H, L, K)
        L, K = window.shape
        dist = (K - L) + jnp.arange(L)[:, None] - jnp.arange(K)[None]  # x = i - j
        if self.dynamic:  # [1] Sec. 3.2: z_t = S sigmoid(v^T x_t + b), per head and query
            p0 = min(max(self.span_init, DYNAMIC_INIT_MIN), 1 - DYNAMIC_INIT_MIN)
            b0 = math.log(p0) - math.log(1 - p0)  # sigma(b0) = p0, slope p0 (1 - p0) >= 0.09
            s = jax.nn.sigmoid(
                nn.Dense(self.n_head, name="span_net", bias_init=nn.initializers.constant(b0))(h)
            )
            z = self.span * jnp.moveaxis(s, -1, 1)[..., None]  # (B, H, L, 1)
        else:
            s = self.param("span", nn.initializers.constant(self.span_init), (self.n_head,))
            z = self.span * s[:, None, None]  # (H, 1, 1)
        a = span_attention_weights(scores, window, dist, z, self.ramp, self.adapt)
        a = nn.Dropout(self.dropout)(a, deterministic)
        self.sow("intermediates", "z", z)
        out = jnp.einsum("bhij,bjhd->bihd", a, v)  # (B, L, H, Dh)
        return nn.DenseGeneral(self.d_model, axis=(-2, -1), use_bias=False, name="o")(out)


class SpanLayer(nn.Module):
    """Post-LN block as [1]'s code: h = LN(h + Attn(h)); h = LN(h + FFN(h))."""

    cfg: "Config"

    @nn.compact
    def __call__(self, h, mem, pos, window, deterministic=True):
        c = self.cfg
        a = SpanAttention(
            c.n_head,
            c.d_model,
            c.attn_span,
            float(c.span_ramp),
            c.span_init,
            c.adapt_span,
            c.dynamic_span,
            c.dropout,
            name="attn",
        )(h, mem, pos, window, deterministic)
        h = nn.LayerNorm(epsilon=1e-5, name="ln_attn")(h + a)
        f = nn.relu(nn.Dense(c.d_inner, name="ff1")(h))
        f = nn.Dense(c.d_model, name="ff2")(nn.Dropout(c.dropout)(f, deterministic))
        return nn.LayerNorm(epsilon=1e-5, name="ln_ff")(h + f)


class AdaptiveSpanLM(nn.Module):
    """tokens (B, L), mems (n_layer, B, S, d), mem_valid -> logits (B, L, V) and each
    layer's input (n_layer, B, L, d) for the next memory. `window` overrides the mask."""

    cfg: "Config"
    vocab: int

    @nn.compact
    def __call__(self, tokens, mems, mem_valid, window=None, deterministic=True):
        c = self.cfg
        L, M, S = tokens.shape[1], mems.shape[2], c.attn_span
        h = nn.Embed(self.vocab, c.d_model, name="embed")(tokens)  # (B, L, d)
        # p_x for distances x = 1..S, shared by all layers and heads as in [1]'s code
        p = self.param("key_pe", nn.initializers.normal(1.0), (S, c.d_head))
        col_dist = M + L - 1 - jnp.arange(M + L)  # column c of rel_shift's input
        pos = jnp.where(
            ((col_dist >= 1) & (col_dist <= S))[:, None], p[jnp.clip(col_dist - 1, 0, S - 1)], 0.0
        )  # (K, Dh)
        window = window_mask(L, M, S, mem_valid) if window is None else window
        Layer = nn.remat(SpanLayer, static_argnums=(5,)) if c.remat else SpanLayer
        inputs = []
        for n in range(c.n_layer):
            inputs.append(h)  # memory stores each layer's input, as Transformer-XL
            h = Layer(c, name=f"layer_{n}")(h, mems[n], pos, window, deterministic)
        return nn.Dense(self.vocab, name="out")(h), jnp.stack(inputs)


def next_mems(mems, inputs, mem_valid):
    """m_{tau+1} = last M positions of [m_tau o h_{tau+1}], per layer (no gradient)."""
    M, L = mems.shape[2], inputs.shape[2]
    new = jnp.concatenate([mems, inputs], 2)[:, :, L:]  # (n_layer, B, M, d)
    return jax.lax.stop_gradient(new), jnp.minimum(mem_valid + L, M)


# --- LOSS ---


def lm_loss(logits, targets):
    """Mean next-token negative log-likelihood in nats (bits/char = nats / ln 2)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def spans(zs):
    """The sown z of every layer, (H, 1, 1) or (B, H, L, 1) when dynamic -> (n_layer, H)
    mean span per head."""
    return jnp.stack([z.mean([a for a in range(z.ndim) if a != z.ndim - 3]) for z in zs])


def span_penalty(z_per_head, cfg: Config, span_loss=None):
    """[1] Sec. 3.1: lambda * sum over layers of the mean over the layer's heads of z (mean
    z_t when dynamic), as [1]'s code: get_loss = coeff * S * current_val.mean() per layer.
    lambda is cfg.span_loss, or `span_loss` (traced: State.span_loss) when given."""
    lam = cfg.span_loss if span_loss is None else span_loss
    return lam * z_per_head.mean(-1).sum()


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
    """(n_layer, B, S, d): each layer's input on the last S positions of every stream"""
    mem_valid: jax.Array
    """how many trailing memory slots hold real context (0 at a stream's start)"""
    span_loss: jax.Array
    """cfg.span_loss, traced: one program can train several lambdas (0: no penalty)"""
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
        cfg.local_vocab,
        cfg.local_chars,
        cfg.data_dir,
    )


def _optimizer(cfg: Config):
    sched = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), optax.adagrad(sched))


def _clip_spans(params):
    """Keep every static span fraction s = z / S in [0, 1] ([1]'s clamp_param)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.clip(x, 0, 1) if path[-1].key == "span" else x, params
    )


def init(key, cfg: Config) -> State:
    train_ids, val_ids, vocab = _data(cfg)
    k_param, k_start, key = jax.random.split(key, 3)
    mems = jnp.zeros((cfg.n_layer, cfg.batch_size, cfg.attn_span, cfg.d_model))
    tokens = jnp.zeros((cfg.batch_size, cfg.tgt_len), jnp.int32)
    params = AdaptiveSpanLM(cfg, vocab).init(k_param, tokens, mems, 0)["params"]
    start = jax.random.randint(
        k_start, (), 0, num_segments(len(train_ids), cfg.batch_size, cfg.tgt_len)
    )
    return State(
        params,
        _optimizer(cfg).init(params),
        key,
        jnp.array(0, jnp.int32),
        start,
        mems,
        jnp.array(0, jnp.int32),
        jnp.asarray(cfg.span_loss, jnp.float32),
        jnp.asarray(train_ids),
        jnp.asarray(val_ids),
    )


def update(state: State, cfg: Config):
    _, _, vocab = _data(cfg)
    model = AdaptiveSpanLM(cfg, vocab)
    n_ids = state.train_ids.shape[0]
    seg = (state.start + state.step) % num_segments(n_ids, cfg.batch_size, cfg.tgt_len)
    inputs, targets = stream_segment(state.train_ids, seg, cfg.batch_size, cfg.tgt_len)
    mem_valid = jnp.where(seg == 0, 0, state.mem_valid)  # a stream restarts: forget
    key, k_drop = jax.random.split(state.key)

    def loss_fn(params):
        (logits, layer_inputs), inter = model.apply(
            {"params": params},
            inputs,
            state.mems,
            mem_valid,
            deterministic=False,
            rngs={"dropout": k_drop},
            mutable=["intermediates"],
        )
        z = spans(jax.tree.leaves(inter["intermediates"]))  # (n_layer, H)
        nll = lm_loss(logits, targets)
        penalty = span_penalty(z, cfg, state.span_loss) if cfg.adapt_span else 0.0
        return nll + penalty, (nll, z, layer_inputs)

    (_, (nll, z, layer_inputs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    upd, opt_state = _optimizer(cfg).update(grads, state.opt_state, state.params)
    params = _clip_spans(optax.apply_updates(state.params, upd))
    mems, mem_valid = next_mems(state.mems, layer_inputs, mem_valid)
    metrics = {
        "losses/loss": nll,
        "charts/bits_per_char": data.bits(nll),
        "charts/mean_span": z.mean(),
        "charts/max_span": z.max(),
    }
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
    carrying the S-position memory (empty at the start), and the learned spans."""
    _, _, vocab = _data(cfg)
    ids = state.val_ids
    B, L = cfg.eval_batch, cfg.tgt_len
    n_seg = min(cfg.eval_segments, num_segments(ids.shape[0], B, L))
    model = AdaptiveSpanLM(cfg, vocab)

    def step(carry, seg):
        mems, valid = carry
        inputs, targets = stream_segment(ids, seg, B, L)
        (logits, layer_inputs), inter = model.apply(
            {"params": state.params}, inputs, mems, valid, mutable=["intermediates"]
        )
        z = spans(jax.tree.leaves(inter["intermediates"]))
        return next_mems(mems, layer_inputs, valid), (lm_loss(logits, targets), z)

    mems = jnp.zeros((cfg.n_layer, B, cfg.attn_span, cfg.d_model))
    _, (nll, z) = jax.lax.scan(step, (mems, jnp.array(0, jnp.int32)), jnp.arange(n_seg))
    return {
        "val_loss": nll.mean(),
        "val_bits_per_char": data.bits(nll.mean()),
        "val_mean_span": z.mean(),
        "val_max_span": z.mean(0).max(),
    }


# --- MAIN ---


def main(argv=None):
    return run.main(
        Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv, doc=__doc__
    )


if __name__ == "__main__":
    main()
