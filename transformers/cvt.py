"""Cross-View Training (CVT): semi-supervised sequence tagging where auxiliary prediction
modules that see restricted views of the input learn to match the full model's predictions
on unlabelled sentences, improving the shared biLSTM encoder.

[1] K. Clark, M.-T. Luong, C. D. Manning, Q. V. Le. "Semi-Supervised Sequence Modeling with
    Cross-View Training." EMNLP 2018, arXiv:1809.08370. Released code: tensorflow/models
    research/cvt_text (base/configure.py, model/encoder.py, model/multitask_model.py,
    task_specific/word_level/tagging_module.py, training/trainer.py; read for the details).
[2] L. Weng. "Generalized Language Models" (2019), section "Cross-View Training".

    encoder: x_i -> embedding -> biLSTM layer 1 (->h_1, <-h_1) -> biLSTM layer 2 on
      h_1 = [->h_1; <-h_1], giving h_2; dropout on the embeddings and every LSTM output
    primary   p(y_i|x) = softmax(W ReLU(W' [h_1^(i); h_2^(i)]) + b)                [2] Eq. (p)
    auxiliaries on FIRST-layer states                                          [2] Eq. (aux)
      p^fwd(y_i|x)    = NN^fwd(->h_1^(i))        sees x_<=i
      p^bwd(y_i|x)    = NN^bwd(<-h_1^(i))        sees x_>=i
      p^future(y_i|x) = NN^future(->h_1^(i-1))   sees x_<i
      p^past(y_i|x)   = NN^past(<-h_1^(i+1))     sees x_>i
      (+ the released code's "full" module: W' [h_1; h_2] -> W without the ReLU, reading the
      student pass's dropped-out states)
    labelled batch:   L_sup = CE(y, p(.|x)) (label smoothing 0.1), updates encoder + primary
    unlabelled batch: L_CVT = sum_j CE(stop_gradient(p(.|x) without dropout), p^j(.|x) with
      dropout), updates encoder + auxiliaries; the primary module is frozen        [1] Eq. 1-2
    steps alternate labelled / unlabelled (trainer.py); SGD with momentum 0.9, global-norm
    clip 1.0, lr_t = 0.5 min(t, 5000) / 5000 / (1 + 0.005 sqrt(t)) (multitask_model.py)

One `update` = one labelled step then one unlabelled step of the CVT model (two optimiser
steps, the released trainer's alternation, no host round trip and no branch), and one
labelled step of a supervised-only twin (the released code's is_semisup=False) on the SAME
labelled batch and dropout key, vmapped with the CVT arm's labelled step. Both arms start
from the same initial weights, so they differ only by L_CVT: paired on seeds.

Data (procedural): a hidden Markov model whose hidden states are the tags. Sparse
transitions (Dirichlet(0.1) rows), Zipfian emissions with a home tag per word plus an
ambiguous share of every tag's mass spread over all words, so the tag of a word often needs
context. 50 labelled, 5,000 unlabelled, 1,000 held-out and 500 dev sequences of 20 words,
each wrapped in start/end tokens (masked, as the released minibatching does). The ceiling is
exact: the Bayes tagger argmax_k p(y_i = k | x_1..T) by forward-backward, scored on the
held-out set; the floors: the majority tag and the word-only Bayes tagger argmax_k p(y_i =
k) p(x_i | y_i = k), which knows the true emissions but no context.

Reproduce (CPU demo, 2 seeds):
    python transformers/cvt.py --preset quick --num-seeds 2 --plot transformers/cvt.png
  Measured (2 seeds, loaded 2-core CPU at load ~20: 91 s compile + 381 s for the 1000
  updates): held-out token accuracy CVT 0.923 / 0.921 vs supervised only 0.883 / 0.884,
  Bayes tagger 0.964 (expected 0.961); majority tag 0.844, word-only Bayes tagger 0.926
  (above both learned arms: at this scale neither has learnt the emissions as well as the
  true HMM gives them); on the 15% of held-out tokens whose word never occurs in the 50
  labelled sequences, CVT 0.822 / 0.812 vs 0.727 / 0.724. Best-of-run on the dev split
  ([1]'s model selection; best 50-update window of the logged dev-batch accuracy): CVT
  0.925 / 0.921 vs 0.884 / 0.887. Plot: transformers/cvt.png.
Paper scale (GPU; [1]'s encoder sizes and optimiser on the same HMM task):
    python transformers/cvt.py --preset paper
[1] Table 1: CVT + multi-task: 92.61 F1 on CoNLL-2003 NER (the single-task CVT row is lower;
  [M: recalled, per NLP-progress and paperswithcode, not checked against the table]). "CVT
  beats the supervised-only model on all tasks" is the ICLR 2018 version's abstract
  (OpenReview BJubPWZRW) [M: not checked].

Differences from the paper:
- Data: a synthetic HMM tagging task instead of CoNLL/OntoNotes/WSJ with 1B Word unlabelled
  text; words are HMM symbols, so there is no character CNN (the released encoder
  concatenates a char CNN of widths 2, 3, 4 x 100 filters to GloVe 300-d vectors) and the
  word embeddings are trained from random init (no GloVe, no emb_scale variable).
- Fixed-length sentences (no length buckets); minibatches drawn at random instead of
  epochs (labelled: a random order of the set, cycled when the batch exceeds it, so the
  paper preset's batch of 64 repeats 14 of the 50 labelled sequences where the released
  get_minibatches gives one batch of all 50; unlabelled: with replacement).
- One task only: the multi-task variant (several primary heads, task sampled with
  probability ~ sqrt(train size), L_CVT summed over tasks) is not implemented.
- The supervised-only arm sees the same labelled batches (one step per update), so it takes
  half as many optimiser steps as the CVT arm; its lr schedule counts its own steps (as the
  released trainer's global_step counts only labelled steps with is_semisup=False).
- Model selection: [1] evaluates on dev every 500 steps and keeps the best checkpoint; here
  evaluate() scores the last moving-average weights, and every update logs both arms'
  accuracy on a random dev batch (charts/dev_acc, charts/dev_acc_sup) for a best-of-run.
- Small ones: the LSTM weights are glorot_uniform as TF's, but the prediction modules use
  flax's lecun_normal and the embeddings N(0, 1); the moving average is taken after each
  step (TF: before apply_gradients, via update_ops); the teacher's probabilities stay
  float32 (run_teacher casts them to float16).
"""

