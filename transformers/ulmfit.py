"""ULMFiT: an AWD-LSTM language model pretrained on general text, fine-tuned on the target
task's text, then fine-tuned as a classifier, with discriminative learning rates, slanted
triangular learning rates and gradual unfreezing.

[1] J. Howard, S. Ruder. "Universal Language Model Fine-tuning for Text Classification."
    ACL 2018, arXiv:1801.06146. Released code: fastai/fastai courses/dl2/imdb_scripts
    (finetune_lm.py, train_clas.py, read for the details below).
[2] S. Merity, N. S. Keskar, R. Socher. "Regularizing and Optimizing LSTM Language Models."
    ICLR 2018, arXiv:1708.02182 (AWD-LSTM).
[3] L. Weng. "Generalized Language Models" (2019), section "ULMFiT".

    AWD-LSTM [2]: x_t = E[w_t] (embedding dropout: whole rows of E dropped, p_e), locked
      (variational) dropout on the embedded input (p_i), 3 LSTM layers 400 -> 1150 -> 1150
      -> 400 whose hidden-to-hidden matrix W_hh is DropConnect-ed (one mask per batch, the
      same at every step, p_w), locked dropout between layers (p_h) and on the top output
      (p_o), decoder tied to E; AR/TAR: + alpha mean(h~_T^2) + beta mean((h_t - h_{t-1})^2)
    (a) general-domain LM pretraining, (b) target-task LM fine-tuning with
      discriminative fine-tuning  theta^l_t = theta^l_{t-1} - eta^l grad_{theta^l} J  [1] Eq. 2
        eta^{l-1} = eta^l / 2.6 (eta^L: the top layer's rate; [3] says "first" layer: a typo)
      slanted triangular learning rates (STLR)                                      [1] Eq. 3
        cut = floor(T cut_frac),  p = t / cut if t < cut else
              1 - (t - cut) / (cut (1 / cut_frac - 1))  (here / (T - cut): see stlr)
        eta_t = eta_max (1 + p (ratio - 1)) / ratio
    (c) classifier fine-tuning: concat pooling  h_c = [h_T, maxpool(H), meanpool(H)]  [1] Eq. 4
      head: BN -> dropout p_o -> Linear(3 * 400, 50) -> ReLU -> BN -> dropout 0.1 -> Linear(50, C)
      gradual unfreezing: epoch e (0-based) trains only the top e + 1 layer groups
        (groups, bottom up: embedding, LSTM 1..3, head), with discriminative lr and STLR

One run holds the three stages: updates 0 .. pretrain_steps-1 are (a) on the general corpus,
the next lm_steps are (b) on the target corpus's training text, the last clf_epochs epochs
are (c) on the labelled set. Three arms train side by side in one compiled program, on the
same batches and dropout masks ([1]'s ablations in small, Table 4 and Table 6):
  ulmfit     (a), (b) and (c) as above
  scratch    no (a): held at its initial parameters through (a) (rate 0), then (b) and
             (c) exactly as ulmfit ([1] Table 4 "without pretraining", which still
             fine-tunes the LM on the target text)
  no_tricks  (a) and (b), then (b) and (c) with one constant rate for all layers
             (no discriminative lr, no STLR) and (c) without gradual unfreezing
In (c) every update also scores one chunk of the held-out set (charts/val_err_<arm>, so an
epoch's mean over updates is the held-out error during that epoch); evaluate() scores it all.

Data: the general corpus is the Python standard library's source (common.data.text_corpus
"stdlib", general_chars characters; [1]: WikiText-103), the target corpus Python's reference
manual ("pydoc"; [1]: IMDb, TREC-6, AG). The target task is procedural because no labelled
text set ships offline in this repo's dependencies: windows of seq_len characters of the
target text, half of them with their characters randomly permuted; label 1 when permuted.
Character counts are the same in both classes, so only knowledge of character order helps,
which a language model has. Labelled windows come from the target training split, the
held-out ones from its validation split. Tokens are characters (the union of both texts).

Reproduce (CPU demo; 3 layers 32 -> 128 -> 32, windows of 48, 400 updates of (a), 100 of
(b), 8 epochs of 128 labelled windows in batches of 16):
    python transformers/ulmfit.py --preset quick --num-seeds 2 --plot transformers/ulmfit.png
  Measured (--num-seeds 2, 2-core CPU shared with ~8 other jobs, 92 s compile + 427 s):
  held-out error 0.141 / 0.078 ulmfit, 0.078 / 0.094 no_tricks, 0.469 / 0.438 scratch
  (Table 4's "without pretraining": no (a), then (b) and (c) as ulmfit); stdlib LM 1.93 /
  1.96 nats/char after (a); pydoc LM at the end of (b) 2.66 / 2.44 ulmfit vs 2.23 / 2.10
  no_tricks (constant 4e-3 on all layers adapts faster in 100 updates) vs 4.44 / 4.49
  scratch (100 updates from random weights barely leave the uniform 4.65).
  Pretraining removed most of that arm's error; the tricks do not help at this
  size (they are [1] Table 6's gains on IMDb/TREC/AG, not shown here). Plot:
  transformers/ulmfit.png.
Paper scale (GPU; 400/1150/3 AWD-LSTM, bptt 70, batch 64; the preset keeps the offline
stdlib and pydoc texts, so it traces on CPU):
    python transformers/ulmfit.py --preset paper
  on [1]'s data, downloaded by hand into DIR (wiki.{train,valid,test}.tokens of WikiText-103
  and the unpacked aclImdb/; common.data.REAL_CORPORA and common.data.imdb_reviews):
    python transformers/ulmfit.py --preset paper --general-corpus wikitext-103 \
        --general-chars 600000000 --target-corpus imdb --data-dir DIR \
        --num-labelled 25000 --num-eval 24960 --seq-len 1400
  (a) reads all of WikiText-103 (its three splits joined: (a) has no held-out set); (b)
  fine-tunes on the train + unsup reviews (100k; the last val_fraction of that text is the
  LM's held-out part); (c) trains on the 25,000 labelled train reviews and evaluate() scores
  24,960 of the 25,000 test reviews (num_eval is a multiple of the batch), each review as its
  last seq_len characters.
[1] test error rates (Table 2/3): IMDb 4.6, TREC-6 3.6, AG 5.01, DBpedia 0.80, Yelp-bi 2.16,
  Yelp-full 29.98 [M: IMDb 4.6 confirmed in train_clas.py's comment, the others from
  memory]; validation error without / with pretraining (Table 4): IMDb 5.63 / 5.00, TREC-6
  10.67 / 5.69, AG 5.52 / 5.38 (confirmed on the authors' poster).

Hyperparameters checked: 400/1150/3 and bptt 70 (finetune_lm.py em_sz, nh, nl, bptt); the
dropouts dps = [0.4, 0.5, 0.05, 0.3, 0.4] = [p_i, p_w, p_e, p_h, head dropout] and the head
[3 * em_sz, 50, C] with drops [0.4, 0.1] (train_clas.py), which matches [1] Sec. 4 "0.4 to
layers, 0.3 to RNN layers, 0.4 to input embedding layers, 0.05 to embedding layers, weight
dropout 0.5"; lrm = 2.6 (train_clas.py and [1] Sec. 3.2); cut_frac 0.1, ratio 32, eta_max 0.01
([1] Sec. 3.2; finetune_lm.py's use_clr=(32, 10)); Adam betas (0.7, 0.99) ([1] Sec. 4: the
paper's value, chosen over the (0.8, 0.99) of train_clas.py and finetune_lm.py); clip 25,
AR/TAR alpha 2 beta 1, lr 0.01 (train_clas.py); batch 64 ([1] Sec. 4; train_clas.py's
training loader uses bs // 2 = 32); LM fine-tuning lr 4e-3, clip 0.3, AR/TAR 2 / 1
(finetune_lm.py). Embedding rows: the characters of both texts (finetune_lm.py, too, maps
the WikiText-103 model onto the target vocabulary before fine-tuning).

Differences from the paper:
- Data (above): characters of Python's stdlib and reference manual, a procedural task, by
  default; with --data-dir, WikiText-103 and IMDb as characters (not [1]'s 60k-word
  vocabulary), each review cut to its last seq_len characters (no BPT3C over the whole
  review), the LM fine-tuned on train + unsup reviews (finetune_lm.py also reads the test
  reviews' text); the TREC-6/AG/DBpedia/Yelp tasks are not read.
- One STLR over each whole stage; the released train_clas.py restarts the schedule per
  unfreezing step (use_clr=(8, 3) for the first two epochs, then (8, 8); (32, 10) is
  finetune_lm.py's) and unfreezes everything at the third epoch; [1] Sec. 3.3 unfreezes one
  group per epoch, as here.
- Stages (a) and (b) use the classifier's dropouts (dropout_i/_h/_e, weight_drop, dropout:
  [1] Sec. 4 gives one set); finetune_lm.py's LM dropouts are [0.25, 0.1, 0.2, 0.02, 0.15]
  (p_i, p_o, p_w, p_e, p_h) [M: not separately configurable here].
- Discriminative rates in (b) over the same groups as (c) (embedding with the tied decoder
  at the bottom); finetune_lm.py uses [lr/6, lr/3, lr, lr/2] over (LSTM 1, 2, 3, embedding +
  decoder). Stage (a) uses STLR with pretrain_lr on all layers ([1] does not say [M]).
- Windows are one BPTT chunk, so BPT3C (gradients through the chunks that feed the pooled
  states) reduces to plain BPTT; documents do not vary in length, so no padding masks.
- One direction (forward) only; [1]'s best numbers average a forward and a backward model.
- No weight decay (fastai 1e-7 / 1e-6); fresh Adam moments at every stage switch; frozen
  groups get neither gradients nor updates; LSTM states are not carried across batches.
- The scratch arm is Table 4's "without pretraining": the ULMFiT arm without (a). Held
  at its initial parameters (rate 0) rather than skipped, it shares the compiled program.
- Cost: all three arms run stage (a) (two of them identically, the scratch arm frozen):
  about 3x the FLOPs of one (a) run, most of a paper-scale run's cost; a run that shares
  one (a) between the arms would save 2/3 of it. In (c) the LM decoder (V x emb_dim) is
  still computed and differentiated, unused (cheap on characters).
"""

