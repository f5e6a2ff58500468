"""Reformer: LSH attention, reversible residual layers and chunked feed-forward.

[1] N. Kitaev, L. Kaiser, A. Levskaya. "Reformer: The Efficient Transformer." ICLR 2020,
    arXiv:2001.04451. Reference code: google/trax (reformer), ported by HF transformers.
[2] A. N. Gomez, M. Ren, R. Urtasun, R. B. Grosse. "The Reversible Residual Network:
    Backpropagation Without Storing Activations." NIPS 2017, arXiv:1707.04585.
[3] L. Weng. "The Transformer Family" (2020), section "Locality-Sensitive Hashing".

A causal character LM whose blocks replace the three memory costs of a Transformer:

LSH attention ([1] Sec. 2). Queries and keys are shared (one projection qk), keys are
normalised, and each head hashes its vectors with a random rotation per round r:
    h(x) = argmax([x R_r ; -x R_r]),   R_r in R^{d_head x b/2}, b = n_buckets   [1] Sec. 2
    k_j = qk_j / ||qk_j||,  logits_ij = qk_i . k_j  (no 1/sqrt(d): keys have unit norm)
The n_hashes rounds are concatenated along the length, positions are sorted by (round,
bucket, position), the sorted sequence is cut into chunks of m and every chunk attends to
itself and to the previous chunk (which wraps into the previous round). Masks: a later
position (causal, -1e9) and one's own position (-1e5: shared QK makes q_i . k_i the
largest dot product, so a token attends to itself only when nothing else is allowed).
Per round the output o_r and its log-normaliser z_r = logsumexp(logits) are kept, and the
rounds are combined with their normalisers' weights:
    o_i = sum_r exp(z_{r,i} - logsumexp_r' z_{r',i}) o_{r,i}             [1] Eq. (4)-(6)

Reversible residual layers ([2], [1] Sec. 3) split the activations in two halves:
    Y1 = X1 + Attention(X2),   Y2 = X2 + FeedForward(Y1)
    X2 = Y2 - FeedForward(Y1), X1 = Y1 - Attention(X2)     (inverse, used in backprop)
so the backward pass (a jax.custom_vjp) recomputes each layer's input from its output and
stores nothing per layer. The input is duplicated [x; x] and the output halves are
concatenated before the final LayerNorm (as in trax/HF). Chunked feed-forward computes
FF over c sequence chunks one after another: Y2 = [X2^(i) + FF(Y1^(i))]_i ([1] Sec. 3).

Reproduce (CPU demo, pydoc reference-manual text, 2 shared cores):
    python transformers/reformer.py --preset quick
  measured: val 3.09 bits/char (2.14 nats/char) after 600 updates of 16 x 128 chars,
  ~7.7k chars/s, 4.8 min wall-clock on 2 CPU cores shared with ~25 other busy processes;
  on the same validation windows the add-0.1 bigram model scores 3.30 bits/char and the
  unigram 4.70. This 2-layer d=64 model is far from converged (dense attention in its
  place: the same loss at 250 updates, 2.23 vs 2.25 nats/char).
Ablations (flags): --attention full (dense shared-QK), --no-reversible (pre-LN residual
stack, ordinary backprop), --ff-chunks 1 (unchunked feed-forward); --dup-correction adds
[1] App. A's duplicate correction of multi-round LSH (off by default, see below).
Paper scale (GPU; the preset keeps the byte-level stdlib sources, so it traces on CPU):
    python transformers/reformer.py --preset paper
  on enwik8 itself (the file enwik8 in DIR, downloaded by hand; common.data.REAL_CORPORA):
    python transformers/reformer.py --preset paper --corpus enwik8 --data-dir DIR --max-chars 0
  the held-out last 10% is then the official 5M valid + 5M test bytes (90M / 5M / 5M split).
[1] Sec. 5 / Table 5: a 12-layer Reformer reaches 1.05 bits/dim on enwik8 (test).

Differences from the paper:
- Data: pydoc text or the stdlib sources (bytes) by default; enwik8 only with --data-dir,
  held out as valid + test together (the paper reports test); no imagenet64.
- Learned absolute position embeddings instead of axial position embeddings; no dropout;
  Adam with warm-up and cosine decay (the paper trains with trax's Adafactor, memory).
- The hashing rounds are combined with a max-subtracting softmax over the rounds' z; HF
  uses exp(z - logsumexp z), which loses ~3e-3 in float32 when z ~ -1e5 (a row that only
  sees itself). Both are the same function; tests against HF run in float64.
- One key per layer and update drives the random rotations; the backward pass replays the
  same key, so recomputed buckets equal the forward pass's (trax stores a seed per layer).
- [1] App. A's duplicate correction (logits_ij -= log N_ij for a key that query i sees in
  N_ij of its round windows) is off by default (--dup-correction turns it on): HF's port,
  which the peer test checks against, has none, and the calibrated numbers above are
  without it. Without it a key seen in several rounds weighs more in the combined output.
- n_buckets=1 is accepted as "one bucket" (no hashing); the paper and HF need an even b.
- Causal LSH masks every later position, so no later key or value enters an earlier output
  (its Jacobian is exactly 0), but which earlier keys share a chunk with a query depends on
  every token's bucket, later ones included: a different later token can move chunk
  boundaries. This is in [1]'s design (and HF's); tests show exact causality with the
  buckets held fixed and with a single bucket.
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
    """Reformer char/byte LM; defaults are [1]'s 12-layer enwik8 model (shapes from memory)."""

    corpus: str = "stdlib"
    """text: 'pydoc' (reference manual, ~465k chars), 'stdlib' (Python sources), 'this', or a
    real corpus of common.data.REAL_CORPORA read from data_dir ([1]: enwik8)"""
    data_dir: str | None = None
    """folder of a real corpus when `corpus` names one: common.data.REAL_CORPORA"""
    max_chars: int = 20_000_000
    """truncate the corpus to this many characters (0: all)"""
    byte_level: bool = True
    """model UTF-8 bytes (vocab 256, as enwik8) instead of the corpus's characters"""
    seq_len: int = 65_536
    """training and evaluation window length L"""
    batch_size: int = 8
    """windows per update"""
    d_model: int = 1024
    """model width d (each reversible half has width d)"""
    n_heads: int = 8
    """attention heads; d_head = d_model / n_heads"""
    d_ff: int = 4096
    """feed-forward hidden width"""
    n_layers: int = 12
    """reversible layers (each = one attention + one feed-forward)"""
    attention: str = "lsh"
    """'lsh' (hashed, chunked) or 'full' (dense shared-QK attention; ablation)"""
    n_buckets: int = 2048
    """hash buckets b per round (even; [1] uses ~2L/chunk_len; 1 = no hashing)"""
    n_hashes: int = 4
    """hashing rounds, combined by their normalisers"""
    dup_correction: bool = False
    """subtract log N_ij from the logits of keys seen N_ij times over the rounds ([1] App. A)"""
    chunk_len: int = 64
    """LSH chunk length m; each chunk attends to itself and the previous chunk"""
    reversible: bool = True
    """reversible residual layers with recomputing backward pass (False: pre-LN residual)"""
    ff_chunks: int = 16
    """sequence chunks the feed-forward is computed in, one at a time (1: unchunked)"""
    lr: float = 1e-3
    """peak Adam learning rate"""
    warmup_steps: int = 1000
    """linear learning-rate warm-up"""
    total_steps: int = 100_000
    """updates (cosine decay to 0 over them)"""
    max_grad_norm: float = 1.0
    """global gradient-norm clip"""
    eval_windows: int = 8
    """validation windows (evenly spaced over the held-out split) for evaluate()"""

    @property
    def num_updates(self) -> int:
        return self.total_steps

    @property
    def steps_per_update(self) -> int:
        return self.batch_size * self.seq_len  # tokens per update

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    def validate(self):
        checks = [
            ("attention", self.attention in ("lsh", "full"), "must be 'lsh' or 'full'"),
            (
                "d_model",
                self.d_model % self.n_heads == 0,
                f"must be divisible by n_heads={self.n_heads}",
            ),
            (
                "n_buckets",
                self.n_buckets == 1 or (self.n_buckets >= 2 and self.n_buckets % 2 == 0),
                "must be 1 or even (h(x) = argmax([xR; -xR]) gives an even count)",
            ),
            ("n_hashes", self.n_hashes >= 1, "must be >= 1"),
            (
                "chunk_len",
                self.chunk_len >= 1 and self.seq_len % self.chunk_len == 0,
                f"must divide seq_len={self.seq_len}",
            ),
            (
                "ff_chunks",
                self.ff_chunks >= 1 and self.seq_len % self.ff_chunks == 0,
                f"must divide seq_len={self.seq_len}",
            ),
            ("total_steps", self.total_steps >= 1, "must be >= 1"),
            ("eval_windows", self.eval_windows >= 1, "must be >= 1"),
        ]
        for name, ok, msg in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} {msg}")
        if self.corpus in data.REAL_CORPORA and self.data_dir is None:
            data.text_corpus(self.corpus)  # text_corpus's ValueError: pass data_dir