import functools
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from common import run

AUX = ("full", "fwd", "bwd", "future", "past")
"""auxiliary modules of the released tagging_module.py ("full" sees the whole input)"""

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """CVT [1]: model and optimiser defaults are the released base/configure.py's."""

    num_tags: int = 8
    """HMM hidden states = tags"""
    vocab_size: int = 800
    """HMM output symbols (words); start and end tokens are added"""
    seq_len: int = 20
    """words per sequence"""
    trans_concentration: float = 0.1
    """Dirichlet concentration of each transition row (small: sparse, context informative)"""
    ambiguity: float = 0.3
    """share of each tag's emission mass spread over all words (the rest on its own words)"""
    hmm_seed: int = 0
    """seed of the HMM and of the data sets (fixed across training seeds)"""
    num_labelled: int = 50
    """labelled training sequences"""
    num_unlabelled: int = 5000
    """unlabelled training sequences"""
    num_eval: int = 1000
    """held-out labelled sequences scored by evaluate()"""
    num_dev: int = 500
    """labelled dev sequences (a separate split): each update logs both arms' accuracy on a
    batch of them, the data for [1]'s best-dev model selection"""
    embed_dim: int = 300
    """word embedding size (GloVe 300 in [1])"""
    lstm1_size: int = 1024
    """LSTM cells per direction of the first biLSTM layer (unidirectional_sizes)"""
    lstm2_size: int = 512
    """LSTM cells per direction of the second biLSTM layer (bidirectional_sizes)"""
    projection_size: int = 512
    """LSTM output projection (min with the cells) and hidden size of every prediction module"""
    labelled_keep_prob: float = 0.5
    """1 - dropout on labelled batches"""
    unlabelled_keep_prob: float = 0.8
    """1 - dropout of the auxiliary (student) pass on unlabelled batches"""
    label_smoothing: float = 0.1
    """label smoothing of the labelled targets (none on the teacher's soft targets)"""
    lr: float = 0.5
    """base learning rate of SGD with momentum"""
    momentum: float = 0.9
    """momentum coefficient"""
    max_grad_norm: float = 1.0
    """global-norm gradient clipping (grad_clip)"""
    warm_up_steps: int = 5000
    """linear learning-rate warm-up, in optimiser steps"""
    lr_decay: float = 0.005
    """lr_t = lr min(t, warm_up) / warm_up / (1 + lr_decay sqrt(t))"""
    ema_decay: float = 0.998
    """decay of the exponential moving average of the weights"""
    ema_test: bool = True
    """evaluate with the moving-average weights"""
    batch_size: int = 64
    """sequences per labelled and per unlabelled batch (train_batch_size)"""
    total_updates: int = 200_000
    """updates (each: one labelled + one unlabelled CVT step); the released trainer has no
    end (it trains until stopped), so this is a choice"""
    dtype: str = "float32"
    """compute dtype of the matmuls: float32 or bfloat16 (parameters stay float32)"""

    @property
    def num_updates(self) -> int:
        return self.total_updates

    @property
    def steps_per_update(self) -> int:
        return 2 * self.batch_size * self.seq_len  # tokens seen by the CVT arm

    def validate(self):
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")
        for name in ("num_tags", "vocab_size"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 2")
        for name in ("seq_len", "embed_dim", "lstm1_size", "lstm2_size", "warm_up_steps",
                     "num_labelled", "num_unlabelled", "num_eval", "num_dev"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("labelled_keep_prob", "unlabelled_keep_prob"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in (0, 1]")
        for name in ("label_smoothing", "momentum", "ema_decay", "ambiguity"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if self.trans_concentration <= 0 or self.lr_decay < 0:
            raise ValueError(f"trans_concentration={self.trans_concentration} must be > 0 "
                             f"and lr_decay={self.lr_decay} >= 0")


PRESETS = {
    # CPU demo: 32-d embeddings, biLSTMs of 64 and 32 cells, modules of 32, 1000 updates
    "quick": dict(embed_dim=32, lstm1_size=64, lstm2_size=32, projection_size=32,
                  batch_size=32, warm_up_steps=100, ema_decay=0.99, total_updates=1000),
    "paper": dict(),
}

# --- DATA ---


@functools.cache
def hmm(num_tags: int, vocab_size: int, trans_concentration: float, ambiguity: float,
        hmm_seed: int):
    """(pi (K,), A (K, K), B (K, V)) as float64 numpy: A[k, l] = p(y_{i+1} = l | y_i = k),
    B[k, w] = p(x_i = w | y_i = k). Word w's home tag is w % K; within a tag the words are
    Zipfian (weight 1 / rank); a share `ambiguity` of every tag's mass follows the global
    Zipf law over all words."""
    rng = np.random.default_rng(hmm_seed)
    K, V = num_tags, vocab_size
    pi = rng.dirichlet(np.ones(K))
    A = rng.dirichlet(np.full(K, trans_concentration), size=K)
    zipf = 1.0 / (1 + np.arange(V) // K)
    own = np.where(np.arange(V)[None] % K == np.arange(K)[:, None], zipf[None], 0.0)
    B = (1 - ambiguity) * own / own.sum(1, keepdims=True) + ambiguity * zipf / zipf.sum()
    return pi, A, B


def hmm_of(cfg: Config):
    return hmm(cfg.num_tags, cfg.vocab_size, cfg.trans_concentration, cfg.ambiguity,
               cfg.hmm_seed)


@functools.cache
def datasets(num_tags, vocab_size, trans_concentration, ambiguity, hmm_seed, seq_len,
             num_labelled, num_unlabelled, num_eval, num_dev):
    """{"labelled", "unlabelled", "eval", "dev"}: (words (N, T + 2) int32 with BOS = V and EOS =
    V + 1 around T HMM words, tags (N, T + 2) int32, 0 at the start/end tokens)."""
    pi, A, B = hmm(num_tags, vocab_size, trans_concentration, ambiguity, hmm_seed)
    rng = np.random.default_rng(hmm_seed + 1)
    out = {}
    for name, n in (("labelled", num_labelled), ("unlabelled", num_unlabelled),
                    ("eval", num_eval), ("dev", num_dev)):
        y = np.zeros((n, seq_len), np.int64)
        y[:, 0] = (rng.random(n)[:, None] > np.cumsum(pi)[None]).sum(1)
        for i in range(1, seq_len):
            y[:, i] = (rng.random(n)[:, None] > np.cumsum(A[y[:, i - 1]], 1)).sum(1)
        u, x, cdf = rng.random((n, seq_len)), np.zeros((n, seq_len), np.int64), B.cumsum(1)
        for k in range(num_tags):  # inverse CDF per tag: x = #{w : cdf_k(w) < u}
            x[y == k] = np.searchsorted(cdf[k], u[y == k])
        x = np.minimum(x, vocab_size - 1)  # (cumsum rounding)
        words = np.concatenate([np.full((n, 1), vocab_size), x, np.full((n, 1), vocab_size + 1)],
                               1)
        tags = np.pad(np.minimum(y, num_tags - 1), ((0, 0), (1, 1)))
        out[name] = (words.astype(np.int32), tags.astype(np.int32))
    return out


def data_of(cfg: Config):
    return datasets(cfg.num_tags, cfg.vocab_size, cfg.trans_concentration, cfg.ambiguity,
                    cfg.hmm_seed, cfg.seq_len, cfg.num_labelled, cfg.num_unlabelled,
                    cfg.num_eval, cfg.num_dev)


def forward_backward(pi, A, B, x):
    """Posterior marginals p(y_i = k | x_1..T) (T, K) of one sequence x (T,) by the scaled
    forward-backward recursions: alpha_i = (alpha_{i-1} A) * B[:, x_i], beta_i =
    A (B[:, x_{i+1}] * beta_{i+1}), each normalised; posterior ~ alpha_i * beta_i."""
    e = B[:, x].T  # (T, K) emission likelihoods

    def fwd(a, e_i):
        a = (a @ A) * e_i
        return a / a.sum(), a / a.sum()

    a0 = pi * e[0]
    _, alphas = jax.lax.scan(fwd, a0 / a0.sum(), e[1:])
    alphas = jnp.concatenate([(a0 / a0.sum())[None], alphas])

    def bwd(b, e_next):
        b = A @ (e_next * b)
        return b / b.sum(), b / b.sum()

    ones = jnp.ones_like(pi) / pi.shape[0]
    _, betas = jax.lax.scan(bwd, ones, e[1:], reverse=True)
    betas = jnp.concatenate([betas, ones[None]])
    post = alphas * betas
    return post / post.sum(-1, keepdims=True)


# --- NETWORKS ---


def drop(x, keep: float, key):
    """Inverted dropout with keep probability `keep` (a Python float; 1.0: off)."""
    if keep >= 1.0:
        return x
    return jnp.where(jax.random.bernoulli(key, keep, x.shape), x / keep, 0).astype(x.dtype)


class BiLSTM(nn.Module):
    """Both directions of one biLSTM layer as ONE scan over a stacked direction axis (weights
    (2, ...): 0 forward, 1 backward on the reversed sequence). Each is a TF LSTMCell with
    num_proj = min(cells, projection) (model_helpers.py lstm_cell passes it always, so the
    projection exists even when it is square) and forget bias 1.0: i, f, g, o = W_x x_t +
    W_h r_{t-1} + b; c_t = sig(f + 1) c_{t-1} + sig(i) tanh(g); r_t = W_proj (sig(o)
    tanh(c_t)). (B, L, in) -> forward and backward outputs, each (B, L, proj)."""

    cells: int
    proj: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        n, p, dt = self.cells, self.proj, self.dtype
        glorot = nn.initializers.glorot_uniform(batch_axis=(0,))  # TF's default, per direction
        w_x = self.param("W_x", glorot, (2, x.shape[-1], 4 * n))
        b = self.param("b", nn.initializers.zeros, (2, 4 * n))
        w_h = self.param("W_h", glorot, (2, p, 4 * n))
        w_p = self.param("W_proj", glorot, (2, n, p))
        xs = jnp.stack([x, x[:, ::-1]]).astype(dt)  # (2, B, L, in)
        gx = jnp.einsum("dbli,dig->ldbg", xs, w_x.astype(dt)) + b[:, None].astype(dt)

        def step(carry, g_t):  # g_t (2, B, 4n)
            c, r = carry
            g_t = g_t + jnp.einsum("dbp,dpg->dbg", r.astype(dt), w_h.astype(dt))
            i, f, g, o = jnp.split(g_t, 4, axis=-1)
            c = (nn.sigmoid(f + 1.0) * c + nn.sigmoid(i) * jnp.tanh(g)).astype(jnp.float32)
            m = (nn.sigmoid(o) * jnp.tanh(c)).astype(dt)
            r = jnp.einsum("dbn,dnp->dbp", m, w_p.astype(dt)).astype(jnp.float32)
            return (c, r), r

        B = x.shape[0]
        zeros = (jnp.zeros((2, B, n), jnp.float32), jnp.zeros((2, B, p), jnp.float32))
        _, r = jax.lax.scan(step, zeros, gx)  # (L, 2, B, p)
        return r[:, 0].swapaxes(0, 1), r[::-1, 1].swapaxes(0, 1)


class Module(nn.Module):
    """A prediction module: softmax(W act(W' h) + b) as logits; act = ReLU or identity."""

    num_tags: int
    hidden: int
    relu: bool
    dtype: Any

    @nn.compact
    def __call__(self, h):
        h = nn.Dense(self.hidden, dtype=self.dtype, name="W1")(h)  # W' (project)
        h = nn.relu(h) if self.relu else h
        return nn.Dense(self.num_tags, dtype=self.dtype, name="W")(h).astype(jnp.float32)


class Tagger(nn.Module):
    """Embedding -> 2-layer biLSTM -> primary module on [h_1; h_2] and the auxiliary modules
    on first-layer states. Returns {module name: logits (B, L, K)}. `delta` (B, L, E), when
    given, is added to the embeddings (the tests' handle for per-position Jacobians)."""

    cfg: Config

    @nn.compact
    def __call__(self, words, key, keep: float, delta=None):
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        k = jax.random.split(key, 5)
        x = nn.Embed(cfg.vocab_size + 2, cfg.embed_dim, name="embed")(words)
        x = drop(x if delta is None else x + delta, keep, k[0])
        p1, p2 = min(cfg.lstm1_size, cfg.projection_size), min(cfg.lstm2_size,
                                                               cfg.projection_size)
        fw1, bw1 = BiLSTM(cfg.lstm1_size, p1, dt, name="lstm1")(x)
        fw1, bw1 = drop(fw1, keep, k[1]), drop(bw1, keep, k[2])
        h1 = jnp.concatenate([fw1, bw1], -1)
        fw2, bw2 = BiLSTM(cfg.lstm2_size, p2, dt, name="lstm2")(h1)
        fw2, bw2 = drop(fw2, keep, k[3]), drop(bw2, keep, k[4])
        h = jnp.concatenate([h1, fw2, bw2], -1)  # [h_1; h_2]
        zero = jnp.zeros_like(fw1[:, :1])
        views = {"primary": h, "full": h, "fwd": fw1, "bwd": bw1,
                 "future": jnp.concatenate([zero, fw1[:, :-1]], 1),  # ->h_1^(i-1)
                 "past": jnp.concatenate([bw1[:, 1:], zero], 1)}  # <-h_1^(i+1)
        return {name: Module(cfg.num_tags, cfg.projection_size, name != "full", dt,
                             name=name)(v) for name, v in views.items()}


def forward(params, words, key, keep: float, cfg: Config, delta=None):
    return Tagger(cfg).apply(params, words, key, keep, delta)


# --- LOSS ---


def masked_ce(logits, targets, mask):
    """Mean over the unmasked positions of CE(targets, softmax(logits)); targets (B, L, K)."""
    ce = -(targets * jax.nn.log_softmax(logits, -1)).sum(-1)
    return (ce * mask).sum() / jnp.maximum(mask.sum(), 1)


def token_mask(tags):
    """1 on the words, 0 on the start and end tokens (B, L)."""
    L = tags.shape[1]
    return jnp.broadcast_to((jnp.arange(L) > 0) & (jnp.arange(L) < L - 1),
                            tags.shape).astype(jnp.float32)


def labelled_loss(params, words, tags, key, cfg: Config):
    """[1] Eq. 1: CE of the primary module on labelled data (label smoothing, dropout on)."""
    out = forward(params, words, key, cfg.labelled_keep_prob, cfg)
    s = cfg.label_smoothing
    y = jax.nn.one_hot(tags, cfg.num_tags) * (1 - s) + s / cfg.num_tags
    mask = token_mask(tags)
    acc = ((out["primary"].argmax(-1) == tags) * mask).sum() / mask.sum()
    return masked_ce(out["primary"], y, mask), acc


def teacher(params, words, key, cfg: Config):
    """The primary module's soft targets p(y_i | x) with dropout OFF, as a constant."""
    return jax.lax.stop_gradient(jax.nn.softmax(forward(params, words, key, 1.0, cfg)["primary"]))


def view_masks(words):
    """Per auxiliary module, the positions where its view exists (B, L): the words, less the
    first word for future and the last for past (the released masked_ce_loss's rolled
    mask: their views there hold only the start / end token)."""
    m = token_mask(words)
    return {"full": m, "fwd": m, "bwd": m, "future": m * jnp.roll(m, 1, 1),
            "past": m * jnp.roll(m, -1, 1)}


def unlabelled_loss(params, words, key, cfg: Config):
    """[1] Eq. 2: L_CVT = sum_j CE(p_teacher, p^j) over the auxiliary modules j, on the
    positions where view j exists."""
    k_t, k_s = jax.random.split(key)
    target = teacher(params, words, k_t, cfg)
    out = forward(params, words, k_s, cfg.unlabelled_keep_prob, cfg)
    masks = view_masks(words)
    return sum(masked_ce(out[j], target, masks[j]) for j in AUX)


# --- STATE ---


ARMS = ("cvt", "sup")
"""the leading axis of every parameter tree in State: the CVT model, its supervised twin"""


@struct.dataclass
class State:
    params: Any
    """Tagger params stacked over ARMS (leading axis 2: CVT, supervised-only twin)"""
    mom: Any
    """momentum accumulators, same tree"""
    ema: Any
    """moving averages of the parameters, same tree"""
    key: jax.Array
    step: jax.Array
    """updates done (the CVT arm has taken 2 step optimiser steps, the supervised arm step)"""


def init(key, cfg: Config) -> State:
    """Both arms start from the SAME initial weights (one key), so they differ only by L_CVT."""
    k_p, key = jax.random.split(key)
    words = jnp.zeros((1, cfg.seq_len + 2), jnp.int32)
    p = Tagger(cfg).init(k_p, words, k_p, 1.0)
    params = jax.tree.map(lambda x: jnp.stack([x] * len(ARMS)), p)
    zeros = jax.tree.map(jnp.zeros_like, params)
    return State(params, zeros, params, key, jnp.zeros((), jnp.int32))


# --- UPDATE ---


def learning_rate(t, cfg: Config):
    """multitask_model.py _get_optimizer: lr min(t, w) / w / (1 + decay sqrt(t))."""
    t = t.astype(jnp.float32)
    return (cfg.lr * jnp.minimum(t, cfg.warm_up_steps) / cfg.warm_up_steps
            / (1 + cfg.lr_decay * jnp.sqrt(t)))


def sgd_step(params, mom, ema, grads, t, moving, cfg: Config):
    """One tf.train.MomentumOptimizer step after global-norm clipping: v <- m v + g,
    w <- w - lr_t v, on the modules named in `moving` only (the others, which get no
    gradient in this step, keep both weights and accumulators, as TF skips variables
    without a gradient); then the weights' moving average."""
    norm = jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads)))
    scale = jnp.minimum(1.0, cfg.max_grad_norm / jnp.maximum(norm, 1e-12))
    lr = learning_rate(t, cfg)
    new_p, new_v = {}, {}
    for name in params["params"]:
        p, v, g = params["params"][name], mom["params"][name], grads["params"][name]
        if name in moving:
            v = jax.tree.map(lambda v_, g_: cfg.momentum * v_ + scale * g_, v, g)
            p = jax.tree.map(lambda p_, v_: p_ - lr * v_, p, v)
        new_p[name], new_v[name] = p, v
    new_p, new_v = {"params": new_p}, {"params": new_v}
    d = cfg.ema_decay
    ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, new_p)
    return new_p, new_v, ema, norm


def labelled_step(params, mom, ema, words, tags, key, t, cfg: Config):
    """[1] Eq. 1 step: the encoder and the primary module move; the auxiliaries (no gradient
    from L_sup) keep weights and momenta. Returns (params, mom, ema, CE, train accuracy)."""
    (ce, acc), g = jax.value_and_grad(labelled_loss, has_aux=True)(params, words, tags, key,
                                                                    cfg)
    moving = [n for n in params["params"] if n not in AUX]  # encoder + primary
    params, mom, ema, _ = sgd_step(params, mom, ema, g, t, moving, cfg)
    return params, mom, ema, ce, acc


def unlabelled_step(params, mom, ema, words, key, t, cfg: Config):
    """[1] Eq. 2 step: the encoder and the auxiliaries move; the primary module (no gradient
    through the teacher) keeps weights AND momenta. Returns (params, mom, ema, L_CVT, grad
    norm)."""
    l_cvt, g = jax.value_and_grad(unlabelled_loss)(params, words, key, cfg)
    moving = [n for n in params["params"] if n != "primary"]  # encoder + auxiliaries
    params, mom, ema, norm = sgd_step(params, mom, ema, g, t, moving, cfg)
    return params, mom, ema, l_cvt, norm


def accuracy(params, words, tags, cfg: Config):
    """Token accuracy of the primary module (dropout off) and its hits (B, L)."""
    hit = forward(params, words, jax.random.PRNGKey(0), 1.0, cfg)["primary"].argmax(-1) == tags
    mask = token_mask(tags)
    return (hit * mask).sum() / mask.sum(), hit


def update(state: State, cfg: Config):
    data = data_of(cfg)
    words_l, tags_l = (jnp.asarray(a) for a in data["labelled"])
    words_d, tags_d = (jnp.asarray(a) for a in data["dev"])
    words_u = jnp.asarray(data["unlabelled"][0])
    key, k_l, k_u, k_lab, k_unl, k_d = jax.random.split(state.key, 6)
    # a random order of the labelled set, cycled when the batch is larger than the set
    idx = jax.random.permutation(k_l, cfg.num_labelled)[jnp.arange(cfg.batch_size)
                                                         % cfg.num_labelled]
    w_l, t_l = words_l[idx], tags_l[idx]
    w_u = words_u[jax.random.randint(k_u, (cfg.batch_size,), 0, cfg.num_unlabelled)]
    # both arms' labelled step in one vmapped program: the same batch and dropout key; the
    # CVT arm's step is optimiser step 2 t, the supervised twin's (no unlabelled steps) t
    t = 2 * state.step
    lab = functools.partial(labelled_step, words=w_l, tags=t_l, key=k_lab, cfg=cfg)
    P, M, E, ce, acc = jax.vmap(lab)(state.params, state.mom, state.ema,
                                     t=jnp.stack([t, state.step]))
    # then the CVT arm's unlabelled step (encoder + auxiliaries; the primary module frozen)
    arm0 = [jax.tree.map(lambda x: x[0], tree) for tree in (P, M, E)]
    *arm0, l_cvt, norm = unlabelled_step(*arm0, w_u, k_unl, t + 1, cfg)
    P, M, E = (jax.tree.map(lambda a, b: a.at[0].set(b), tree, new)
               for tree, new in zip((P, M, E), arm0, strict=True))
    # model selection data: both arms' dev-batch accuracy ([1] picks the best dev checkpoint)
    d = jax.random.randint(k_d, (cfg.batch_size,), 0, cfg.num_dev)
    dev, _ = jax.vmap(lambda p: accuracy(p, words_d[d], tags_d[d], cfg))(
        E if cfg.ema_test else P)
    metrics = {"losses/labelled": ce[0], "losses/unlabelled": l_cvt, "losses/labelled_sup": ce[1],
               "charts/train_acc": acc[0], "charts/train_acc_sup": acc[1],
               "charts/dev_acc": dev[0], "charts/dev_acc_sup": dev[1],
               "charts/lr": learning_rate(t, cfg), "charts/unlabelled_grad_norm": norm}
    return State(P, M, E, key, state.step + 1), metrics


def baselines(cfg: Config):
    """(majority-tag accuracy, word-only Bayes accuracy) on the held-out words, numpy: the
    labelled set's most frequent tag everywhere; argmax_k p(y_i = k) B[k, x_i] with the
    exact marginal p(y_i) = pi A^i (the best tagger that reads only the word itself)."""
    pi, A, B = hmm_of(cfg)
    (_, tags_l), (words, tags) = data_of(cfg)["labelled"], data_of(cfg)["eval"]
    majority = np.bincount(tags_l[:, 1:-1].ravel(), minlength=cfg.num_tags).argmax()
    prior = [pi]
    for _ in range(cfg.seq_len - 1):
        prior.append(prior[-1] @ A)
    x, y = words[:, 1:-1], tags[:, 1:-1]
    word_only = (np.stack(prior)[None] * B.T[x]).argmax(-1)  # (N, T)
    return (y == majority).mean(), (y == word_only).mean()


def evaluate(state: State, cfg: Config):
    """Held-out token accuracy of the primary module of each arm (moving-average weights
    when ema_test), overall and on the words never seen in the labelled set; the Bayes
    tagger's accuracy on the same tokens and its expected accuracy E[max_k p(y_i = k | x)];
    the majority-tag and word-only baselines (a tagger must beat both to use context)."""
    words, tags = (jnp.asarray(a) for a in data_of(cfg)["eval"])
    seen = np.zeros(cfg.vocab_size + 2, bool)
    seen[data_of(cfg)["labelled"][0]] = True
    unseen = token_mask(tags) * ~jnp.asarray(seen)[words]
    acc, hit = jax.vmap(lambda p: accuracy(p, words, tags, cfg))(
        state.ema if cfg.ema_test else state.params)
    res = {}
    for a, suffix in enumerate(("", "_sup")):
        res["val_acc" + suffix] = acc[a]
        res["val_acc_unseen" + suffix] = (hit[a] * unseen).sum() / jnp.maximum(unseen.sum(), 1)
    pi, A, B = (jnp.asarray(a, jnp.float32) for a in hmm_of(cfg))
    post = jax.vmap(lambda x: forward_backward(pi, A, B, x))(words[:, 1:-1])  # (N, T, K)
    res["bayes_acc"] = (post.argmax(-1) == tags[:, 1:-1]).mean()
    res["bayes_expected"] = post.max(-1).mean()
    res["majority_acc"], res["word_only_acc"] = (jnp.float32(a) for a in baselines(cfg))
    res["unseen_fraction"] = unseen.sum() / token_mask(tags).sum()
    return res


def plot(res, out: str) -> str:
    """Training losses (mean of seeds) and the held-out accuracies per seed against the
    Bayes ceiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.plot import save_png

    h, f = res.history, {k: np.asarray(v) for k, v in res.final.items()}
    fig, ax = plt.subplots(1, 2, figsize=(9.5, 3.6))
    for k, lab in (("losses/labelled", "CVT: labelled CE"),
                   ("losses/labelled_sup", "supervised only: labelled CE"),
                   ("losses/unlabelled", "CVT: unlabelled (sum of 5 modules)")):
        ax[0].plot(np.asarray(h[k]).mean(0), label=lab, lw=0.8)
    ax[0].set(xlabel="update", ylabel="loss", yscale="log", title="training losses")
    ax[0].legend(fontsize=8, loc="upper right")
    n = len(f["val_acc"])
    x = np.arange(n)
    for off, k, lab in ((-0.3, "val_acc_sup", "supervised only"), (-0.1, "val_acc", "CVT"),
                        (0.1, "val_acc_unseen_sup", "sup., unseen words"),
                        (0.3, "val_acc_unseen", "CVT, unseen words")):
        ax[1].bar(x + off, f[k], 0.2, label=lab)
    ax[1].plot([-0.5, n - 0.5], [f["bayes_acc"].mean()] * 2, "k--", label="Bayes (fwd-bwd)")
    ax[1].set(xlabel="seed", ylabel="held-out token accuracy", xticks=x, ylim=(0, 1),
              title=f"HMM tagging, {f['unseen_fraction'].mean():.0%} of tokens unseen")
    ax[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    """`--plot PNG` (this file's only extra flag) draws the losses and the accuracies."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=__doc__,
                   summary_keys=["val_acc", "val_acc_sup", "val_acc_unseen",
                                 "val_acc_unseen_sup", "bayes_acc", "bayes_expected",
                                 "majority_acc", "word_only_acc", "unseen_fraction"])
    if flags["--plot"] is not None:
        print(plot(res, flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
