"""ELMo: deep contextualised representations from a bidirectional LSTM language model, mixed
per task by learned softmax-normalised layer weights.

[1] M. E. Peters, M. Neumann, M. Iyyer, M. Gardner, C. Clark, K. Lee, L. Zettlemoyer.
    "Deep contextualized word representations." NAACL 2018, arXiv:1802.05365. Released
    code: github.com/allenai/bilm-tf (bin/train_elmo.py, bilm/training.py, bilm/elmo.py,
    read for the details below).
[2] L. Weng. "Generalized Language Models" (2019), section "ELMo".

    stage 1, the biLM on a token stream (x_1, ..., x_N):
      forward LM   p(x_1..x_N) = prod_k p(x_k | x_1..x_{k-1})                    [1] Eq. 1
      backward LM  p(x_1..x_N) = prod_k p(x_k | x_{k+1}..x_N)                    [1] Eq. 2
      maximise sum_k log p(x_k | x_<k; Th_x, ->Th_LSTM, Th_s)
                   + log p(x_k | x_>k; Th_x, <-Th_LSTM, Th_s)                     [1] Eq. 3
        (token representation Th_x and softmax Th_s are ONE set of parameters for both
        directions; the LSTMs are separate; bilm-tf minimises the mean of the two NLLs)
      token layer x_k^LM: char CNN (max-pooled convolutions over the token's characters,
        ReLU) -> 2 highway layers  y = t * relu(W_H y) + (1 - t) y, t = sigmoid(W_T y - 2)
        -> linear projection to 512                                             [1] Sec. 3.4
      each direction: 2 LSTM layers of 4096 cells with projections to 512, cell and
        projection clipped to [-3, 3], a residual connection from layer 1 to layer 2,
        dropout on every LSTM input and on the top output                       [1] Sec. 3.4
    stage 2, ELMo for a task: R_k = {x_k^LM, ->h_kj, <-h_kj | j = 1..L}, with
      h_k0 = [x_k^LM; x_k^LM],  h_kj = [->h_kj; <-h_kj]                          [1] Eq. (R_k)
      ELMo_k^task = gamma^task sum_{j=0..L} s_j^task h_kj, s^task = softmax(w)  [1] Eq. 1
      optional layer normalisation of each h_j before weighting                 [1] Sec. 3.2
      the task model gets [x_k; ELMo_k^task] (its own token embedding x_k) with dropout on
      ELMo and the loss + lambda ||w||^2                                          [1] Sec. 3.3
      the biLM's weights are frozen (stop-gradient)                             [1] Sec. 3.3

One run holds both stages: updates 0 .. pretrain_steps-1 train the biLM on windows of the
corpus (Adagrad as in bilm-tf); the next finetune_steps train the task model with the biLM
frozen. Two task heads train side by side on the same batches: the ELMo one on [x_k;
ELMo_k] and the baseline on [x_k] alone (the same task model "without ELMo", [1] Table 1),
so every run reports the gain. --pretrain-steps 0 gives ELMo from an untrained biLM.

Downstream task (a labelled sequence task made from the corpus, since none of [1]'s ships
offline): replaced-token detection. In each window, every token is replaced with
probability corrupt_prob by a token drawn from the corpus's unigram distribution; the task
tags each position 1 (changed) or 0 (as written). The token alone says nothing (both have
the unigram distribution); its context does. The task model sees task_width tokens of its
own embeddings around each position, so the baseline can learn local plausibility from the
labelled set only, while ELMo brings what the biLM learned from unlabelled text. Labelled
windows come from the training split, the evaluation windows from the validation split.

Tokens: [1] uses words spelled by a char CNN; at CPU scale (quick preset) the tokens are the
characters of the corpus and the token layer is an embedding table (a char CNN over a
one-character token is an embedding with extra steps). tokens=word with token_encoder=
char_cnn is [1]'s setting: words and punctuation of the corpus, each spelled as bytes with
begin/end-of-word marks in bilm-tf's 261-character alphabet.

Reproduce (CPU demo, pydoc text, characters, 2 layers of 128 cells projected to 32,
800 biLM updates of 32 windows of 24, then 300 task updates of 32 windows):
    python transformers/elmo.py --preset quick --plot transformers/elmo.png
    python transformers/elmo.py --preset quick --pretrain-steps 0   # untrained biLM
  Measured only at the tests' tiny size (64 cells projected to 16, 200 biLM + 150 task
  updates, 2 seeds, 2-core CPU shared with other jobs, 244 CPU s for the whole test module):
  val LM 2.65 / 2.52 (fwd), 2.67 / 2.56 (bwd) nats/char vs unigram entropy 3.25; held-out
  F1 of the changed characters 0.124 / 0.227 with ELMo vs 0.067 / 0.041 for the same
  tagger on [x_k] only. The quick preset itself has not been run yet.
Paper scale (GPU; [1]'s biLM, 793,471-word softmax; the preset keeps the pydoc text, so it
traces on CPU):
    python transformers/elmo.py --preset paper
  on the 1B Word Benchmark itself, unpacked by hand into DIR (common.data.REAL_CORPORA):
    python transformers/elmo.py --preset paper --corpus 1b-words --data-dir DIR \
        --val-fraction 0.0002
  The 99 training shards and heldout-00000 (the usual test shard) are joined in that order;
  the shard holds ~0.16M of the ~0.77B words, so a
  val_fraction of ~0.0002 (exactly: its share of the words) holds out about it. Its tokens
  are the benchmark's own (split at white space); beyond the vocab_size - 1 most frequent,
  words become <UNK> (the benchmark's vocabulary: words seen >= 3 times).
[1] (1B Word Benchmark biLM): forward/backward perplexities averaged 39.7 ([1] Sec. 3.4);
  adding ELMo to the baselines: SQuAD F1 81.1 -> 85.8, SNLI 88.0 -> 88.7, SRL 81.4 -> 84.6,
  coref 67.2 -> 70.4, NER 90.15 -> 92.22, SST-5 51.4 -> 54.7 (Table 1); the scalar mix beats
  the top layer only (Table 2, e.g. SQuAD 85.0 / 85.2 for lambda 1 / 0.001 vs 84.7).

Differences from the paper:
- Data: windows of the pydoc reference manual (characters at CPU scale) by default; the 1B
  Word Benchmark only with --data-dir (above), without its <S> </S> sentence marks (the
  text is one stream); a procedural replaced-token task instead of SQuAD/SNLI/SRL/NER/SST.
- Full softmax over the vocabulary (bilm-tf trains with a sampled softmax of 8192
  negatives); the LSTM states are not carried across batches (bilm-tf trains statefully).
- Training windows are seq_len + 2 tokens so that every input position has both a next
  (forward) and a previous (backward) target; bilm-tf cuts the stream into 20-token steps.
- One device with batch 128 (bilm-tf: 128 per GPU on 3 GPUs); updates: 10 epochs of
  768,648,884 tokens / (3 * 128 * 20) ~ 1.0M.
- bilm-tf's layer norm (do_layer_norm) normalises each layer with one mean and variance over
  all its entries; here each token's vector is normalised (flax LayerNorm, no scale/bias).
- The task model is a small convolutional tagger (Adam), not [1]'s task architectures.
"""