PRESETS = {
    "quick": dict(
        corpus="pydoc",
        max_chars=0,
        byte_level=False,
        seq_len=128,
        batch_size=16,
        d_model=64,
        n_heads=2,
        d_ff=256,
        n_layers=2,
        n_buckets=8,
        n_hashes=2,
        chunk_len=32,
        ff_chunks=4,
        lr=3e-3,
        warmup_steps=50,
        total_steps=600,
        eval_windows=64,
    ),
    "paper": dict(),
}


@functools.cache
def corpus(name: str, max_chars: int, byte_level: bool, data_dir: str | None = None):
    """(train ids, val ids) as numpy uint8 (uint16 above 256 symbols) and the vocabulary
    size; loaded once. `init` puts them in the State, so they enter the compiled chunks as
    an input, not as a constant of each program (a closed-over device array would break
    the runner's AOT-compiled chunks); the gathers cast to int32."""
    train, val, vocab = data.char_corpus(name, 0.1, max_chars or None, byte_level, data_dir)
    dtype = np.uint8 if len(vocab) <= 256 else np.uint16
    return train.astype(dtype), val.astype(dtype), len(vocab)


# --- NETWORKS ---


def split_heads(x, n_heads):
    B, L, _ = x.shape
    return x.reshape(B, L, n_heads, -1).transpose(0, 2, 1, 3)  # (B, H, L, d_head)


