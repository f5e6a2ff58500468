"""Universal Transformer (UT) encoder-decoder with per-position Adaptive Computation Time, on
variable-length string copy / reversal with a length-generalisation test.

[1] M. Dehghani, S. Gouws, O. Vinyals, J. Uszkoreit, L. Kaiser. "Universal Transformers."
    ICLR 2019, arXiv:1807.03819. Reference code: tensor2tensor universal_transformer.py.
[2] A. Graves. "Adaptive Computation Time for Recurrent Neural Networks." arXiv:1603.08983.
[3] L. Weng. "The Transformer Family" (2020), section "Make it Recurrent".

Encoder: one weight-tied block (multi-head self-attention + position-wise transition, each
with a residual connection and post-LayerNorm) is applied recurrently over depth t = 1..T to
all positions in parallel; a coordinate embedding tells the block where (position i) and when
(step t) it is:

    H^0 = embedding(x) * sqrt(d)
    P^t[i, 2k]   = sin(i / 10000^{2k/d}) + sin(t / 10000^{2k/d})                    [1] Eq. 3
    P^t[i, 2k+1] = cos(i / 10000^{2k/d}) + cos(t / 10000^{2k/d})
        (position and time sinusoids are SUMMED; [3] writes a circled plus)
    A^t = LayerNorm((H^{t-1} + P^t) + MultiHeadSelfAttention(H^{t-1} + P^t))        [1] Eq. 4
    H^t = LayerNorm(A^t + Transition(A^t))                                          [1] Eq. 5
        ([3] writes A^{t-1} inside the second residual: a typo)
    Transition(A) = max(0, A W_1 + b_1) W_2 + b_2   (position-wise feed-forward)
    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V  (the scale inside the exponent)

Decoder ([1] Sec. 2.1): a second tied block, also applied recurrently with the same P^t,
reads the shifted target y_in = (BOS, y_1, .., y_{m-1}) and the encoder's final output H^enc
(the ACT output below; PAD positions of the source are masked out of every attention):

    S^0 = embedding(y_in) * sqrt(d)
    B^t = LayerNorm((S^{t-1} + P^t) + MaskedSelfAttention(S^{t-1} + P^t))  (causal mask)
    C^t = LayerNorm(B^t + Attention(Q = B^t, K = V = H^enc))
    S^t = LayerNorm(C^t + Transition(C^t))
    p(y_j | y_<j, x) = softmax(S^dec_j W_o + b_o)   (S^dec: the decoder's ACT output)

trained by teacher forcing (cross-entropy over the target symbols and the EOS) and decoded
greedily, position by position (the argmax at j is the input at j + 1). The decoding cache
holds, for every step t, the self-attention inputs S^{t-1} + P^t of the earlier positions
(halted ones frozen), so each new position runs its T steps once; K and V are re-projected
from the cached inputs (an input cache, not a KV cache). A string is decoded exactly right
iff teacher forcing predicts every symbol right, so the two sequence accuracies coincide.

Dynamic halting ([1] Sec. 2.2, ACT of [2] applied per position, in the encoder and, with its
own halting unit, in the decoder): after each step a halting unit h_i^t = sigmoid(w_h . H_i^t
+ b_h) is read at every position i, and, as in [2],

    N_i = min{ T, min{ n : sum_{t<=n} h_i^t >= 1 - eps } },  R_i = 1 - sum_{t<N_i} h_i^t
    p_i^t = h_i^t (t < N_i), R_i (t = N_i), 0 (t > N_i);      sum_t p_i^t = 1
    output_i = sum_t p_i^t H_i^t            (mean field)
    ponder cost rho_i = N_i + R_i,  L = L_task + tau * (mean_i rho_i^enc + mean_j rho_j^dec)

Once position i halts, its state is frozen: H_i^t = H_i^{N_i} for t > N_i is copied forward
(other positions keep attending to it) until every position has halted or t = T. Without
ACT (`--no-act`) each stack is a fixed-T UT whose output is H^T, i.e. a T-layer post-LN
Transformer with all layers' weights tied. The inner loop is a fixed-length `lax.scan` of
T steps with masks (jittable, vmappable); the ACT code is duplicated from act.py.

Task (generated in JAX inside the update): copy or reverse a random string of n symbols from
`vocab`, n uniform in 1..`length`, padded with PAD; the decoder emits the n symbols then EOS.
As in [1] Sec. 3.4 [mem], training positions start at a random offset (0..`random_offset`,
per string) so that the position sinusoids of longer strings have been seen. evaluate()
greedily decodes fixed held-out strings of lengths 1..length and (eval/long_*) of lengths
length+1..eval_length, and reports token and sequence accuracy. `--model encoder` is the
encoder-only UT (the output at position i is read from encoder position i; no EOS).
Broken variants: `--no-cross-attention` (the decoder never sees the source), `--coords
none`, `--no-causal` (the decoder sees the future: fails the leak test).

Reproduce (CPU demo; reversal of 1..8 symbols, tested also at 9..16):
    python transformers/universal_transformer.py --preset quick
    python transformers/universal_transformer.py --preset quick --random-offset 0
Measured (CPU: 2 cores shared with other jobs at load 7-14; 1 seed, 2000 updates x 64
strings, d = 64, T <= 4, ACT in both stacks), greedy decoding of 256 held-out strings per
range, sequence (token) accuracy at the training lengths 1..8 / the longer lengths 9..16:
    reverse, offsets 0..8:    0.965 (0.989) / 0.168 (0.682); 12k tokens/s, 129 s wall-clock
                              (41 s compile) at load ~9, 13k tokens/s at load ~3; every
                              source position halts at N = 2
    reverse, --random-offset 0: 0.969 (0.993) / 0.000 (0.141); 8k tokens/s, 169 s
    copy (--task copy):       0.898 (0.973) / 0.840 (0.985); 1.60 ponder steps
    encoder only (--model encoder): 0.250 (0.483) / 0.000 (0.227) with offsets 0..8, but
                              0.949 (0.988) / 0.000 (0.163) with --random-offset 0
(tokens = padded source symbols). The behaviour test (copy, 400 updates x 32, sequence
accuracy over the last 20 updates): UT 0.953 vs 0.009 without cross-attention.
Paper-scale (GPU; d = 512, 8 heads, T = 8, train lengths 1..40, test 41..400):
    python transformers/universal_transformer.py --preset paper

Differences from the paper:
- [1] reports length generalisation on copy / reverse / addition (train <= 40, test 400);
  addition is not implemented, and the CPU demo trains on <= 8 and tests at 9..16.
- The halting unit reads the new state H^t of each position, as in [2]; tensor2tensor's
  implementation reads the state plus the coordinate embedding before the step, and keeps a
  running weighted average as the state instead of freezing the halted positions [mem].
- The decoder's halting and its ponder cost are per target position, like the encoder's; the
  cross-attention reads the encoder's ACT output (its mean-field state).
- Input and output embeddings of the (shared) vocabulary are separate matrices; the source
  and target share the input embedding.
- The transition is the feed-forward variant (the paper also uses a separable convolution);
  no dropout; Adam with a constant learning rate and no warm-up.
- Position i counts from 0 (plus the training offset) and time t from 1 [mem]; halting bias
  init 1.0, tau = 0.01 [mem]; the random-offset range (360 = 400 - 40 by default) is our
  choice.
- The equation numbers of [1] and [2] quoted here, the (H^{t-1} + P^t) residual in Eq. 4,
  the random position offsets and the `paper` preset's sizes are from memory [mem].
"""

