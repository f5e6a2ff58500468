"""Deep character transformer with auxiliary losses (T64).

[1] R. Al-Rfou, D. Choe, N. Constant, M. Guo, L. Jones. "Character-Level Language Modeling
    with Deeper Self-Attention." AAAI 2019, arXiv:1808.04444.
[2] L. Weng. "The Transformer Family" (2020), section "Deep Transformer with auxiliary losses".

A stack of N causal self-attention layers reads a fixed window of L characters (no state is
carried between batches) and predicts upcoming characters. Training a very deep stack is
made possible by three auxiliary losses ([1] Sec. "Auxiliary Losses"):

    LM:             Pr(t_{0:L}) = Pr(t_0) prod_i Pr(t_i | t_{0:i-1}); causal attention
    attention:      softmax(Q K^T / sqrt(d_k) + M) V,  M_ij = 0 if j <= i else -inf
    (1) multiple positions: every position i predicts t_{i+1}, not only the last one
    (2) intermediate layers: layer l (1..N) has its own classifier; its loss is dropped
        once the training progress passes l / (2N), i.e. w_l(s) = [s < l/(2N) * S] for
        l < N and w_N = 1 (all intermediate losses are gone half-way through training)
    (3) multiple targets: position i also predicts t_{i+k}, k = 2..K, with a separate
        classifier per k; these auxiliary targets are weighted 0.5
    loss(s) = sum_l w_l(s) * [CE_{l,1} + 0.5 * sum_{k=2..K} CE_{l,k}]
    CE_{l,k} = mean over batch and positions of -log p_{l,k}(t_{i+k} | t_{0..i})
    positions: a separate learned positional embedding is added to the input of EVERY
    layer (N x L x d parameters), not only to the character embedding
    bits/char = CE_{N,1} / ln 2 (the last layer's next-character loss)

Paper model "T64": 64 layers, d = 512, feed-forward 2048, 8 heads, context 512, dropout
0.55, momentum optimiser (0.99) with a fixed learning rate 0.003, batch 16; ~235M
parameters, which matches per-layer positional embeddings plus a classifier per layer and
target (64 * 3.1M + 64*512*512 + 64*2*512*256); 1.06 bits/char on enwik8, 1.13 on text8
after ~2.5M steps (175 h on one TPU v2).

Reproduce (CPU demo on the pydoc reference-manual topics, 2 shared cores):
    python transformers/char_transformer.py --preset quick
  measured: val 2.86 bits/char (1.99 nats/char) after 600 updates of 16 x 64 chars with an
  8-layer d=64 model; 2.0k chars/s, 5.6 min wall-clock (34 s compile) on 2 CPU cores
  shared with other jobs (load ~25); the add-0.1 bigram baseline of the split is 3.34.
Paper scale (GPU/TPU; the preset keeps the offline pydoc corpus, so it traces on CPU):
    python transformers/char_transformer.py --preset paper
  on [1]'s corpora, downloaded by hand (common.data.REAL_CORPORA; nothing is fetched):
    python transformers/char_transformer.py --preset paper --corpus text8 --data-dir DIR
    python transformers/char_transformer.py --preset paper --corpus enwik8 --data-dir DIR
  DIR holds the file text8 or enwik8; the held-out tail of val_fraction 0.1 is then the
  official 5M valid + 5M test characters (the 90M / 5M / 5M split), evaluated together.

Differences from the paper:
- Data: by default the pydoc reference-manual topics (~465k chars, shipped with Python) or
  the stdlib sources, last 10% held out; enwik8/text8 only with --data-dir (above), where
  the held-out text is valid + test together (the paper reports test alone).
- Blocks are pre-LayerNorm (LN -> sublayer -> residual) with a LayerNorm before each
  classifier; the paper follows the tensor2tensor transformer, whose exact norm placement
  we do not reproduce. Dropout is applied to attention outputs, FF outputs and embeddings.
- The intermediate-loss schedule uses the configured number of updates as "training"
  (a --num-updates override of the runner does not change it). Losses of all active
  layers are summed, not averaged (the paper gives no normaliser).
- Evaluation averages the next-character loss over all positions of fixed validation
  windows (early positions see less context); the paper evaluates every character with a
  full context of 512, one window per character, which costs L times more.
- The quick preset uses Adam with a short warm-up instead of momentum 0.99 at a fixed rate.
- Hyperparameters marked from memory (heads 8, 2.5M steps, dropout 0.55) were not checked
  against the paper's text.
"""