def merge_heads(x):
    B, H, L, dh = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, L, H * dh)  # (B, L, H*d_head)


def unit_keys(qk):
    """k = qk / ||qk||, written as trax/HF do: qk * rsqrt(mean(qk^2) + 1e-6) / sqrt(d)."""
    return qk * jax.lax.rsqrt(jnp.mean(qk**2, -1, keepdims=True) + 1e-6) / np.sqrt(qk.shape[-1])


def masked_logits(dots, q_pos, k_pos, causal: bool):
    """Mask dots[..., i, j] by the original positions of query i and key j."""
    if causal:
        dots = jnp.where(q_pos[..., :, None] >= k_pos[..., None, :], dots, -1e9)
    # [1] Sec. 2 "Causal masking for shared-QK": attend to oneself only if nothing else.
    return jnp.where(q_pos[..., :, None] != k_pos[..., None, :], dots, -1e5)


def full_attention(qk, v, causal: bool):
    """Dense shared-QK attention with the self-mask (the 'full' ablation and the reference
    LSH reduces to). qk, v: (B, H, L, d_head)."""
    pos = jnp.arange(qk.shape[2])
    dots = jnp.einsum("bhid,bhjd->bhij", qk, unit_keys(qk))  # (B, H, L, L)
    return jax.nn.softmax(masked_logits(dots, pos, pos, causal), -1) @ v