import functools
import re
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
    """ELMo [1]: defaults are the paper's biLM (bilm-tf's options) and its ELMo layer."""

    corpus: str = "pydoc"
    """text of common.data.text_corpus: pydoc, stdlib, this, or a real corpus of
    common.data.REAL_CORPORA read from data_dir ([1]: 1b-words)"""
    data_dir: str | None = None
    """folder of a real corpus when `corpus` names one: common.data.REAL_CORPORA"""
    val_fraction: float = 0.1
    """last fraction of the text held out (validation LM loss and the task's test windows)"""
    tokens: str = "word"
    """word (words and punctuation of the corpus, [1]) or char (characters)"""
    token_encoder: str = "char_cnn"
    """char_cnn (the token's characters through CNN + highway + projection, [1]) or embed"""
    vocab_size: int | None = 793471
    """softmax rows (the 1B Word vocabulary: 793,471); None: the corpus's own tokens (a real
    corpus's words beyond the vocab_size - 1 most frequent become <UNK>)"""
    max_chars: int = 50
    """characters per word for the char CNN, begin/end marks included"""
    char_dim: int = 16
    """character embedding size"""
    filter_widths: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7)
    """char CNN filter widths"""
    filter_counts: tuple[int, ...] = (32, 32, 64, 128, 256, 512, 1024)
    """char CNN filters per width (2048 in all)"""
    num_highway: int = 2
    """highway layers after the char CNN"""
    proj_dim: int = 512
    """token representation and LSTM projection size"""
    lstm_dim: int = 4096
    """LSTM cells per layer"""
    num_layers: int = 2
    """LSTM layers per direction (L)"""
    cell_clip: float = 3.0
    """clip of the LSTM cell state"""
    proj_clip: float = 3.0
    """clip of the LSTM projected output"""
    skip_connections: bool = True
    """residual connection around every LSTM layer above the first"""
    dropout: float = 0.1
    """biLM dropout on every LSTM input and on the top output"""
    dtype: str = "float32"
    """compute dtype of the matmuls: float32 or bfloat16 (parameters stay float32)"""
    seq_len: int = 20
    """tokens per training window (unroll steps)"""
    batch_size: int = 128
    """biLM windows per update"""
    pretrain_steps: int = 1_000_000
    """biLM updates (stage 1)"""
    pretrain_lr: float = 0.2
    """Adagrad learning rate of the biLM (initial accumulator 1.0)"""
    max_grad_norm: float = 10.0
    """global-norm gradient clipping of the biLM"""
    corrupt_prob: float = 0.15
    """task: probability that a token of a window is replaced"""
    num_labelled: int = 1024
    """labelled task windows (from the training split)"""
    num_eval: int = 512
    """held-out task windows (validation split) scored by evaluate()"""
    finetune_batch: int = 32
    """task windows per update"""
    finetune_steps: int = 2000
    """task-model updates (stage 2; the biLM frozen)"""
    task_lr: float = 1e-3
    """Adam learning rate of the task model and the ELMo weights"""
    task_dim: int = 64
    """the task model's own token embedding size"""
    task_hidden: int = 128
    """the task model's hidden units"""
    task_width: int = 3
    """tokens the task model's convolution sees around each position"""
    elmo_dropout: float = 0.5
    """dropout on ELMo_k before the task model"""
    l2_coef: float = 0.001
    """lambda of lambda ||w||^2 on the unnormalised layer weights"""
    layer_norm: bool = False
    """normalise each biLM layer before the scalar mix"""
    task_seed: int = 0
    """seed of the labelled and held-out task windows (fixed across training seeds)"""
    eval_windows: int = 256
    """validation windows for the LM loss of evaluate()"""

    @property
    def rows(self) -> int:
        return max(self.batch_size, self.finetune_batch)  # one batch shape for both stages

    @property
    def num_updates(self) -> int:
        return self.pretrain_steps + self.finetune_steps

    @property
    def steps_per_update(self) -> int:
        return self.rows * self.seq_len

    def validate(self):
        for name, ok in (("tokens", ("word", "char")), ("token_encoder", ("char_cnn", "embed")),
                         ("dtype", ("float32", "bfloat16"))):
            if getattr(self, name) not in ok:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {ok}")
        if len(self.filter_widths) != len(self.filter_counts) or not self.filter_widths:
            raise ValueError(f"filter_widths={self.filter_widths} and filter_counts="
                             f"{self.filter_counts} must be non-empty and of equal length")
        if min(self.filter_widths) < 1 or min(self.filter_counts) < 1:
            raise ValueError("filter_widths and filter_counts must be >= 1")
        if self.max_chars < max(self.filter_widths) or self.max_chars < 3:
            raise ValueError(f"max_chars={self.max_chars} must be >= 3 and >= the widest "
                             f"filter {max(self.filter_widths)}")
        for name in ("char_dim", "proj_dim", "lstm_dim", "num_layers", "seq_len",
                     "task_dim", "task_hidden", "task_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_highway < 0 or self.pretrain_steps < 0 or self.l2_coef < 0:
            raise ValueError(f"num_highway={self.num_highway}, pretrain_steps="
                             f"{self.pretrain_steps}, l2_coef={self.l2_coef} must be >= 0")
        if self.cell_clip <= 0 or self.proj_clip <= 0:
            raise ValueError(f"cell_clip={self.cell_clip}, proj_clip={self.proj_clip} "
                             f"must be > 0")
        for name in ("dropout", "elmo_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if not 0 < self.corrupt_prob < 1 or not 0 < self.val_fraction < 1:
            raise ValueError(f"corrupt_prob={self.corrupt_prob} and val_fraction="
                             f"{self.val_fraction} must be in (0, 1)")
        for name in ("num_eval", "eval_windows", "num_labelled"):
            if getattr(self, name) % self.rows:
                raise ValueError(f"{name}={getattr(self, name)} is not a multiple of "
                                 f"max(batch_size, finetune_batch)={self.rows}")
        if self.corpus in data.REAL_CORPORA and self.data_dir is None:
            data.text_corpus(self.corpus)  # text_corpus's ValueError: pass data_dir
        n = len(cfg_corpus(self)[2])
        if self.vocab_size is not None and self.vocab_size < n:
            raise ValueError(f"vocab_size={self.vocab_size} is below the corpus's {n} tokens")


PRESETS = {
    # CPU demo: characters, an embedding token layer, 2 layers of 128 cells projected to 32
    "quick": dict(tokens="char", token_encoder="embed", vocab_size=None, proj_dim=32,
                  lstm_dim=128, seq_len=24, batch_size=32, pretrain_steps=800,
                  pretrain_lr=1.0, num_labelled=512, num_eval=256, finetune_batch=32,
                  finetune_steps=300, task_lr=3e-3, eval_windows=128),
    "paper": dict(),
}

# --- DATA ---

BOW, EOW, PAD_CHAR, NUM_CHARS = 258, 259, 260, 261  # bilm-tf's UnicodeCharsVocabulary


@functools.cache
def corpus_data(corpus: str, val_fraction: float, tokens: str, max_chars: int,
                vocab_size: int | None = None, data_dir: str | None = None):
    """(train ids, val ids, vocabulary, spellings (V, max_chars) int32) as numpy, loaded once.
    Words: regex words/punctuation ranked by frequency (a real corpus, read from data_dir:
    its white-space tokens, those beyond the vocab_size - 1 most frequent mapped to <UNK>);
    characters: common.data.char_corpus. A spelling is [BOW, utf-8 bytes..., EOW] padded
    with PAD_CHAR (bilm-tf's layout)."""
    if tokens == "char":
        train, val, vocab = data.char_corpus(corpus, val_fraction, data_dir=data_dir)
    else:
        text = data.text_corpus(corpus, data_dir=data_dir)
        real = corpus in data.REAL_CORPORA  # already tokenised: [1]'s 1B Word tokens
        words = text.split() if real else re.findall(r"\w+|[^\w\s]", text)
        uniq, inv, counts = np.unique(np.array(words), return_inverse=True, return_counts=True)
        rank = np.argsort(-counts, kind="stable")
        vocab = [str(w) for w in uniq[rank]]
        ids = np.argsort(rank)[inv].astype(np.int32)
        if real and vocab_size is not None and len(vocab) > vocab_size:
            vocab, ids = vocab[:vocab_size - 1] + ["<UNK>"], np.minimum(ids, vocab_size - 1)
        cut = int(len(ids) * (1 - val_fraction))
        train, val = ids[:cut], ids[cut:]
    spell = np.full((len(vocab), max_chars), PAD_CHAR, np.int32)
    for i, w in enumerate(vocab):
        b = [BOW, *list(w.encode("utf-8"))[:max_chars - 2], EOW]
        spell[i, :len(b)] = b
    return train, val, vocab, spell


def cfg_corpus(cfg: Config):
    """corpus_data of cfg (a built-in corpus keyed without vocab_size and data_dir, which it
    does not read, so the tests' corpus_data calls share its cache entry)."""
    real = (cfg.vocab_size, cfg.data_dir) if cfg.corpus in data.REAL_CORPORA else ()
    return corpus_data(cfg.corpus, cfg.val_fraction, cfg.tokens, cfg.max_chars, *real)


def unigram_entropy(cfg: Config) -> float:
    """Entropy (nats/token) of the training split's token frequencies: the loss of the best
    context-free LM, the bar the biLM must beat."""
    train = cfg_corpus(cfg)[0]
    p = np.bincount(train) / len(train)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def num_tokens(cfg: Config) -> int:
    return len(cfg_corpus(cfg)[2])


@functools.cache
def task_data(cfg: Config):
    """Replaced-token detection: (train windows, train tags, eval windows, eval tags), numpy
    (N, seq_len + 2). Each token is replaced with probability corrupt_prob by a token drawn
    from the same split's unigram distribution (a random position's token), so the token
    alone says nothing: only its context does. The tag is 1 where the token changed."""
    train, val, _, _ = cfg_corpus(cfg)
    rng, n = np.random.default_rng(cfg.task_seed), cfg.seq_len + 2

    def make(ids, count):
        starts = rng.integers(0, len(ids) - n, count)
        x = np.stack([ids[s:s + n] for s in starts])
        other = ids[rng.integers(0, len(ids), x.shape)]
        pick = rng.random(x.shape) < cfg.corrupt_prob
        return np.where(pick, other, x).astype(np.int32), (pick & (other != x)).astype(np.int32)

    return (*make(train, cfg.num_labelled), *make(val, cfg.num_eval))


# --- NETWORKS ---


def uniform(a: float):
    """U(-a, a) initialiser (bilm-tf: char embeddings U(-1, 1), CNN kernels U(-0.05, 0.05))."""
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -a, a)


def normal(fan_in: int):
    """N(0, 1 / fan_in) (bilm-tf's highway, projection and softmax weights)."""
    return nn.initializers.normal(fan_in**-0.5)


def dropout(x, rate: float, key, active):
    """Inverted dropout, on when the traced flag `active` is true."""
    if rate == 0:
        return x
    keep = jax.random.bernoulli(key, 1 - rate, x.shape)
    return jnp.where(active & ~keep, 0, x / jnp.where(active, 1 - rate, 1)).astype(x.dtype)


class TokenEncoder(nn.Module):
    """x_k^LM of token ids (B, T) -> (B, T, proj_dim): char CNN + highway + projection
    (bilm-tf _build_word_char_embeddings) or an embedding table."""

    cfg: Config
    spellings: Any  # (V, max_chars) numpy

    @nn.compact
    def __call__(self, ids):
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        if cfg.token_encoder == "embed":
            return nn.Embed(len(self.spellings), cfg.proj_dim, name="embed")(ids)
        chars = jnp.asarray(self.spellings)[ids]  # (B, T, max_chars)
        e = nn.Embed(NUM_CHARS, cfg.char_dim, embedding_init=uniform(1.0),
                     name="char_embed")(chars)  # (B, T, max_chars, char_dim)
        convs = []
        for w, n in zip(cfg.filter_widths, cfg.filter_counts, strict=True):
            c = nn.Conv(n, (w,), padding="VALID", dtype=dt, kernel_init=uniform(0.05),
                        name=f"cnn_{w}")(e)  # (B, T, max_chars - w + 1, n)
            convs.append(nn.relu(c.max(axis=-2)))  # max-pool over positions, then ReLU
        y = jnp.concatenate(convs, -1)  # (B, T, 2048)
        d = y.shape[-1]
        for i in range(cfg.num_highway):
            t = nn.sigmoid(nn.Dense(d, dtype=dt, kernel_init=normal(d),
                                    bias_init=nn.initializers.constant(-2.0),
                                    name=f"high_{i}_carry")(y))
            h = nn.relu(nn.Dense(d, dtype=dt, kernel_init=normal(d),
                                 name=f"high_{i}_transform")(y))
            y = t * h + (1 - t) * y  # highway: t * H(y) + (1 - t) * y
        return nn.Dense(cfg.proj_dim, dtype=dt, kernel_init=normal(d), name="proj")(y)


class LSTMP(nn.Module):
    """One LSTM layer with a projection (TF LSTMCell num_proj, forget bias 1.0):
    i, f, g, o = split(W_x x_t + W_h r_{t-1} + b); c_t = clip(sig(f + 1) c + sig(i) tanh(g));
    r_t = clip(P (sig(o) tanh(c_t))). Scans (B, T, in) over T."""

    cfg: Config

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        n, p = cfg.lstm_dim, cfg.proj_dim
        gx = nn.Dense(4 * n, dtype=dt, name="W_x")(x)  # (B, T, 4n) for all steps at once
        w_h = self.param("W_h", nn.initializers.glorot_uniform(), (p, 4 * n))
        w_p = self.param("W_proj", nn.initializers.glorot_uniform(), (n, p))

        def step(carry, g_t):
            c, r = carry
            i, f, g, o = jnp.split(g_t + (r.astype(dt) @ w_h.astype(dt)), 4, axis=-1)
            c = jnp.clip(nn.sigmoid(f + 1.0) * c + nn.sigmoid(i) * jnp.tanh(g),
                         -cfg.cell_clip, cfg.cell_clip).astype(jnp.float32)
            r = jnp.clip((nn.sigmoid(o) * jnp.tanh(c)).astype(dt) @ w_p.astype(dt),
                         -cfg.proj_clip, cfg.proj_clip).astype(jnp.float32)
            return (c, r), r

        B = x.shape[0]
        zeros = (jnp.zeros((B, n), jnp.float32), jnp.zeros((B, p), jnp.float32))
        _, r = jax.lax.scan(step, zeros, gx.swapaxes(0, 1))
        return r.swapaxes(0, 1)  # (B, T, p)


class BiLM(nn.Module):
    """Shared token layer and softmax, separate forward and backward LSTM stacks. Returns
    (forward logits (B, T, V), backward logits, layers (L + 1, B, T, 2 p)): the forward
    logits at k predict x_{k+1}, the backward ones x_{k-1}; layer 0 is [x^LM; x^LM]."""

    cfg: Config
    spellings: Any
    rows: int

    @nn.compact
    def __call__(self, ids, key, train):
        cfg = self.cfg
        x = TokenEncoder(cfg, self.spellings, name="tokens")(ids).astype(jnp.float32)
        # Th_s: one softmax for both directions
        softmax = nn.Dense(self.rows, kernel_init=normal(cfg.proj_dim), name="softmax")
        keys = jax.random.split(key, 2 * cfg.num_layers + 2)
        outs = []
        for d, seq in enumerate((x, x[:, ::-1])):  # the backward LM reads x reversed
            h, layers = seq, []
            for j in range(cfg.num_layers):
                r = LSTMP(cfg, name=f"lstm_{'fb'[d]}{j}")(
                    dropout(h, cfg.dropout, keys[2 * j + d], train))
                h = h + r if cfg.skip_connections and j > 0 else r  # residual, layers > 1
                layers.append(h)
            outs.append(layers if d == 0 else [l[:, ::-1] for l in layers])  # back in order
        top = [dropout(o[-1], cfg.dropout, keys[-1 - d], train) for d, o in enumerate(outs)]
        logits = [softmax(t) for t in top]
        h = [jnp.concatenate([x, x], -1)]  # h_k0 = [x_k; x_k], then h_kj = [->h_kj; <-h_kj]
        h += [jnp.concatenate(p, -1) for p in zip(*outs, strict=True)]
        return logits[0], logits[1], jnp.stack(h)


def scalar_mix(layers, w, gamma, layer_norm: bool):
    """[1] Eq. 1: ELMo_k = gamma sum_j softmax(w)_j h_kj over layers (L + 1, ..., D)."""
    if layer_norm:
        mu = layers.mean(-1, keepdims=True)
        layers = (layers - mu) * jax.lax.rsqrt(layers.var(-1, keepdims=True) + 1e-12)
    s = jax.nn.softmax(w)
    return gamma * jnp.einsum("j,j...->...", s, layers)


class Tagger(nn.Module):
    """The task model: its own token embedding x_k (and ELMo_k when given) -> a width-w
    convolution over positions -> ReLU -> 2 logits per position."""

    cfg: Config
    rows: int

    @nn.compact
    def __call__(self, ids, elmo=None):
        cfg = self.cfg
        h = nn.Embed(self.rows, cfg.task_dim, name="embed")(ids)
        if elmo is not None:
            h = jnp.concatenate([h, elmo], -1)  # [x_k; ELMo_k^task]
        h = nn.relu(nn.Conv(cfg.task_hidden, (cfg.task_width,), padding="SAME")(h))
        return nn.Dense(2)(h)


# --- LOSS ---


def nll(logits, targets, rows):
    """-log softmax(logits)[target] (nats per token): the mean over the positions of each
    row, then over the rows weighted by `rows` (B,) (the batch's used rows)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    per_row = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0].mean(-1)
    return (per_row * rows).sum() / jnp.maximum(rows.sum(), 1)


def bilm_loss(fwd_logits, bwd_logits, window, rows):
    """[1] Eq. 3 over windows (B, T + 2) whose inputs are window[:, 1:-1]: the forward LM at
    input k predicts window[k + 2] (the next token), the backward one window[k] (the
    previous). Returns (bilm-tf's 0.5 (NLL_fwd + NLL_bwd), NLL_fwd, NLL_bwd)."""
    f, b = nll(fwd_logits, window[:, 2:], rows), nll(bwd_logits, window[:, :-2], rows)
    return 0.5 * (f + b), f, b


def accuracy(logits, tags, rows):
    return ((logits.argmax(-1) == tags).mean(-1) * rows).sum() / jnp.maximum(rows.sum(), 1)


# --- STATE ---


@struct.dataclass
class State:
    params: Any
    """{"bilm": ..., "mix": {"w", "gamma"}, "elmo_tagger": ..., "baseline_tagger": ...}"""
    opt_bilm: Any
    """Adagrad state of the biLM"""
    opt_task: Any
    """Adam state of the mix and both taggers (zeroed when stage 2 starts)"""
    key: jax.Array
    step: jax.Array


def models(cfg: Config):
    _, _, _, spell = cfg_corpus(cfg)
    rows = cfg.vocab_size or len(spell)
    return BiLM(cfg, spell, rows), Tagger(cfg, len(spell))


def optimisers(cfg: Config):
    bilm = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm),
                       optax.adagrad(cfg.pretrain_lr, initial_accumulator_value=1.0))
    return bilm, optax.adam(cfg.task_lr)