import dataclasses
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
    """Deep causal character transformer; defaults are [1]'s T64."""

    corpus: str = "pydoc"
    """text of common.data.char_corpus: pydoc, stdlib, this, or a real corpus of
    common.data.REAL_CORPORA read from data_dir ([1]: enwik8, text8)"""
    data_dir: str | None = None
    """folder of a real corpus when `corpus` names one: common.data.REAL_CORPORA"""
    val_fraction: float = 0.1
    """last fraction of the text held out for validation"""
    seq_len: int = 512
    """context length L (characters per window)"""
    num_layers: int = 64
    """transformer layers N"""
    d_model: int = 512
    """hidden size"""
    num_heads: int = 8
    """attention heads"""
    d_ff: int = 2048
    """feed-forward inner size"""
    dropout: float = 0.55
    """dropout rate on embeddings, attention and feed-forward outputs"""
    num_targets: int = 2
    """K: each position predicts t_{i+1} .. t_{i+K} (1 turns multiple targets off)"""
    aux_target_weight: float = 0.5
    """weight of the auxiliary targets k >= 2"""
    multiple_positions: bool = True
    """predict at every position (False: only the last position of the window predicts)"""
    intermediate_losses: bool = True
    """give every layer a classifier and a scheduled loss (False: only the last layer)"""
    intermediate_stop: float = 0.5
    """layer l's loss is dropped after (l/N) * intermediate_stop of training (0.5: l/(2N))"""
    per_layer_positions: bool = True
    """add a learned positional embedding at every layer's input (False: only at layer 1)"""
    batch_size: int = 16
    """windows per update"""
    total_steps: int = 2_500_000
    """number of updates (also sets the intermediate-loss schedule)"""
    optimizer: str = "momentum"
    """momentum (heavy-ball SGD) or adam"""
    lr: float = 0.003
    """learning rate (constant after warm-up)"""
    momentum: float = 0.99
    """momentum of the momentum optimiser"""
    warmup_steps: int = 0
    """linear learning-rate warm-up updates"""
    eval_windows: int = 64
    """validation windows evaluated by evaluate() (a multiple of batch_size)"""

    @property
    def num_updates(self) -> int:
        return self.total_steps

    @property
    def steps_per_update(self) -> int:
        return self.batch_size * self.seq_len  # tokens per update

    def validate(self):
        for name in (
            "seq_len",
            "num_layers",
            "d_model",
            "num_heads",
            "d_ff",
            "num_targets",
            "batch_size",
            "total_steps",
            "eval_windows",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}"
            )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction} must be in (0, 1)")
        if self.optimizer not in ("momentum", "adam"):
            raise ValueError(f"optimizer={self.optimizer!r} must be 'momentum' or 'adam'")
        if self.eval_windows % self.batch_size:
            raise ValueError(
                f"eval_windows={self.eval_windows} is not a multiple of "
                f"batch_size={self.batch_size}"
            )
        if self.intermediate_stop < 0 or self.aux_target_weight < 0:
            raise ValueError("intermediate_stop and aux_target_weight must be >= 0")
        if self.corpus in data.REAL_CORPORA and self.data_dir is None:
            data.text_corpus(self.corpus)  # text_corpus's ValueError: pass data_dir


PRESETS = {
    # CPU demo: 8 layers of d=64, context 64, Adam; minutes on 2 cores.
    "quick": dict(
        seq_len=64,
        num_layers=8,
        d_model=64,
        num_heads=4,
        d_ff=256,
        dropout=0.0,
        total_steps=600,
        optimizer="adam",
        lr=2e-3,
        warmup_steps=50,
        eval_windows=128,
    ),
    "paper": dict(),
}


@functools.cache
def corpus(name: str, val_fraction: float, data_dir: str | None = None):
    """(train ids, val ids) as numpy uint8 (uint16 above 256 symbols) and the vocabulary
    size; loaded once. `init` puts them in the State, so they enter the compiled chunks as
    an input, not as a constant of each program; `windows` casts to int32 after the gather."""
    train, val, vocab = data.char_corpus(name, val_fraction, data_dir=data_dir)
    dtype = np.uint8 if len(vocab) <= 256 else np.uint16
    return train.astype(dtype), val.astype(dtype), len(vocab)


def windows(ids, starts, length: int):
    """(B, length) int32 slices of ids (stored uint8/uint16) starting at `starts`."""
    w = jax.vmap(lambda s: jax.lax.dynamic_slice(ids, (s,), (length,)))(starts)
    return w.astype(jnp.int32)


# --- NETWORKS ---