import functools
import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from common import data, run

ARMS = ("ulmfit", "scratch", "no_tricks")

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """ULMFiT [1]: defaults are the paper's AWD-LSTM and fine-tuning hyperparameters."""

    general_corpus: str = "stdlib"
    """text of common.data.text_corpus for stage (a): stdlib, pydoc, this, or a real corpus of
    common.data.REAL_CORPORA read from data_dir ([1]: wikitext-103)"""
    general_chars: int = 4_000_000
    """characters of the general corpus read (its first ones)"""
    target_corpus: str = "pydoc"
    """text of the target task (LM fine-tuning and the labelled windows): a text of
    common.data.text_corpus (the procedural permuted-window task), or 'imdb' ([1]'s IMDb:
    common.data.imdb_reviews from data_dir, its reviews' text and sentiment labels)"""
    data_dir: str | None = None
    """folder of the real corpora: general_corpus's files (common.data.REAL_CORPORA) and,
    for target_corpus='imdb', the unpacked aclImdb/ folder"""
    val_fraction: float = 0.1
    """last fraction of the target text held out (the held-out task windows)"""
    vocab_size: int | None = None
    """embedding rows; None: the characters of both texts (finetune_lm.py remaps the
    WikiText-103 model to the target task's vocabulary; more rows are never read)"""
    emb_dim: int = 400
    """embedding size (= the top LSTM layer's size, for the tied decoder)"""
    hidden_dim: int = 1150
    """hidden size of the lower LSTM layers"""
    num_layers: int = 3
    """LSTM layers"""
    dropout_e: float = 0.05
    """embedding dropout: probability of dropping a whole row of E"""
    dropout_i: float = 0.4
    """locked dropout on the embedded input"""
    dropout_h: float = 0.3
    """locked dropout between LSTM layers"""
    dropout: float = 0.4
    """locked dropout on the top output before the decoder; the head's first dropout"""
    weight_drop: float = 0.5
    """DropConnect probability on each LSTM's hidden-to-hidden matrix"""
    head_hidden: int = 50
    """hidden units of the classifier head"""
    head_dropout: float = 0.1
    """dropout before the head's last linear layer"""
    ar_coef: float = 2.0
    """alpha of activation regularisation, alpha mean(dropped top output^2)"""
    tar_coef: float = 1.0
    """beta of temporal activation regularisation, beta mean((h_t - h_{t-1})^2)"""
    dtype: str = "float32"
    """compute dtype of the matmuls: float32 or bfloat16 (parameters stay float32)"""
    seq_len: int = 70
    """characters (tokens) per window: the BPTT length"""
    batch_size: int = 64
    """LM windows per update in stages (a) and (b)"""
    pretrain_steps: int = 100_000
    """stage (a) updates [M: [1] does not give the length of WikiText-103 pretraining]"""
    pretrain_lr: float = 1e-3
    """stage (a) peak learning rate [M]"""
    lm_steps: int = 20_000
    """stage (b) updates"""
    lm_lr: float = 4e-3
    """stage (b) peak learning rate (eta^L of the top group)"""
    lm_max_grad_norm: float = 0.3
    """global-norm gradient clipping in stages (a) and (b)"""
    num_labelled: int = 4096
    """labelled task windows (half permuted)"""
    num_eval: int = 1024
    """held-out task windows"""
    clf_batch: int = 64
    """labelled windows per update in stage (c)"""
    clf_epochs: int = 10
    """stage (c) epochs over the labelled set"""
    clf_lr: float = 0.01
    """stage (c) peak learning rate eta_max (eta^L of the head)"""
    clf_max_grad_norm: float = 25.0
    """global-norm gradient clipping in stage (c)"""
    discr_factor: float = 2.6
    """discriminative fine-tuning: eta^{l-1} = eta^l / discr_factor"""
    cut_frac: float = 0.1
    """STLR: fraction of a stage's updates spent increasing the rate"""
    ratio: float = 32.0
    """STLR: how much smaller the lowest rate is than eta_max"""
    adam_b1: float = 0.7
    """Adam beta1"""
    adam_b2: float = 0.99
    """Adam beta2"""
    task_seed: int = 0
    """seed of the labelled and held-out windows (fixed across training seeds)"""

    @property
    def rows(self) -> int:
        return max(self.batch_size, self.clf_batch)  # one batch shape for all stages

    @property
    def clf_steps_per_epoch(self) -> int:
        return self.num_labelled // self.clf_batch

    @property
    def clf_steps(self) -> int:
        return self.clf_epochs * self.clf_steps_per_epoch

    @property
    def num_updates(self) -> int:
        return self.pretrain_steps + self.lm_steps + self.clf_steps

    @property
    def steps_per_update(self) -> int:
        return self.rows * self.seq_len

    def validate(self):
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")
        for name in (
            "dropout_e",
            "dropout_i",
            "dropout_h",
            "dropout",
            "weight_drop",
            "head_dropout",
        ):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if not 0 < self.val_fraction < 1 or not 0 < self.cut_frac < 1:
            raise ValueError(
                f"val_fraction={self.val_fraction} and cut_frac={self.cut_frac} must be in (0, 1)"
            )
        if self.ratio < 1 or self.discr_factor < 1:
            raise ValueError(
                f"ratio={self.ratio} and discr_factor={self.discr_factor} must be >= 1"
            )
        for name in (
            "emb_dim",
            "hidden_dim",
            "num_layers",
            "head_hidden",
            "general_chars",
            "clf_epochs",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.seq_len < 2 or self.pretrain_steps < 0 or self.lm_steps < 0:
            raise ValueError(
                f"seq_len={self.seq_len} must be >= 2, pretrain_steps="
                f"{self.pretrain_steps} and lm_steps={self.lm_steps} >= 0"
            )
        if self.num_labelled < self.clf_batch or self.num_eval % self.rows:
            raise ValueError(
                f"num_labelled={self.num_labelled} must be >= clf_batch="
                f"{self.clf_batch} and num_eval={self.num_eval} a multiple of "
                f"max(batch_size, clf_batch)={self.rows}"
            )
        real = self.general_corpus in data.REAL_CORPORA or self.target_corpus in data.REAL_CORPORA
        if real and self.data_dir is None:  # text_corpus's ValueError: pass data_dir
            data.text_corpus(self.general_corpus if self.general_corpus in data.REAL_CORPORA
                             else self.target_corpus)
        if self.target_corpus == "imdb" and self.data_dir is None:
            raise ValueError("target_corpus='imdb' is read from disk: pass data_dir "
                             "(--data-dir), the folder with the unpacked aclImdb/")
        n = len(corpora(self)[3])
        if self.vocab_size is not None and self.vocab_size < n:
            raise ValueError(f"vocab_size={self.vocab_size} is below the texts' {n} characters")


PRESETS = {
    # CPU demo: 3 layers 32 -> 128 -> 32 on characters, windows of 48, lighter dropouts
    # (the paper's are for a 400/1150 word model; at this size they kept the LM at 3.2
    # nats, the unigram loss, for 400 updates) and a higher pretraining rate (3e-3 stalled
    # at 3.1 nats for 400 updates; 1e-2 reached 2.24)
    "quick": dict(
        general_chars=300_000,
        vocab_size=None,
        emb_dim=32,
        hidden_dim=128,
        dropout_e=0.0,
        dropout_i=0.1,
        dropout_h=0.1,
        dropout=0.1,
        weight_drop=0.1,
        seq_len=48,
        batch_size=16,
        pretrain_steps=400,
        pretrain_lr=1e-2,
        lm_steps=100,
        num_labelled=128,
        num_eval=128,
        clf_batch=16,
        clf_epochs=8,
    ),
    "paper": dict(),
}

# --- DATA ---


@functools.cache
def imdb(data_dir: str):
    """[1]'s IMDb from data_dir: (LM text: the train and unsup reviews joined by blank lines,
    (train reviews, labels), (test reviews, labels)). The test reviews' text is not in the
    LM text; only their characters join the vocabulary."""
    train, unsup = data.imdb_reviews(data_dir, "train"), data.imdb_reviews(data_dir, "unsup")
    return "\n\n".join(train[0] + unsup[0]), train, data.imdb_reviews(data_dir, "test")


@functools.cache
def _corpora(general: str, general_chars: int, target: str, val_fraction: float,
             data_dir: str | None = None):
    g = data.text_corpus(general, max_chars=general_chars, data_dir=data_dir)
    if target == "imdb":
        t, _, (test, _) = imdb(data_dir)
        extra = set().union(*map(set, test))
    else:
        t, extra = data.text_corpus(target, data_dir=data_dir), set()
    vocab = sorted(set(g) | set(t) | extra)
    idx = {c: i for i, c in enumerate(vocab)}
    enc = lambda s: np.fromiter(map(idx.__getitem__, s), np.int32, len(s))
    t_ids = enc(t)
    cut = int(len(t_ids) * (1 - val_fraction))
    return enc(g), t_ids[:cut], t_ids[cut:], vocab


def corpora(cfg: Config):
    """(general ids, target train ids, target val ids, characters) as numpy (loaded once)."""
    return _corpora(cfg.general_corpus, cfg.general_chars, cfg.target_corpus, cfg.val_fraction,
                    *((cfg.data_dir,) if cfg.data_dir is not None else ()))


def review_windows(reviews, labels, count: int, seq_len: int, chars, rng):
    """IMDb classifier data: `count` reviews drawn without replacement (all of them when
    fewer), each as its last seq_len characters (shorter ones left-padded with spaces)."""
    idx = {c: i for i, c in enumerate(chars)}
    pick = rng.permutation(len(reviews))[:count]
    pick = np.resize(pick, count)  # fewer reviews than windows: repeat them
    x = np.stack([np.fromiter(map(idx.__getitem__, reviews[i][-seq_len:].rjust(seq_len)),
                              np.int32, seq_len) for i in pick])
    return x, labels[pick].astype(np.int32)


@functools.cache
def task_data(cfg: Config):
    """(labelled windows (N, T), labels, held-out windows, labels) as numpy; label 1 when
    the window's characters are permuted; balanced. target_corpus='imdb': the labelled
    windows from the train reviews, the held-out ones from the test reviews, label 1 for
    positive (review_windows)."""
    _, train, val, chars = corpora(cfg)
    rng, n = np.random.default_rng(cfg.task_seed), cfg.seq_len
    if cfg.target_corpus == "imdb":
        _, tr, te = imdb(cfg.data_dir)
        return (*review_windows(*tr, cfg.num_labelled, n, chars, rng),
                *review_windows(*te, cfg.num_eval, n, chars, rng))

    def make(ids, count):
        starts = rng.integers(0, len(ids) - n, count)
        labels = (np.arange(count) % 2).astype(np.int32)
        rng.shuffle(labels)
        x = np.stack(
            [
                rng.permutation(ids[s : s + n]) if y else ids[s : s + n]
                for s, y in zip(starts, labels, strict=True)
            ]
        )
        return x, labels

    return (*make(train, cfg.num_labelled), *make(val, cfg.num_eval))


# --- NETWORKS ---


def vocab_rows(cfg: Config) -> int:
    return cfg.vocab_size or len(corpora(cfg)[3])


def init_params(key, cfg: Config):
    """AWD-LSTM + head. E ~ U(-0.1, 0.1) ([2]); LSTM and linear weights ~ U(-1/sqrt(n),
    1/sqrt(n)) (PyTorch's defaults); BN scale 1, shift 0; decoder bias 0."""
    L, d = cfg.num_layers, cfg.emb_dim
    keys = iter(jax.random.split(key, 3 * L + 5))
    u = lambda shape, s: jax.random.uniform(next(keys), shape, jnp.float32, -s, s)
    sizes = [d] + [cfg.hidden_dim] * (L - 1) + [d]
    lstm = []
    for l in range(L):
        n_in, n = sizes[l], sizes[l + 1]
        s = 1 / math.sqrt(n)
        lstm.append({"w_ih": u((n_in, 4 * n), s), "w_hh": u((n, 4 * n), s), "b": u((4 * n,), s)})
    c, h = 3 * d, cfg.head_hidden
    head = {
        "bn1": {"scale": jnp.ones(c), "bias": jnp.zeros(c)},
        "w1": u((c, h), 1 / math.sqrt(c)),
        "b1": u((h,), 1 / math.sqrt(c)),
        "bn2": {"scale": jnp.ones(h), "bias": jnp.zeros(h)},
        "w2": u((h, 2), 1 / math.sqrt(h)),
        "b2": u((2,), 1 / math.sqrt(h)),
    }
    return {
        "embed": u((vocab_rows(cfg), d), 0.1),
        "lstm": lstm,
        "dec_bias": jnp.zeros(vocab_rows(cfg)),
        "head": head,
    }


def layer_groups(params, cfg: Config):
    """The group index of every leaf, bottom up: 0 embedding (with the tied decoder's bias),
    1..L the LSTM layers, L + 1 the head."""
    L = cfg.num_layers
    return {
        "embed": 0,
        "dec_bias": 0,
        "lstm": [jax.tree.map(lambda _: l + 1, p) for l, p in enumerate(params["lstm"])],
        "head": jax.tree.map(lambda _: L + 1, params["head"]),
    }


def locked_mask(key, p: float, shape):
    """Variational (locked) dropout mask (B, 1, D): one draw per sequence, shared over time."""
    return jax.random.bernoulli(key, 1 - p, (shape[0], 1, shape[-1])) / (1 - p)


def embedding_dropout(key, E, ids, p: float, train):
    """E[ids] with embedding dropout [2] Sec. 4.3: whole rows of E (word types) dropped with
    probability p, the others scaled by 1 / (1 - p): every occurrence of a token in the
    batch is dropped or kept together. Only the rows of `ids` are gathered (no V x D
    product); the identity at evaluation."""
    keep = jax.random.bernoulli(key, 1 - p, (E.shape[0],)) / (1 - p)
    return jnp.where(train, E[ids] * keep[ids][..., None], E[ids])


def weight_drop(key, w_hh, p: float, train):
    """DropConnect on the hidden-to-hidden matrix: one mask per batch (the same at every
    step and for every sequence, [2] Sec. 2); the identity at evaluation."""
    mask = jax.random.bernoulli(key, 1 - p, w_hh.shape) / (1 - p)
    return jnp.where(train, w_hh * mask, w_hh)


def lstm_layer(p, x, w_hh, dt):
    """One LSTM layer over (B, T, n_in) with PyTorch's gate order i, f, g, o."""
    gx = x.astype(dt) @ p["w_ih"].astype(dt) + p["b"].astype(dt)  # (B, T, 4n) at once
    n = w_hh.shape[0]

    def step(carry, g_t):
        h, c = carry
        i, f, g, o = jnp.split(
            (g_t + h.astype(dt) @ w_hh.astype(dt)).astype(jnp.float32), 4, axis=-1
        )
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    B = x.shape[0]
    zeros = jnp.zeros((B, n), jnp.float32)
    return jax.lax.scan(step, (zeros, zeros), gx.swapaxes(0, 1))[1].swapaxes(0, 1)


def encoder(params, ids, key, train, cfg: Config):
    """AWD-LSTM encoder: (top output (B, T, emb), the same after output dropout)."""
    dt, ks = jnp.dtype(cfg.dtype), jax.random.split(key, 2 * cfg.num_layers + 3)
    x = embedding_dropout(ks[0], params["embed"], ids, cfg.dropout_e, train)
    x = jnp.where(train, x * locked_mask(ks[1], cfg.dropout_i, x.shape), x)
    for l, p in enumerate(params["lstm"]):
        x = lstm_layer(p, x, weight_drop(ks[2 + l], p["w_hh"], cfg.weight_drop, train), dt)
        if l < cfg.num_layers - 1:
            x = jnp.where(
                train, x * locked_mask(ks[2 + cfg.num_layers + l], cfg.dropout_h, x.shape), x
            )
    return x, jnp.where(train, x * locked_mask(ks[-1], cfg.dropout, x.shape), x)


def concat_pool(h):
    """[1] Eq. 4: h_c = [h_T, maxpool(H), meanpool(H)] over (B, T, D) -> (B, 3 D)."""
    return jnp.concatenate([h[:, -1], h.max(1), h.mean(1)], axis=-1)


def batch_norm(x, p, stats, rows, train, momentum=0.1, eps=1e-5):
    """BatchNorm1d over the used rows (weights `rows`); running averages as PyTorch's.
    Returns (y, new running stats)."""
    n = jnp.maximum(rows.sum(), 2)
    mu = (x * rows[:, None]).sum(0) / n
    var = (((x - mu) ** 2) * rows[:, None]).sum(0) / n
    new = {
        "mean": (1 - momentum) * stats["mean"] + momentum * mu,
        "var": (1 - momentum) * stats["var"] + momentum * var * n / (n - 1),
    }
    m, v = jnp.where(train, mu, stats["mean"]), jnp.where(train, var, stats["var"])
    return (x - m) * jax.lax.rsqrt(v + eps) * p["scale"] + p["bias"], new


def head(p, bn, h_c, rows, key, train, cfg: Config):
    """BN -> dropout -> Linear -> ReLU -> BN -> dropout -> Linear (train_clas.py layers
    [3 em_sz, 50, C], drops [0.4, 0.1]). Returns (logits (B, 2), new running stats)."""
    k1, k2 = jax.random.split(key)
    drop = lambda z, q, k: jnp.where(
        train, z * jax.random.bernoulli(k, 1 - q, z.shape) / (1 - q), z
    )
    z, s1 = batch_norm(h_c, p["bn1"], bn["bn1"], rows, train)
    z = jax.nn.relu(drop(z, cfg.dropout, k1) @ p["w1"] + p["b1"])
    z, s2 = batch_norm(z, p["bn2"], bn["bn2"], rows, train)
    return drop(z, cfg.head_dropout, k2) @ p["w2"] + p["b2"], {"bn1": s1, "bn2": s2}


# --- LEARNING RATES ---


def stlr(t, T: int, eta_max, cfg: Config):
    """[1] Eq. 3, the rate of update t (0-based) of a stage of T updates. The decay runs
    over T - cut updates (fastai's CircularLR), which is [1]'s cut (1 / cut_frac - 1) when
    T cut_frac is a whole number; otherwise [1]'s form overshoots below eta_max / ratio
    (negative rates for small T)."""
    cut = max(math.floor(T * cfg.cut_frac), 1)
    p = jnp.where(t < cut, t / cut, 1 - (t - cut) / max(T - cut, 1))
    return eta_max * (1 + p * (cfg.ratio - 1)) / cfg.ratio


def group_scales(top, discr, unfrozen_from, cfg: Config):
    """(G,) per-group multipliers of the rate: discr_factor^-(top - g) below the top group
    when `discr` ([1] Eq. 2), 1 otherwise; 0 for the frozen groups g < unfrozen_from."""
    g = jnp.arange(cfg.num_layers + 2)
    scale = jnp.where(discr, cfg.discr_factor ** -jnp.maximum(top - g, 0).astype(jnp.float32), 1.0)
    return jnp.where(g >= unfrozen_from, scale, 0.0)


# --- LOSS ---


def nll(logits, y, rows):
    """Mean -log softmax(logits)[y] over the positions of the used rows."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    per = -jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
    per = per.reshape(per.shape[0], -1).mean(-1)
    return (per * rows).sum() / jnp.maximum(rows.sum(), 1)


# --- STATE ---


@struct.dataclass
class State:
    params: Any
    """per arm (leading axis 3: ulmfit, scratch, no_tricks)"""
    opt: Any
    """Adam (m, v, count) per arm; zeroed at every stage switch"""
    bn: Any
    """the head's running BN statistics per arm"""
    key: jax.Array
    init_key: jax.Array
    """key of the initial parameters (also of the classifier epochs' permutations)"""
    step: jax.Array
    data: tuple
    """device_data(cfg), stored uint8 (uint16 above 256 characters): an input of the
    compiled chunks, not constants of each program; one copy per seed (0.7 MB at the quick
    preset; 4.4 MB at the paper preset's 4M stdlib characters)"""


def compact(a, bound: int):
    """Values in [0, bound) in the narrowest unsigned type that holds them (the gathers
    cast back to int32)."""
    return np.asarray(a).astype(
        np.uint8 if bound <= 256 else np.uint16 if bound <= 65536 else np.int32
    )


def device_data(cfg: Config) -> tuple:
    """(general ids, target train ids, labelled windows, labels, held-out windows, labels)
    as compact numpy arrays."""
    g, t_train, _, chars = corpora(cfg)
    v = len(chars)
    arrays = (g, t_train, *task_data(cfg))
    return tuple(compact(a, b) for a, b in zip(arrays, (v, v, v, 2, v, 2), strict=True))


def zero_bn(cfg: Config):
    s = lambda n: {"mean": jnp.zeros(n), "var": jnp.ones(n)}
    return {"bn1": s(3 * cfg.emb_dim), "bn2": s(cfg.head_hidden)}


def init(key, cfg: Config) -> State:
    k_init, key = jax.random.split(key)
    p = init_params(k_init, cfg)
    stack = lambda t: jax.tree.map(lambda x: jnp.stack([x] * len(ARMS)), t)
    z = jax.tree.map(jnp.zeros_like, p)
    opt = (z, z, jnp.zeros((), jnp.int32))
    return State(
        stack(p),
        stack(opt),
        stack(zero_bn(cfg)),
        key,
        k_init,
        jnp.zeros((), jnp.int32),
        tuple(jnp.asarray(a) for a in device_data(cfg)),
    )


# --- UPDATE ---


def batch(state: State, cfg: Config):
    """(windows (R, T + 1), labels (R,), row weights (R,)): LM windows of the general text
    (a) or of the target text (b); an epoch-permuted minibatch of the labelled set (c)."""
    g, t_train, x_lab, y_lab, _, _ = state.data
    i32 = lambda a: a.astype(jnp.int32)
    R, P, F = cfg.rows, cfg.pretrain_steps, cfg.lm_steps
    k_a, k_b = jax.random.split(jax.random.fold_in(state.key, 0))
    xa, ya = data.lm_windows(k_a, g, R, cfg.seq_len)
    xb, yb = data.lm_windows(k_b, t_train, R, cfg.seq_len)
    lm = jnp.where(
        state.step < P,
        i32(jnp.concatenate([xa, ya[:, -1:]], 1)),
        i32(jnp.concatenate([xb, yb[:, -1:]], 1)),
    )
    t = jnp.maximum(state.step - P - F, 0)
    per = cfg.clf_steps_per_epoch
    perm = jax.random.permutation(jax.random.fold_in(state.init_key, t // per), cfg.num_labelled)
    idx = perm[((t % per) * cfg.clf_batch + jnp.arange(R)) % cfg.num_labelled]
    clf = state.step >= P + F
    windows = jnp.where(clf, jnp.pad(i32(x_lab[idx]), ((0, 0), (0, 1))), lm)
    rows = jnp.arange(R) < jnp.where(clf, cfg.clf_batch, cfg.batch_size)
    return windows, i32(y_lab[idx]), rows.astype(jnp.float32)


def schedule(step, cfg: Config):
    """Per arm (3, G) rates of every layer group at `step`, and the stage (0, 1, 2)."""
    P, F, C, L = cfg.pretrain_steps, cfg.lm_steps, cfg.clf_steps, cfg.num_layers
    stage = (step >= P).astype(jnp.int32) + (step >= P + F)
    ones = group_scales(0, False, 0, cfg)
    a = stlr(step, P, cfg.pretrain_lr, cfg) * ones
    a = jnp.stack([a, 0 * a, a])  # the scratch arm stays at its initial parameters in (a)
    tb = step - P
    b_tricks = stlr(tb, F, cfg.lm_lr, cfg) * group_scales(L, True, 0, cfg)
    b = jnp.stack([b_tricks, b_tricks, cfg.lm_lr * ones])
    tc = step - P - F
    epoch = tc // cfg.clf_steps_per_epoch  # gradual unfreezing: top epoch + 1 groups
    c_tricks = stlr(tc, C, cfg.clf_lr, cfg) * group_scales(L + 1, True, L + 1 - epoch, cfg)
    c = jnp.stack([c_tricks, c_tricks, cfg.clf_lr * ones])
    rates = jnp.where(stage == 0, a, jnp.where(stage == 1, b, c))
    return rates, stage


def forward(p, bn, windows, labels, rows, key, train, cfg: Config):
    """Both heads on one batch: (LM NLL + AR + TAR, classifier NLL + AR + TAR, class
    logits, new BN stats, LM NLL alone)."""
    k_enc, k_head = jax.random.split(key)
    raw, dropped = encoder(p, windows[:, :-1], k_enc, train, cfg)
    raw, dropped = raw.astype(jnp.float32), dropped.astype(jnp.float32)
    tar = cfg.tar_coef * jnp.mean((raw[:, 1:] - raw[:, :-1]) ** 2)
    ar = lambda h: cfg.ar_coef * jnp.mean(h**2)  # on the top output the decoder / head sees
    logits = dropped @ p["embed"].T + p["dec_bias"]  # tied decoder
    lm = nll(logits, windows[:, 1:], rows)
    cls, new_bn = head(p["head"], bn, concat_pool(raw), rows, k_head, train, cfg)
    clf = nll(cls, labels, rows)
    return lm + ar(dropped) + tar, clf + ar(raw) + tar, cls, new_bn, lm


def adam_step(p, grads, opt, rates, max_norm, cfg: Config):
    """Adam (PyTorch form, eps 1e-8) on gradients clipped to global norm max_norm, each
    leaf at its group's rate; groups at rate 0 (frozen) get no gradient and no update."""
    groups = layer_groups(p, cfg)
    lr = jax.tree.map(lambda g: rates[g], groups)
    grads = jax.tree.map(lambda gr, r: jnp.where(r > 0, gr, 0.0), grads, lr)
    norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
    grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, max_norm / (norm + 1e-6)), grads)
    m, v, t = opt
    t = t + 1
    b1, b2 = cfg.adam_b1, cfg.adam_b2
    m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
    v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, v, grads)
    c1, c2 = 1 - b1**t, 1 - b2**t
    p = jax.tree.map(lambda p, m, v, r: p - r * (m / c1) / (jnp.sqrt(v / c2) + 1e-8), p, m, v, lr)
    return p, (m, v, t), norm