import math
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from common import data, run

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """Universal Transformer encoder-decoder + per-position ACT on copy / reversal."""

    task: str = "reverse"
    """reverse or copy the input string"""
    model: str = "enc_dec"
    """enc_dec (the paper's: encoder + tied decoder, greedy decoding) or encoder (encoder
    only: the output at position i is read from the encoder's position i)"""
    vocab: int = 10
    """symbols of the random strings (PAD, BOS and EOS come on top)"""
    length: int = 40
    """longest training string; training lengths are uniform in 1..length"""
    eval_length: int = 400
    """longest held-out string: length generalisation is measured on length+1..eval_length"""
    d_model: int = 512
    """model width d"""
    num_heads: int = 8
    """attention heads"""
    d_ff: int = 2048
    """hidden width of the transition function"""
    max_steps: int = 8
    """T: recurrent steps of each tied block (the most steps with ACT)"""
    act: bool = True
    """dynamic per-position halting (ACT); off: exactly max_steps steps, output H^T"""
    eps: float = 0.01
    """ACT halting threshold 1 - eps"""
    tau: float = 0.01
    """ACT time penalty: weight of the mean ponder cost (encoder + decoder)"""
    halt_bias_init: float = 1.0
    """initial bias of the halting units"""
    coords: str = "space_time"
    """coordinate embedding: space_time (position + step sinusoids), space (position only),
    none (a broken variant)"""
    random_offset: int = 360
    """training positions start at a random offset in 0..random_offset (evaluation at 0)"""
    cross_attention: bool = True
    """the decoder attends to the encoder's output (False: the broken variant)"""
    causal: bool = True
    """causal mask in the decoder's self-attention (False: the broken variant that leaks)"""
    batch_size: int = 64
    """strings per update"""
    lr: float = 1e-3
    """Adam learning rate (constant)"""
    max_grad_norm: float = 1.0
    """global gradient-norm clip"""
    total_updates: int = 20_000
    """optimiser updates"""
    eval_size: int = 512
    """fixed held-out strings per length range for evaluate()"""

    @property
    def num_updates(self) -> int:
        return self.total_updates

    @property
    def steps_per_update(self) -> int:
        return self.batch_size * self.length  # padded source symbols per update

    def validate(self):
        for name in ("length", "d_model", "num_heads", "d_ff", "max_steps", "batch_size",
                     "total_updates", "eval_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.vocab < 2:
            raise ValueError(f"vocab must be >= 2, got {self.vocab}")
        if self.random_offset < 0:
            raise ValueError(f"random_offset must be >= 0, got {self.random_offset}")
        if self.eval_length < self.length:
            raise ValueError(f"eval_length={self.eval_length} must be >= length={self.length}")
        if self.d_model % self.num_heads or self.d_model % 2:
            raise ValueError(f"d_model={self.d_model} must be even and divisible by "
                             f"num_heads={self.num_heads}")
        for name, options in (("task", ("reverse", "copy")), ("model", ("enc_dec", "encoder")),
                              ("coords", ("space_time", "space", "none"))):
            if getattr(self, name) not in options:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {options}")
        if not 0 < self.eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {self.eps}")
        if self.tau < 0 or self.lr <= 0:
            raise ValueError(f"tau must be >= 0 and lr > 0, got {self.tau}, {self.lr}")


PRESETS = {
    # CPU demo: reversal of 1..8 symbols, tested at 9..16; d = 64; 2-3 min on 2 shared cores
    "quick": dict(length=8, eval_length=16, d_model=64, num_heads=4, d_ff=128, max_steps=4,
                  random_offset=8, lr=2e-3, total_updates=2000, eval_size=256),
    "paper": dict(),
}


# --- DATA ---

PAD, BOS, EOS = 0, 1, 2  # symbols are 3 .. vocab + 2
NUM_SPECIAL = 3


def string_batch(key, batch: int, min_len: int, max_len: int, vocab: int, task: str):
    """Strings of uniform length n in min_len..max_len, padded to max_len.

    Returns x (B, max_len): symbols then PAD; y_in (B, max_len + 1): BOS then the target
    (the decoder's teacher-forced input); y_out (B, max_len + 1): the target, EOS, then PAD;
    n (B,)."""
    k_len, k_sym = jax.random.split(key)
    n = jax.random.randint(k_len, (batch,), min_len, max_len + 1)
    i = jnp.arange(max_len)
    valid = i[None] < n[:, None]  # (B, L)
    x = jnp.where(valid, jax.random.randint(k_sym, (batch, max_len), 0, vocab) + NUM_SPECIAL,
                  PAD)
    if task == "reverse":  # target_i = x_{n-1-i}
        tgt = jnp.take_along_axis(x, jnp.clip(n[:, None] - 1 - i[None], 0, max_len - 1), 1)
        tgt = jnp.where(valid, tgt, PAD)
    else:
        tgt = x
    j = jnp.arange(max_len + 1)[None]
    y_out = jnp.where(j == n[:, None], EOS, jnp.pad(tgt, ((0, 0), (0, 1))))
    y_in = jnp.pad(tgt, ((0, 0), (1, 0)), constant_values=BOS)
    return x, y_in, y_out, n


def targets(cfg: Config, y_out, n):
    """The model's targets and loss mask: enc_dec predicts the target then EOS (L + 1); the
    encoder predicts target_i at position i (L)."""
    if cfg.model == "encoder":
        y_out = y_out[:, :-1]
    mask = jnp.arange(y_out.shape[1])[None] < n[:, None] + (cfg.model == "enc_dec")
    return y_out, mask


# --- NETWORKS ---


def sinusoid(pos, d: int):
    """[1] Eq. 3 (one coordinate): (..., ) -> (..., d) with sin on even, cos on odd dims."""
    k = jnp.arange(d // 2)
    angle = pos[..., None] / (10000.0 ** (2 * k / d))  # (..., d/2)
    return jnp.stack([jnp.sin(angle), jnp.cos(angle)], -1).reshape(*pos.shape, d)


def coordinate_embedding(length: int, t, d: int, coords: str = "space_time", offset=0):
    """P^t (L, d) = position sinusoid(i) + time sinusoid(t), summed element-wise; positions
    i = offset + 0..L-1 (offset (B,) gives (B, L, d))."""
    pos = jnp.asarray(offset, jnp.float32)[..., None] + jnp.arange(length)  # ([B,] L)
    if coords == "none":
        return jnp.zeros((*pos.shape, d))
    p = sinusoid(pos, d)
    if coords == "space_time":
        p = p + sinusoid(jnp.asarray(t, jnp.float32), d)
    return p


class Attention(nn.Module):
    """Multi-head attention of queries from x to keys/values from kv: softmax(Q K^T /
    sqrt(d_k)) V per head, then W^o. mask (B|1, 1, Lq|1, Lk) bool: True = may attend."""

    num_heads: int

    @nn.compact
    def __call__(self, x, kv, mask=None):
        b, lq, d = x.shape
        dh = d // self.num_heads

        def heads(name, src):  # (B, L, d) -> (B, h, L, d/h)
            return nn.Dense(d, name=name)(src).reshape(b, src.shape[1], self.num_heads,
                                                       dh).transpose(0, 2, 1, 3)

        q, k, v = heads("query", x), heads("key", kv), heads("value", kv)
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, k) / jnp.sqrt(dh)  # (B, h, Lq, Lk)
        if mask is not None:
            logits = jnp.where(mask, logits, -1e9)
        w = jax.nn.softmax(logits, -1)
        out = jnp.einsum("bhqk,bhkd->bhqd", w, v).transpose(0, 2, 1, 3).reshape(b, lq, d)
        return nn.Dense(d, name="out")(out)


def transition(a, d_ff: int):
    """Transition(A) = max(0, A W_1 + b_1) W_2 + b_2 (inside a compact module)."""
    return nn.Dense(a.shape[-1], name="ff_out")(nn.relu(nn.Dense(d_ff, name="ff_in")(a)))


class EncoderBlock(nn.Module):
    """The encoder's one tied block: [1] Eq. 4-5 (post-LN), applied at every step t."""

    num_heads: int
    d_ff: int

    @nn.compact
    def __call__(self, h, p_t, mask=None):
        x = h + p_t  # H^{t-1} + P^t
        a = nn.LayerNorm(name="ln_attn")(x + Attention(self.num_heads, name="attn")(x, x, mask))
        return nn.LayerNorm(name="ln_ff")(a + transition(a, self.d_ff)), None  # H^t


class DecoderBlock(nn.Module):
    """The decoder's one tied block: masked self-attention, attention to the encoder's final
    output H^enc, transition; each sub-layer residual + post-LN. With a `cache` (B, M, d) of
    this step's self-attention inputs, s is the one position j: its input is written at j and
    it attends to the cached positions (the mask says which)."""

    num_heads: int
    d_ff: int
    cross: bool = True
    cross_scale: jax.Array | None = None
    """multiplies the cross-attention term (None: 1; the traced State.cross)"""

    @nn.compact
    def __call__(self, s, p_t, enc, self_mask=None, src_mask=None, cache=None, j=0):
        x = s + p_t  # S^{t-1} + P^t
        kv = x
        if cache is not None:
            kv = cache = jax.lax.dynamic_update_slice_in_dim(cache, x, j, axis=1)
        a = nn.LayerNorm(name="ln_self")(x + Attention(self.num_heads, name="self_attn")(
            x, kv, self_mask))
        if self.cross:  # C^t = LN(B^t + Attention(B^t, H^enc, H^enc))
            c = Attention(self.num_heads, name="cross_attn")(a, enc, src_mask)
            a = nn.LayerNorm(name="ln_cross")(a + (c if self.cross_scale is None
                                                    else self.cross_scale * c))
        return nn.LayerNorm(name="ln_ff")(a + transition(a, self.d_ff)), cache  # S^t


class Halting(nn.Module):
    """h^t = sigmoid(w_h . H^t + b_h) per position: (B, L, d) -> (B, L)."""

    bias_init: float = 1.0

    @nn.compact
    def __call__(self, h):
        return jax.nn.sigmoid(nn.Dense(1, bias_init=nn.initializers.constant(self.bias_init))(
            h)[..., 0])


class UT(nn.Module):
    """Shared embedding, tied encoder and decoder blocks with their halting units, and the
    output head. `encode` and `decode` run the recurrences; __call__ = teacher forcing."""

    cfg: "Config"
    cross_scale: jax.Array | None = None
    """multiplies the decoder's cross-attention term (None: 1; the traced State.cross)"""

    def setup(self):
        c = self.cfg
        self.embed = nn.Embed(c.vocab + NUM_SPECIAL, c.d_model)
        self.enc_block = EncoderBlock(c.num_heads, c.d_ff)
        self.enc_halting = Halting(c.halt_bias_init)
        self.dec_block = DecoderBlock(c.num_heads, c.d_ff, c.cross_attention, self.cross_scale)
        self.dec_halting = Halting(c.halt_bias_init)
        self.head = nn.Dense(c.vocab + NUM_SPECIAL)

    def __call__(self, x, y_in=None, offset=0):
        """x (B, L), y_in (B, L + 1) -> logits (B, L + 1, V) and aux {enc, dec}; encoder
        model: logits (B, L, V). offset: first position index, scalar or (B,)."""
        enc, enc_aux = self.encode(x, offset)
        if self.cfg.model == "encoder":
            return self.head(enc), {"enc": enc_aux}
        dec, dec_aux = self.decode(y_in, enc, source_mask(x), offset)
        return self.head(dec), {"enc": enc_aux, "dec": dec_aux}

    def encode(self, x, offset=0):
        """x (B, L) int -> output (B, L, d) and aux: N, R (B, L), p and states (T, B, L, d)."""
        mask = source_mask(x)
        h0 = self.embed(x) * math.sqrt(self.cfg.d_model)  # H^0
        return self.recur(lambda h, p_t, _: self.enc_block(h, p_t, mask), self.enc_halting, h0,
                          offset)

    def decode(self, y_in, enc, src_mask, offset=0):
        """y_in (B, M) int, encoder output (B, L, d) -> output (B, M, d) and aux."""
        m = y_in.shape[1]
        self_mask = jnp.tril(jnp.ones((m, m), bool))[None, None] if self.cfg.causal else None
        s0 = self.embed(y_in) * math.sqrt(self.cfg.d_model)  # S^0
        return self.recur(lambda s, p_t, _: self.dec_block(s, p_t, enc, self_mask, src_mask),
                          self.dec_halting, s0, offset)

    def decode_step(self, tok, j, cache, enc, src_mask):
        """Incremental decoding of position j alone: tok (B,) = y_in[:, j]; cache (T, B, M, d)
        holds every step's self-attention inputs S^{t-1} + P^t of the positions < j (halted
        ones frozen, as in the full pass) -> logits (B, V) and the cache with position j."""
        self_mask = (jnp.arange(cache.shape[2]) <= j)[None, None, None, :]
        s0 = self.embed(tok[:, None]) * math.sqrt(self.cfg.d_model)  # (B, 1, d)
        out, aux = self.recur(lambda s, p_t, c: self.dec_block(s, p_t, enc, self_mask, src_mask,
                                                               c, j),
                              self.dec_halting, s0, j, cache)
        return self.head(out[:, 0]), aux["cache"]

    def recur(self, block, halting, h0, offset=0, cache=None):
        """T steps of the tied `block` with per-position ACT ([1] Sec. 2.2, [2]); block(h, P^t,
        cache_t) -> (H^t, cache_t), cache (T, ...) or None."""
        c = self.cfg
        b, length, _ = h0.shape
        if self.is_initializing():  # create the parameters outside the scan
            halting(block(h0, 0.0, None)[0])

        def step(carry, xs):
            (h, cum_h, halted, acc, steps, rem), (t, cache_t) = carry, xs
            p_t = coordinate_embedding(length, t, c.d_model, c.coords, offset)
            new, cache_t = block(h, jnp.broadcast_to(p_t, h.shape), cache_t)  # H^t
            if not c.act:
                p = jnp.full_like(cum_h, t == c.max_steps)  # all weight on H^T
                return (new, cum_h, halted, new, steps + 1, rem), (p, new, cache_t)
            hp = halting(new)  # h_i^t
            running = ~halted
            # [2] Eq. 10: halt at the first t with sum_{t'<=t} h >= 1 - eps, or at t = T
            stop = running & ((cum_h + hp >= 1.0 - c.eps) | (t == c.max_steps))
            # [2] Eq. 11-12: p = h before the halting step, R = 1 - sum_{t'<N} h at it
            p = jnp.where(stop, 1.0 - cum_h, jnp.where(running, hp, 0.0))
            acc = acc + p[..., None] * new  # mean field sum_t p^t H^t
            h = jnp.where(running[..., None], new, h)  # halted positions stay frozen
            steps = steps + running.astype(jnp.int32)
            rem = jnp.where(stop, 1.0 - cum_h, rem)
            cum_h = jnp.where(running & ~stop, cum_h + hp, cum_h)
            return (h, cum_h, halted | stop, acc, steps, rem), (p, h, cache_t)

        zeros = jnp.zeros((b, length))
        init = (h0, zeros, jnp.zeros((b, length), bool), jnp.zeros_like(h0),
                jnp.zeros((b, length), jnp.int32), jnp.ones((b, length)))
        (_, _, _, out, steps, rem), (p, states, cache) = jax.lax.scan(
            step, init, (jnp.arange(1, c.max_steps + 1), cache))
        return out, {"steps": steps, "remainder": rem, "p": p, "states": states, "cache": cache}


def source_mask(x):
    """Keys the encoder and the cross-attention may read: the non-PAD positions."""
    return (x != PAD)[:, None, None, :]  # (B, 1, 1, L)


def greedy_decode(params, x, cfg: Config, y_in=None, cross_scale=None):
    """Decode position by position with the per-step cache of UT.decode_step (each position
    runs its T steps once): logits (B, L + 1, V). The input at j + 1 is the argmax at j
    (greedy) or y_in[:, j + 1] if given (teacher forcing through the cache, for the test).
    The encoder-only model returns its logits (B, L, V)."""
    model = UT(cfg, cross_scale)
    if cfg.model == "encoder":
        return model.apply(params, x)[0]
    enc, _ = model.apply(params, x, method=UT.encode)
    mask = source_mask(x)
    b, length = x.shape
    vocab = cfg.vocab + NUM_SPECIAL

    def position(j, carry):
        tok, cache, logits = carry
        logit, cache = model.apply(params, tok, j, cache, enc, mask, method=UT.decode_step)
        tok = logit.argmax(-1) if y_in is None else y_in[:, jnp.minimum(j + 1, length)]
        return tok, cache, logits.at[:, j].set(logit)

    init = (jnp.full((b,), BOS), jnp.zeros((cfg.max_steps, b, length + 1, cfg.d_model)),
            jnp.zeros((b, length + 1, vocab)))
    return jax.lax.fori_loop(0, length + 1, position, init)[2]


# --- LOSS ---


def ponder_cost(aux, mask):
    """[2] Eq. 16: rho = N + R averaged over the positions in mask; N has no gradient."""
    rho = jax.lax.stop_gradient(aux["steps"].astype(jnp.float32)) + aux["remainder"]
    return jnp.sum(rho * mask) / jnp.sum(mask)


def loss_fn(params, batch, cfg: Config, offset=0, cross_scale=None):
    x, y_in, y_out, n = batch
    logits, aux = UT(cfg, cross_scale).apply(params, x, y_in, offset)
    y, mask = targets(cfg, y_out, n)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    nll = jnp.sum(ce * mask) / jnp.sum(mask)  # teacher forcing: -log p(y_j | y_<j, x)
    ponder = ponder_cost(aux["enc"], x != PAD)
    if cfg.model == "enc_dec":
        ponder = ponder + ponder_cost(aux["dec"], mask)
    loss = nll + (cfg.tau * ponder if cfg.act else 0.0)  # L = L_task + tau * rho
    correct = (logits.argmax(-1) == y) | ~mask
    return loss, {"losses/nll": nll, "losses/ponder": ponder,
                  "charts/accuracy": jnp.sum(correct & mask) / jnp.sum(mask),
                  "charts/sequence_accuracy": correct.all(-1).mean(),
                  "charts/bits_per_token": data.bits(nll),
                  "charts/ponder_steps": jnp.sum(aux["enc"]["steps"] * (x != PAD))
                  / jnp.sum(x != PAD)}  # mean N over the source symbols


# --- UPDATE ---


@struct.dataclass
class State:
    params: dict
    opt_state: optax.OptState
    key: jax.Array
    step: jax.Array
    cross: jax.Array
    """() float: scales the decoder's cross-attention term, 1 from init; traced, so that one
    compiled program can train seeds cut off from the source (0: the tests' broken variant)"""


def make_optimizer(cfg: Config):
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), optax.adam(cfg.lr))