def hash_vectors(x, rotations, n_buckets: int):
    """h(x) = argmax([xR; -xR]) per round ([1] Sec. 2). x: (B, H, L, d_head), rotations:
    (H, d_head, n_hashes, n_buckets/2) -> buckets (B, H, n_hashes, L) in [0, n_buckets)."""
    B, H, L, _ = x.shape
    if n_buckets == 1:
        return jnp.zeros((B, H, rotations.shape[2], L), jnp.int32)

    def one(xb, r):  # one sequence, one round: xb (H, L, dh), r (H, dh, b/2) -> (H, L)
        rot = jnp.einsum("hld,hdr->hlr", xb, r)
        # argmax([xR; -xR]) without the concatenation: the first half wins ties, as there
        top, bottom = rot.max(-1), -rot.min(-1)
        return jnp.where(top >= bottom, rot.argmax(-1), n_buckets // 2 + rot.argmin(-1))

    # xR has B H n_hashes L b/2 entries (64 GiB at the paper's 8 x 64k tokens, 2048 buckets):
    # map over sequences and rounds so that one (H, L, b/2) block lives at a time.
    per_round = lambda xb: jax.lax.map(lambda r: one(xb, r), jnp.moveaxis(rotations, 2, 0))
    return jnp.swapaxes(jax.lax.map(per_round, x), 1, 2)  # (B, H, n_hashes, L)


def duplicate_counts(undo, q_pos, k_pos, chunk_len: int, n_hashes: int):
    """N_ij of [1] App. A: how many times key position j lies in query position i's
    windows over all rounds. undo (B, H, nL): sorted slot of every (round, position);
    q_pos (B, H, C, m), k_pos (B, H, C, 2m) -> counts (B, H, C, m, 2m), >= 1."""
    B, H, C, m = q_pos.shape
    chunk = (undo // chunk_len).reshape(B, H, n_hashes, -1)  # chunk of position p in round r
    at = lambda pos: jnp.take_along_axis(chunk, pos.reshape(B, H, 1, -1), 3)
    gq = at(q_pos).reshape(B, H, n_hashes, C, m, 1)  # the query's chunk in every round
    gk = at(k_pos).reshape(B, H, n_hashes, C, 1, 2 * m)  # the key's chunk in every round
    n = 0
    for r in range(n_hashes):  # query's window in round r: its chunk and the one before
        here = gq[:, :, r, None]  # (B, H, 1, C, m, 1)
        n = n + jnp.sum((gk == here) | (gk == (here - 1) % C), axis=2)  # sum over rounds
    return n  # (B, H, C, m, 2m)


def lsh_attention(
    qk, v, rotations, n_buckets: int, chunk_len: int, causal: bool, dup_correction: bool = False
):
    """LSH attention of [1] Sec. 2, with the chunking and round layout of trax/HF.
    qk, v: (B, H, L, d_head); rotations: (H, d_head, n_hashes, n_buckets/2). With
    `dup_correction`, logits_ij -= log N_ij ([1] App. A), so that a key that query i
    sees in several rounds (or twice in one window) counts once."""
    B, H, L, dh = qk.shape
    n_hashes = rotations.shape[2]
    if L <= chunk_len:  # one chunk holds the whole sequence: plain attention
        return full_attention(qk, v, causal)
    buckets = hash_vectors(jax.lax.stop_gradient(qk), rotations, n_buckets)
    # Round r uses buckets [r b, (r+1) b); rounds are concatenated along the length.
    buckets = (buckets + n_buckets * jnp.arange(n_hashes)[:, None]).reshape(B, H, -1)
    pos = jnp.tile(jnp.arange(L), n_hashes)  # (nL,) position of each concatenated slot
    order = jnp.argsort(buckets * L + pos, axis=-1)  # sort by (round, bucket, position)
    undo = jnp.argsort(order, axis=-1)
    q_pos = order % L  # (B, H, nL) original position of each sorted slot
    sq = jnp.take_along_axis(qk, q_pos[..., None], 2)  # (B, H, nL, dh)
    sv = jnp.take_along_axis(v, q_pos[..., None], 2)
    sk = unit_keys(sq)
    C = n_hashes * L // chunk_len
    q = sq.reshape(B, H, C, chunk_len, dh)
    q_pos = q_pos.reshape(B, H, C, chunk_len)

    def look_back(x):  # chunk c sees [chunk c-1, chunk c]; chunk 0 wraps to the last chunk
        return jnp.concatenate([jnp.roll(x, 1, axis=2), x], axis=3)

    k = look_back(sk.reshape(B, H, C, chunk_len, dh))  # (B, H, C, 2m, dh)
    vv = look_back(sv.reshape(B, H, C, chunk_len, dh))
    k_pos = look_back(q_pos)  # (B, H, C, 2m)
    dots = masked_logits(jnp.einsum("bhcqd,bhckd->bhcqk", q, k), q_pos, k_pos, causal)
    if dup_correction and n_hashes > 1:  # [1] App. A: subtract log N_ij
        dots = dots - jnp.log(duplicate_counts(undo, q_pos, k_pos, chunk_len, n_hashes))
    z = jax.nn.logsumexp(dots, -1, keepdims=True)  # (B, H, C, m, 1) per-round normaliser
    o = jnp.exp(dots - z) @ vv  # (B, H, C, m, dh)
    o = jnp.take_along_axis(o.reshape(B, H, -1, dh), undo[..., None], 2)  # unsort
    z = jnp.take_along_axis(z.reshape(B, H, -1), undo, 2)
    o = o.reshape(B, H, n_hashes, L, dh)
    w = jax.nn.softmax(z.reshape(B, H, n_hashes, L), axis=2)  # [1] Eq. (6): rounds' weights
    return jnp.sum(o * w[..., None], axis=2)  # (B, H, L, dh)


class SharedQKAttention(nn.Module):
    """qk and v projections (no bias, as HF's LSHSelfAttention) and LSH or full attention;
    returns the heads concatenated, before the output projection."""

    n_heads: int
    d_head: int
    attention: str = "lsh"
    n_buckets: int = 2
    n_hashes: int = 1
    chunk_len: int = 64
    causal: bool = True
    dup_correction: bool = False

    @nn.compact
    def __call__(self, x, hash_key):
        width = self.n_heads * self.d_head
        qk = split_heads(nn.Dense(width, use_bias=False, name="query_key")(x), self.n_heads)
        v = split_heads(nn.Dense(width, use_bias=False, name="value")(x), self.n_heads)
        if self.attention == "full":
            return merge_heads(full_attention(qk, v, self.causal))
        # fresh random rotations R for every round ([1] Sec. 2 "Multi-round LSH")
        shape = (self.n_heads, self.d_head, self.n_hashes, self.n_buckets // 2)
        rotations = jax.random.normal(hash_key, shape, qk.dtype)
        return merge_heads(
            lsh_attention(
                qk, v, rotations, self.n_buckets, self.chunk_len, self.causal, self.dup_correction
            )
        )


class AttentionBlock(nn.Module):
    """F(x) = W_o Attention(LayerNorm(x))."""

    cfg: Config
    causal: bool = True

    @nn.compact
    def __call__(self, x, hash_key):
        c = self.cfg
        h = SharedQKAttention(
            c.n_heads,
            c.d_head,
            c.attention,
            c.n_buckets,
            c.n_hashes,
            c.chunk_len,
            self.causal,
            c.dup_correction,
        )(nn.LayerNorm()(x), hash_key)
        return nn.Dense(c.d_model, use_bias=False, name="out")(h)


class FeedForward(nn.Module):
    """G(x) = W_2 relu(W_1 LayerNorm(x))."""

    d_model: int
    d_ff: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.d_model)(nn.relu(nn.Dense(self.d_ff)(nn.LayerNorm()(x))))


def chunked(fn, x, n_chunks: int):
    """fn over n_chunks sequence chunks one after another ([1] Sec. 3 "Chunking"), so only
    one chunk's d_ff activations exist at a time. x: (B, L, d)."""
    if n_chunks == 1:
        return fn(x)
    B, L, d = x.shape
    xs = x.reshape(B, n_chunks, L // n_chunks, d).swapaxes(0, 1)  # (c, B, L/c, d)
    ys = jax.lax.map(fn, xs)
    return ys.swapaxes(0, 1).reshape(B, L, -1)


def reversible_stack(f, g, recompute: bool = True):
    """(pf, pg, x1, x2, keys) -> (y1, y2) through the layers stacked on the leading axis of
    pf, pg and keys: y1 = x1 + f(p_f, x2, key), y2 = x2 + g(p_g, y1) ([2] Eq. 1).
    With recompute, a custom_vjp stores only the outputs and reconstructs every layer's
    input in the backward pass ([2] Alg. 1); without it, ordinary autodiff (for tests)."""

    def forward(pf, pg, x1, x2, keys):
        def layer(carry, p):
            x1, x2 = carry
            y1 = x1 + f(p[0], x2, p[2])  # Y1 = X1 + Attention(X2)
            y2 = x2 + g(p[1], y1)  # Y2 = X2 + FeedForward(Y1)
            return (y1, y2), None

        return jax.lax.scan(layer, (x1, x2), (pf, pg, keys))[0]

    if not recompute:
        return forward

    stack = jax.custom_vjp(forward)

    def fwd(pf, pg, x1, x2, keys):
        y1, y2 = forward(pf, pg, x1, x2, keys)
        return (y1, y2), (pf, pg, keys, y1, y2)  # no per-layer activations

    def bwd(res, cts):
        pf, pg, keys, y1, y2 = res

        def layer_back(carry, p):
            y1, y2, dy1, dy2 = carry
            p_f, p_g, key = p
            g_y1, g_vjp = jax.vjp(g, p_g, y1)
            x2 = y2 - g_y1  # inverse: X2 = Y2 - FeedForward(Y1)
            dp_g, dy1_g = g_vjp(dy2)
            dy1 = dy1 + dy1_g  # total cotangent of Y1
            f_x2, f_vjp = jax.vjp(lambda pp, xx: f(pp, xx, key), p_f, x2)
            x1 = y1 - f_x2  # inverse: X1 = Y1 - Attention(X2)
            dp_f, dx2_f = f_vjp(dy1)
            return (x1, x2, dy1, dy2 + dx2_f), (dp_f, dp_g)

        (_, _, dx1, dx2), (dpf, dpg) = jax.lax.scan(
            layer_back, (y1, y2, *cts), (pf, pg, keys), reverse=True
        )
        return dpf, dpg, dx1, dx2, np.zeros(keys.shape, jax.dtypes.float0)

    stack.defvjp(fwd, bwd)
    return stack


class Reformer(nn.Module):
    """Token + position embedding, n_layers (reversible or standard) layers, LayerNorm and
    the softmax head. __call__(tokens (B, L), hash_key) -> logits (B, L, vocab)."""

    cfg: Config
    vocab: int
    causal: bool = True
    recompute: bool = True

    def layer_fns(self):
        """The per-layer functions f (attention) and g (feed-forward) on explicit params."""
        c = self.cfg
        attn = AttentionBlock(c, self.causal, parent=None)
        ff = FeedForward(c.d_model, c.d_ff, parent=None)
        f = lambda p, x, key: attn.apply(p, x, key)
        g = lambda p, x: chunked(lambda xc: ff.apply(p, xc), x, c.ff_chunks)
        return attn, ff, f, g

    @nn.compact
    def __call__(self, tokens, hash_key):
        c = self.cfg
        B, L = tokens.shape
        x = nn.Embed(self.vocab, c.d_model, embedding_init=nn.initializers.normal(0.02))(tokens)
        pos = self.param("pos_embedding", nn.initializers.normal(0.02), (c.seq_len, c.d_model))
        x = x + pos[:L]
        attn, ff, f, g = self.layer_fns()
        dummy = jnp.zeros((1, min(L, c.chunk_len), c.d_model))
        layers = lambda k: jax.random.split(k, c.n_layers)
        # per-layer parameters stacked on a leading axis of length n_layers
        pf = self.param(
            "attention",
            lambda k: jax.vmap(lambda kk: attn.init(kk, dummy, jax.random.PRNGKey(0)))(layers(k)),
        )
        pg = self.param(
            "feed_forward", lambda k: jax.vmap(lambda kk: ff.init(kk, dummy))(layers(k))
        )
        keys = jax.random.split(hash_key, c.n_layers)  # one hashing key per layer
        if c.reversible:
            y1, y2 = reversible_stack(f, g, self.recompute)(pf, pg, x, x, keys)  # [x; x]
            h = jnp.concatenate([y1, y2], -1)  # (B, L, 2d)
        else:

            def layer(h, p):  # standard pre-LN residual block: h + F(h), then h + G(h)
                h = h + f(p[0], h, p[2])
                return h + g(p[1], h), None

            h = jax.lax.scan(layer, x, (pf, pg, keys))[0]
        return nn.Dense(self.vocab)(nn.LayerNorm()(h))


# --- LOSS ---


def lm_loss(params, model, tokens, targets, hash_key):
    """Mean next-token cross-entropy in nats: -1/(BL) sum_t log p(x_{t+1} | x_{<=t})."""
    logits = model.apply(params, tokens, hash_key)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


# --- UPDATE ---


@struct.dataclass
class State:
    params: Any
    opt_state: Any
    key: jax.Array
    step: jax.Array
    train_ids: jax.Array
    """(T,) uint8 training ids (corpus()): an input of the compiled chunks, not a constant;
    one copy per seed (pydoc 0.4 MB, stdlib 11 MB)"""
    val_ids: jax.Array
    """(T_val,) uint8 validation ids, read by evaluate"""


def make_model(cfg: Config) -> Reformer:
    return Reformer(cfg, corpus(cfg.corpus, cfg.max_chars, cfg.byte_level, cfg.data_dir)[2])


def optimizer(cfg: Config):
    sched = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, cfg.warmup_steps, max(cfg.total_steps, cfg.warmup_steps + 1)
    )
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), optax.adam(sched))