def init(key, cfg: Config) -> State:
    k_lm, k_e, k_b, key = jax.random.split(key, 4)
    bilm, tagger = models(cfg)
    ids = jnp.zeros((1, cfg.seq_len), jnp.int32)
    elmo = jnp.zeros((1, cfg.seq_len, 2 * cfg.proj_dim))
    task = {"mix": {"w": jnp.zeros(cfg.num_layers + 1), "gamma": jnp.ones(())},
            "elmo_tagger": tagger.init(k_e, ids, elmo), "baseline_tagger": tagger.init(k_b, ids)}
    params = {"bilm": bilm.init(k_lm, ids, k_lm, False), **task}
    opt_b, opt_t = optimisers(cfg)
    return State(params, opt_b.init(params["bilm"]), opt_t.init(task), key,
                 jnp.zeros((), jnp.int32))


# --- UPDATE ---


def batch(state: State, cfg: Config):
    """(windows (R, T + 2), tags (R, T + 2), row weights (R,), finetune flag): corpus
    windows for the biLM, or an epoch-permuted minibatch of the labelled task windows."""
    train = jnp.asarray(cfg_corpus(cfg)[0])
    x_lab, t_lab, _, _ = (jnp.asarray(a) for a in task_data(cfg))
    R, n = cfg.rows, cfg.num_labelled
    finetune = state.step >= cfg.pretrain_steps
    k_lm, k_ep = jax.random.split(jax.random.fold_in(state.key, 0))
    x, y = data.lm_windows(k_lm, train, R, cfg.seq_len + 1)
    windows = jnp.concatenate([x, y[:, -1:]], axis=1)  # (R, T + 2)
    t = jnp.maximum(state.step - cfg.pretrain_steps, 0)
    per_epoch = n // cfg.finetune_batch
    perm = jax.random.permutation(jax.random.fold_in(k_ep, t // per_epoch), n)
    idx = perm[((t % per_epoch) * cfg.finetune_batch + jnp.arange(R)) % n]
    rows = jnp.arange(R) < jnp.where(finetune, cfg.finetune_batch, cfg.batch_size)
    return (jnp.where(finetune, x_lab[idx], windows), t_lab[idx], rows, finetune)


def forward(params, window, rows, key, cfg: Config, train):
    """Both stages' quantities on one batch: the biLM losses and, from the frozen biLM's
    layers, ELMo_k and both taggers' logits at the inputs window[:, 1:-1]."""
    bilm, tagger = models(cfg)
    k_lm, k_e = jax.random.split(key)
    ids = window[:, 1:-1]
    fwd, bwd, layers = bilm.apply(params["bilm"], ids, k_lm, train)
    lm = bilm_loss(fwd, bwd, window, rows)
    mix = params["mix"]
    elmo = scalar_mix(jax.lax.stop_gradient(layers), mix["w"], mix["gamma"], cfg.layer_norm)
    elmo = dropout(elmo, cfg.elmo_dropout, k_e, train)
    return (lm, tagger.apply(params["elmo_tagger"], ids, elmo),
            tagger.apply(params["baseline_tagger"], ids))


def update(state: State, cfg: Config):
    window, tags, rows, finetune = batch(state, cfg)
    key, k_fw = jax.random.split(state.key)
    rows = rows.astype(jnp.float32)

    def loss_fn(p):
        # stage 1 trains the biLM on its rows; stage 2 the taggers with the biLM frozen
        lm, le, lb = forward(p, window, rows, k_fw, cfg, train=~finetune)
        y = tags[:, 1:-1]
        e_nll, b_nll = nll(le, y, rows), nll(lb, y, rows)
        reg = cfg.l2_coef * jnp.sum(p["mix"]["w"] ** 2)  # [1] Sec. 3.3: lambda ||w||^2
        loss = jnp.where(finetune, e_nll + reg + b_nll, lm[0])
        return loss, (lm, e_nll, b_nll, accuracy(le, y, rows), accuracy(lb, y, rows))

    (loss, (lm, e_nll, b_nll, e_acc, b_acc)), g = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    opt_b, opt_t = optimisers(cfg)
    u_b, s_b = opt_b.update(g["bilm"], state.opt_bilm, state.params["bilm"])
    task_p = {k: v for k, v in state.params.items() if k != "bilm"}
    task_g = {k: v for k, v in g.items() if k != "bilm"}
    switch = state.step == cfg.pretrain_steps  # fresh Adam moments when stage 2 starts
    s_t = jax.tree.map(lambda z: jnp.where(switch, jnp.zeros_like(z), z), state.opt_task)
    u_t, s_t = opt_t.update(task_g, s_t)
    bilm_p = optax.apply_updates(state.params["bilm"], jax.tree.map(
        lambda u: jnp.where(finetune, 0, u), u_b))  # the biLM is frozen in stage 2
    task_p = optax.apply_updates(task_p, jax.tree.map(lambda u: jnp.where(finetune, u, 0), u_t))
    s_b = jax.tree.map(lambda new, old: jnp.where(finetune, old, new), s_b, state.opt_bilm)
    s = jax.nn.softmax(task_p["mix"]["w"])
    metrics = {"losses/loss": loss, "losses/lm": lm[0], "losses/lm_fwd": lm[1],
               "losses/lm_bwd": lm[2], "losses/task": e_nll, "losses/task_baseline": b_nll,
               "charts/task_acc": e_acc, "charts/task_acc_baseline": b_acc,
               "charts/gamma": task_p["mix"]["gamma"],
               "charts/finetuning": finetune.astype(jnp.float32),
               **{f"charts/s_{j}": s[j] for j in range(cfg.num_layers + 1)}}
    params = {"bilm": bilm_p, **task_p}
    return State(params, s_b, s_t, key, state.step + 1), metrics


# the task metrics are undefined (NaN in the logs) during pre-training, the LM ones after
NAN_UNLESS = {k: "charts/finetuning" for k in (
    "losses/task", "losses/task_baseline", "charts/task_acc", "charts/task_acc_baseline")}


def evaluate(state: State, cfg: Config):
    """Validation LM losses (nats/token per direction, and the unigram entropy they must beat)
    on eval_windows windows; held-out task accuracy, NLL and F1 of the changed class, ELMo vs
    baseline tagger, on num_eval windows of the validation split."""
    val = jnp.asarray(cfg_corpus(cfg)[1])
    _, _, x_ev, t_ev = (jnp.asarray(a) for a in task_data(cfg))
    R, n = cfg.rows, cfg.seq_len + 2
    starts = jnp.linspace(0, val.shape[0] - n - 1, cfg.eval_windows).astype(jnp.int32)
    key = jax.random.PRNGKey(0)
    off, ones = jnp.asarray(False), jnp.ones((R,), jnp.float32)

    def lm_chunk(st):
        w = jax.vmap(lambda a: jax.lax.dynamic_slice(val, (a,), (n,)))(st)
        return forward(state.params, w, ones, key, cfg, off)[0]

    def task_chunk(i):
        x = jax.lax.dynamic_slice_in_dim(x_ev, i * R, R)
        y = jax.lax.dynamic_slice_in_dim(t_ev, i * R, R)[:, 1:-1]
        _, le, lb = forward(state.params, x, ones, key, cfg, off)
        count = lambda lg: jnp.stack([((lg.argmax(-1) == 1) & (y == 1)).sum(),
                                      (lg.argmax(-1) == 1).sum(), (y == 1).sum(),
                                      (lg.argmax(-1) == y).sum(), nll(lg, y, ones) * R])
        return count(le), count(lb)

    lm, f, b = (z.mean() for z in jax.lax.map(lm_chunk, starts.reshape(-1, R)))
    ce, cb = (c.sum(0) for c in jax.lax.map(task_chunk, jnp.arange(cfg.num_eval // R)))
    f1 = lambda c: 2 * c[0] / jnp.maximum(c[1] + c[2], 1)
    total = cfg.num_eval * cfg.seq_len
    return {"val_lm_loss": lm, "val_lm_fwd": f, "val_lm_bwd": b,
            "val_perplexity": data.perplexity(lm),
            "unigram_entropy": jnp.float32(unigram_entropy(cfg)),
            "val_acc": ce[3] / total, "val_acc_baseline": cb[3] / total,
            "val_task_loss": ce[4] / cfg.num_eval, "val_task_loss_baseline": cb[4] / cfg.num_eval,
            "val_f1": f1(ce), "val_f1_baseline": f1(cb)}


def plot(res, num_layers: int, out: str) -> str:
    """The learned layer weights s_j over the task stage and the held-out F1 of the ELMo
    tagger against the baseline tagger, per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.plot import save_png

    h, f = res.history, {k: np.asarray(v) for k, v in res.final.items()}
    stage2 = np.asarray(h["charts/finetuning"][0]) > 0
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    for j in range(num_layers + 1):
        s = np.asarray(h[f"charts/s_{j}"])[:, stage2]
        ax[0].plot(s.mean(0), label=f"s_{j} ({'token layer' if j == 0 else f'biLSTM {j}'})")
    ax[0].set(xlabel="task update", ylabel="softmax weight", title="scalar mix (mean of seeds)")
    ax[0].legend(fontsize=8)
    n = len(f["val_f1"])
    ax[1].bar(np.arange(n) - 0.2, f["val_f1"], 0.4, label="[x; ELMo]")
    ax[1].bar(np.arange(n) + 0.2, f["val_f1_baseline"], 0.4, label="[x] only")
    ax[1].set(xlabel="seed", ylabel="held-out F1 (replaced tokens)", xticks=np.arange(n),
              title=f"biLM val loss {f['val_lm_loss'].mean():.2f} nats vs unigram "
                    f"{f['unigram_entropy'].mean():.2f}")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    """`--plot PNG` (this file's only extra flag) draws the layer weights and the F1s."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=__doc__, nan_unless=NAN_UNLESS,
                   summary_keys=["val_f1", "val_f1_baseline", "val_acc", "val_acc_baseline",
                                 "val_lm_fwd", "val_lm_bwd", "unigram_entropy",
                                 "charts/gamma"])
    if flags["--plot"] is not None:
        print(plot(res, len([k for k in res.history if k.startswith("charts/s_")]) - 1,
                   flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