def attention(q, k, v, causal: bool = True):
    """softmax(q k^T / sqrt(d_k) + M) v over (B, H, L, d_k); M masks j > i (Eq. of [2])."""
    logits = jnp.einsum("bhid,bhjd->bhij", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    if causal:
        L = q.shape[-2]
        mask = jnp.tril(jnp.ones((L, L), bool))
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bhij,bhjd->bhid", probs, v)


class SelfAttention(nn.Module):
    num_heads: int
    causal: bool = True

    @nn.compact
    def __call__(self, x):
        B, L, d = x.shape
        qkv = nn.Dense(3 * d, name="qkv")(x).reshape(B, L, 3, self.num_heads, -1)
        q, k, v = jnp.moveaxis(qkv, (2, 3), (0, 2))  # each (B, H, L, d/H)
        y = attention(q, k, v, self.causal)
        y = jnp.moveaxis(y, 1, 2).reshape(B, L, d)  # (B, L, d)
        return nn.Dense(d, name="out")(y)


class Layer(nn.Module):
    """Pre-LN block with its own learned positional embedding added to its input."""

    cfg: Config
    add_positions: bool
    causal: bool = True

    @nn.compact
    def __call__(self, x, train: bool):
        cfg, L = self.cfg, x.shape[1]
        if self.add_positions:  # [1] "Positional Embeddings": one table per layer
            pos = self.param("pos", nn.initializers.normal(0.02), (cfg.seq_len, cfg.d_model))
            x = x + pos[:L]
        drop = nn.Dropout(cfg.dropout, deterministic=not train)
        x = x + drop(SelfAttention(cfg.num_heads, self.causal)(nn.LayerNorm()(x)))
        h = nn.relu(nn.Dense(cfg.d_ff)(nn.LayerNorm()(x)))
        return x + drop(nn.Dense(cfg.d_model)(h))


class CharTransformer(nn.Module):
    """Returns logits (N_heads, K, B, L, V): for every layer with a classifier (all N with
    intermediate losses, else the last) and every target offset k = 1..K."""

    cfg: Config
    vocab: int
    causal: bool = True  # False: the broken variant used by the leak test

    @nn.compact
    def __call__(self, tokens, train: bool = False):
        cfg = self.cfg
        x = nn.Embed(self.vocab, cfg.d_model, embedding_init=nn.initializers.normal(0.02))(tokens)
        x = nn.Dropout(cfg.dropout, deterministic=not train)(x)
        outs = []
        for l in range(cfg.num_layers):
            add_pos = cfg.per_layer_positions or l == 0
            x = Layer(cfg, add_pos, self.causal, name=f"layer_{l}")(x, train)
            if cfg.intermediate_losses or l == cfg.num_layers - 1:
                h = nn.LayerNorm(name=f"ln_out_{l}")(x)
                # [1] multiple targets: a separate classifier per target offset k
                outs.append(
                    jnp.stack(
                        [
                            nn.Dense(self.vocab, name=f"head_{l}_{k}")(h)
                            for k in range(1, cfg.num_targets + 1)
                        ]
                    )
                )
        return jnp.stack(outs)  # (N_heads, K, B, L, V)


# --- LOSS ---


def layer_weights(step, cfg: Config):
    """w_l(step) for l = 1..N ([1] "Intermediate Layer Losses"): layer l < N contributes
    while step < (l/N) * intermediate_stop * total_steps; the last layer always does.
    Returns (N_heads,) float32 aligned with the model's stacked heads."""
    N = cfg.num_layers
    if not cfg.intermediate_losses:
        return jnp.ones((1,), jnp.float32)
    l = jnp.arange(1, N + 1)
    stop = l / N * cfg.intermediate_stop * cfg.total_steps  # l/(2N) of training for 0.5
    return jnp.where((step < stop) | (l == N), 1.0, 0.0).astype(jnp.float32)


def target_weights(cfg: Config):
    """c_k: 1 for the next character, aux_target_weight for k >= 2 ([1] "Multiple Targets")."""
    return jnp.array([1.0] + [cfg.aux_target_weight] * (cfg.num_targets - 1), jnp.float32)


def cross_entropies(logits, window, cfg: Config):
    """CE_{l,k}: (N_heads, K) mean next-k-character NLL in nats. `window` is (B, L + K):
    inputs window[:, :L]; target of offset k at position i is window[:, i + k]."""
    L, K = cfg.seq_len, cfg.num_targets
    targets = jnp.stack([window[:, k : k + L] for k in range(1, K + 1)])  # (K, B, L)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[None, ..., None], axis=-1)[..., 0]  # (N,K,B,L)
    if not cfg.multiple_positions:  # [1] Fig. 1: only the last position predicts
        nll = nll[..., -1:]
    return nll.mean(axis=(-2, -1))


def total_loss(ce, step, cfg: Config):
    """loss = sum_l w_l(step) * sum_k c_k * CE_{l,k}."""
    return jnp.sum(layer_weights(step, cfg)[:, None] * target_weights(cfg)[None] * ce)


def plain_loss(logits, window, cfg: Config):
    """[1] Fig. 1's plain setting from the same logits: only the last position of the last
    layer predicts (the next character): -log p_{N,1}(t_L | t_{0..L-1}), batch mean."""
    plain = dataclasses.replace(cfg, num_targets=1, multiple_positions=False)
    return cross_entropies(logits[-1:, :1], window[:, : cfg.seq_len + 1], plain)[0, 0]


# --- STATE ---


@struct.dataclass
class State:
    params: Any
    opt_state: Any
    key: jax.Array
    step: jax.Array
    aux_losses: jax.Array
    """1, traced: 0 trains on plain_loss instead (the auxiliary heads then get no gradient),
    so one program can also run [1] Fig. 1's plain setting"""
    train_ids: jax.Array
    """(T,) uint8 training ids (corpus()): an input of the compiled chunks, not a constant;
    one copy per seed (pydoc 0.4 MB, stdlib 11 MB)"""
    val_ids: jax.Array
    """(T_val,) uint8 validation ids, read by evaluate"""


def optimizer(cfg: Config):
    sched = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
    if cfg.optimizer == "adam":
        return optax.adam(sched)
    return optax.sgd(sched, momentum=cfg.momentum)


def init(key, cfg: Config) -> State:
    train_ids, val_ids, vocab = corpus(cfg.corpus, cfg.val_fraction, cfg.data_dir)
    k_init, key = jax.random.split(key)
    model = CharTransformer(cfg, vocab)
    params = model.init(k_init, jnp.zeros((1, cfg.seq_len), jnp.int32))
    return State(
        params,
        optimizer(cfg).init(params),
        key,
        jnp.zeros((), jnp.int32),
        jnp.ones((), jnp.int32),
        jnp.asarray(train_ids),
        jnp.asarray(val_ids),
    )


# --- UPDATE ---


def update(state: State, cfg: Config):
    _, _, vocab = corpus(cfg.corpus, cfg.val_fraction, cfg.data_dir)
    train_ids = state.train_ids
    model = CharTransformer(cfg, vocab)
    key, k_data, k_drop = jax.random.split(state.key, 3)
    n = cfg.seq_len + cfg.num_targets
    starts = jax.random.randint(k_data, (cfg.batch_size,), 0, train_ids.shape[0] - n)
    window = windows(train_ids, starts, n)  # (B, L + K)

    def loss_fn(params):
        logits = model.apply(params, window[:, : cfg.seq_len], train=True, rngs={"dropout": k_drop})
        ce = cross_entropies(logits, window, cfg)
        loss = jnp.where(
            state.aux_losses > 0, total_loss(ce, state.step, cfg), plain_loss(logits, window, cfg)
        )
        return loss, ce

    (loss, ce), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    upd, opt_state = optimizer(cfg).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, upd)
    metrics = {
        "losses/loss": loss,
        "losses/next_char": ce[-1, 0],
        "charts/bits_per_char": data.bits(ce[-1, 0]),
        "charts/active_layers": layer_weights(state.step, cfg).sum(),
        "charts/grad_norm": optax.tree.norm(grads),
    }
    return state.replace(params=params, opt_state=opt_state, key=key, step=state.step + 1), metrics


def evaluate(state: State, cfg: Config):
    """Last layer's next-character loss on `eval_windows` evenly spaced validation windows."""
    _, _, vocab = corpus(cfg.corpus, cfg.val_fraction, cfg.data_dir)
    val_ids = state.val_ids
    model = CharTransformer(cfg, vocab)
    n = cfg.seq_len + 1
    starts = jnp.linspace(0, val_ids.shape[0] - n - 1, cfg.eval_windows).astype(jnp.int32)

    def chunk(s):
        w = windows(val_ids, s, n)
        logits = model.apply(state.params, w[:, :-1])[-1, 0]  # last layer, k = 1
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(logp, w[:, 1:, None], axis=-1)[..., 0].mean()

    loss = jax.lax.map(chunk, starts.reshape(-1, cfg.batch_size)).mean()
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
        summary_keys=["val_loss", "val_bits_per_char", "charts/bits_per_char", "losses/loss"],
    )


if __name__ == "__main__":
    main()