def init(key, cfg: Config) -> State:
    k_params, k_hash, key = jax.random.split(key, 3)
    tokens = jnp.zeros((1, cfg.seq_len), jnp.int32)
    params = make_model(cfg).init(k_params, tokens, k_hash)
    train_ids, val_ids, _ = corpus(cfg.corpus, cfg.max_chars, cfg.byte_level, cfg.data_dir)
    return State(
        params,
        optimizer(cfg).init(params),
        key,
        jnp.zeros((), jnp.int32),
        jnp.asarray(train_ids),
        jnp.asarray(val_ids),
    )


def update(state: State, cfg: Config):
    key, k_data, k_hash = jax.random.split(state.key, 3)
    tokens, targets = data.lm_windows(k_data, state.train_ids, cfg.batch_size, cfg.seq_len)
    tokens, targets = tokens.astype(jnp.int32), targets.astype(jnp.int32)
    loss, grads = jax.value_and_grad(lm_loss)(
        state.params, make_model(cfg), tokens, targets, k_hash
    )
    upd, opt_state = optimizer(cfg).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, upd)
    metrics = {
        "losses/loss": loss,
        "charts/bits_per_char": data.bits(loss),
        "charts/grad_norm": optax.tree.norm(grads),
    }
    return state.replace(params=params, opt_state=opt_state, key=key, step=state.step + 1), metrics