def update(state: State, cfg: Config):
    windows, labels, rows = batch(state, cfg)
    rates, stage = schedule(state.step, cfg)
    P, F = cfg.pretrain_steps, cfg.lm_steps
    key, k_fw = jax.random.split(state.key)
    switch = (state.step == P) | (state.step == P + F)  # fresh Adam moments per stage
    _, _, _, _, x_ev, y_ev = state.data
    R = cfg.rows
    chunk = jnp.maximum(state.step - P - F, 0) % (cfg.num_eval // R)
    x_ev, y_ev = (
        jax.lax.dynamic_slice_in_dim(a, chunk * R, R).astype(jnp.int32) for a in (x_ev, y_ev)
    )

    def arm(p, opt, bn, rates):
        opt = jax.tree.map(lambda x: jnp.where(switch, jnp.zeros_like(x), x), opt)

        def loss_fn(p):
            lm, clf, cls, new_bn, lm_nll = forward(
                p, bn, windows, labels, rows, k_fw, jnp.asarray(True), cfg
            )
            return jnp.where(stage == 2, clf, lm), (lm_nll, clf, cls, new_bn)

        (loss, (lm_nll, clf, cls, new_bn)), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
        max_norm = jnp.where(stage == 2, cfg.clf_max_grad_norm, cfg.lm_max_grad_norm)
        p, opt, norm = adam_step(p, g, opt, rates, max_norm, cfg)
        bn = jax.tree.map(lambda n, o: jnp.where(stage == 2, n, o), new_bn, bn)
        acc = ((cls.argmax(-1) == labels) * rows).sum() / rows.sum()
        ev = forward(
            p, bn, jnp.pad(x_ev, ((0, 0), (0, 1))), y_ev, jnp.ones(R), k_fw, jnp.asarray(False), cfg
        )[2]
        return p, opt, bn, (loss, lm_nll, clf, acc, (ev.argmax(-1) != y_ev).mean(), norm)

    params, opt, bn, (loss, lm, clf, acc, err, norm) = jax.vmap(arm)(
        state.params, state.opt, state.bn, rates
    )
    metrics = {
        "losses/loss": loss[0],
        "charts/stage": stage.astype(jnp.float32),
        "charts/lm_stage": (stage < 2).astype(jnp.float32),
        "charts/clf_stage": (stage == 2).astype(jnp.float32),
        "charts/lr": rates[0, -2 + (stage == 2)],
        "charts/lr_bottom": rates[0, 0],
    }
    for i, name in enumerate(ARMS):
        metrics.update(
            {
                f"losses/lm_{name}": lm[i],
                f"losses/clf_{name}": clf[i],
                f"charts/train_acc_{name}": acc[i],
                f"charts/val_err_{name}": err[i],
                f"charts/grad_norm_{name}": norm[i],
            }
        )
    return state.replace(params=params, opt=opt, bn=bn, key=key, step=state.step + 1), metrics


# the LM losses are undefined (NaN in the logs) in stage (c), the classifier ones before it
NAN_UNLESS = {
    f"{k}_{a}": flag
    for a in ARMS
    for k, flag in (
        ("losses/lm", "charts/lm_stage"),
        ("losses/clf", "charts/clf_stage"),
        ("charts/train_acc", "charts/clf_stage"),
        ("charts/val_err", "charts/clf_stage"),
    )
}


def evaluate(state: State, cfg: Config):
    """Held-out task error of every arm on all num_eval windows (dropout off, BN running
    statistics)."""
    _, _, _, _, x_ev, y_ev = state.data
    R = cfg.rows

    def chunk(i):
        x = jax.lax.dynamic_slice_in_dim(x_ev, i * R, R).astype(jnp.int32)
        x = jnp.pad(x, ((0, 0), (0, 1)))
        y = jax.lax.dynamic_slice_in_dim(y_ev, i * R, R).astype(jnp.int32)
        f = lambda p, bn: forward(
            p, bn, x, y, jnp.ones(R), jax.random.PRNGKey(0), jnp.asarray(False), cfg
        )[2]
        return (jax.vmap(f)(state.params, state.bn).argmax(-1) != y).mean(-1)  # (3,)

    err = jax.lax.map(chunk, jnp.arange(cfg.num_eval // R)).mean(0)
    return {f"val_err_{a}": err[i] for i, a in enumerate(ARMS)}


def plot(res, cfg: Config, out: str) -> str:
    """Held-out error per classifier epoch of the three arms (mean of seeds, each epoch the
    mean of its updates' held-out chunks), and the ULMFiT arm's rates over the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.plot import save_png

    h = res.history
    n = cfg.clf_steps
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for a in ARMS:
        e = np.asarray(h[f"charts/val_err_{a}"])[:, -n:].reshape(
            -1, cfg.clf_epochs, cfg.clf_steps_per_epoch
        )
        ax[0].plot(np.arange(1, cfg.clf_epochs + 1), e.mean((0, 2)), marker="o", label=a)
    ax[0].set(
        xlabel="classifier epoch",
        ylabel="held-out error",
        ylim=(0, 0.6),
        title=f"{cfg.num_labelled} labelled windows",
    )
    ax[0].legend(fontsize=8)
    lr = np.asarray(h["charts/lr"])[0]
    ax[1].plot(lr, label="top group")
    ax[1].plot(np.asarray(h["charts/lr_bottom"])[0], label="embedding group")
    for x in (cfg.pretrain_steps, cfg.pretrain_steps + cfg.lm_steps):
        ax[1].axvline(x, color="grey", lw=0.5)
    ax[1].set(
        xlabel="update",
        ylabel="learning rate",
        yscale="log",
        title="ULMFiT arm: STLR (a)-(c), discriminative (b), (c)",
    )
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    """`--plot PNG` (this file's only extra flag) draws the error curves and the rates."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(
        Config,
        init,
        update,
        presets=PRESETS,
        evaluate=evaluate,
        argv=argv,
        doc=__doc__,
        nan_unless=NAN_UNLESS,
        summary_keys=[f"val_err_{a}" for a in ARMS] + ["losses/lm_ulmfit"],
    )
    if flags["--plot"] is not None:
        import json

        saved = json.loads((res.run_dir / "config.json").read_text())["config"]
        print(plot(res, Config(**saved), flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