def init(key, cfg: Config) -> State:
    key, k = jax.random.split(key)
    x, y_in, _, _ = string_batch(k, 1, cfg.length, cfg.length, cfg.vocab, cfg.task)
    params = UT(cfg).init(k, x, y_in)
    return State(params, make_optimizer(cfg).init(params), key, jnp.zeros((), jnp.int32),
                 jnp.ones(()))


def update(state: State, cfg: Config):
    key, k, k_off = jax.random.split(state.key, 3)
    batch = string_batch(k, cfg.batch_size, 1, cfg.length, cfg.vocab, cfg.task)
    # [1] Sec. 3.4 [mem]: positions start at a random offset (per string, shared by the
    # encoder and the decoder) so that the positions of longer test strings are seen
    offset = jax.random.randint(k_off, (cfg.batch_size,), 0, cfg.random_offset + 1)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, cfg,
                                                                      offset, state.cross)
    upd, opt_state = make_optimizer(cfg).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, upd)
    metrics = {"losses/loss": loss, **metrics, "charts/grad_norm": optax.tree.norm(grads)}
    return State(params, opt_state, key, state.step + 1, state.cross), metrics


def evaluate(state: State, cfg: Config):
    """Greedy-decoded token and sequence accuracy on fixed held-out strings of the training
    lengths 1..length and (prefix long_) of the longer lengths length+1..eval_length; the
    teacher-forced loss and mean encoder ponder steps at the training lengths."""
    out = {}
    ranges = [("", 1, cfg.length)]
    if cfg.eval_length > cfg.length:
        ranges.append(("long_", cfg.length + 1, cfg.eval_length))
    for prefix, lo, hi in ranges:
        batch = string_batch(jax.random.PRNGKey(12345), cfg.eval_size, lo, hi, cfg.vocab,
                             cfg.task)
        y, mask = targets(cfg, batch[2], batch[3])
        correct = (greedy_decode(state.params, batch[0], cfg, cross_scale=state.cross
                                 ).argmax(-1) == y) | ~mask
        out[f"eval/{prefix}accuracy"] = jnp.sum(correct & mask) / jnp.sum(mask)
        out[f"eval/{prefix}sequence_accuracy"] = correct.all(-1).mean()
        if not prefix:
            _, m = loss_fn(state.params, batch, cfg, cross_scale=state.cross)
            out.update({"eval/loss": m["losses/nll"], "eval/ponder_steps":
                        m["charts/ponder_steps"]})
    return out


# --- MAIN ---


def main(argv=None):
    return run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                    doc=__doc__, summary_keys=["eval/sequence_accuracy",
                                               "eval/long_sequence_accuracy", "eval/accuracy",
                                               "eval/long_accuracy", "eval/loss",
                                               "eval/ponder_steps", "losses/loss"])


if __name__ == "__main__":
    main()