def val_windows(val_ids, cfg: Config):
    """Fixed, evenly spaced validation windows of the (device) val ids: int32 inputs and
    targets (eval_windows, L)."""
    starts = np.linspace(0, val_ids.shape[0] - cfg.seq_len - 1, cfg.eval_windows).astype(np.int32)
    take = lambda s: jax.lax.dynamic_slice(val_ids, (s,), (cfg.seq_len + 1,))
    w = jax.vmap(take)(jnp.asarray(starts)).astype(jnp.int32)
    return w[:, :-1], w[:, 1:]


def evaluate(state: State, cfg: Config):
    """Validation loss and bits/char over the fixed windows (one hashing key for all)."""
    tokens, targets = val_windows(state.val_ids, cfg)
    model = make_model(cfg)
    hash_key = jax.random.PRNGKey(1234)

    def one(carry, tt):
        return carry + lm_loss(state.params, model, tt[0][None], tt[1][None], hash_key), None

    total = jax.lax.scan(one, 0.0, (tokens, targets))[0]
    loss = total / cfg.eval_windows
    return {"val_loss": loss, "val_bits_per_char": data.bits(loss)}


# --- MAIN ---


def main(argv=None):
    return run.main(
        Config,
        init,
        update,
        presets=PRESETS,
        evaluate=evaluate,
        argv=argv,
        doc=__doc__,
        summary_keys=["val_loss", "val_bits_per_char", "losses/loss", "charts/bits_per_char"],
    )


if __name__ == "__main__":
    main()
