"""CoVe: contextual word vectors from the encoder of an attentional LSTM translation model,
fed beside the word vectors to a downstream task model.

[1] B. McCann, J. Bradbury, C. Xiong, R. Socher. "Learned in Translation: Contextualized
    Word Vectors." NIPS 2017, arXiv:1708.00107. Released code: github.com/salesforce/cove
    (cove/encoder.py MTLSTM; OpenNMT-py/onmt/Models.py, modules/GlobalAttention.py and
    train.py, the fork that trained it; read for the details below).
[2] L. Weng. "Generalized Language Models" (2019), section "CoVe".

    source words x_1..x_n, their fixed word vectors GloVe(x) (frozen)
    encoder (MT-LSTM): 2 biLSTM layers, h_t = [->h_t; <-h_t]                    [2] Eq. (enc)
      ->h_t = LSTM(x_t, ->h_{t-1}),  <-h_t = LSTM(x_t, <-h_{t+1}),  H = [h_1..h_n]
    decoder: 2-layer LSTM with input feeding and attention, teacher-forced    [2] Eq. (dec)
      s_t   = LSTM([z_{t-1}; h~_{t-1}], s_{t-1})
      a_t   = softmax(H (W_1 s_t + b_1))          (pads of the source masked out)
      h~_t  = tanh(W_2 [H^T a_t; s_t] + b_2)
      p(y_t | H, y_<t) = softmax(W_out h~_t + b_out)
    loss: -sum_t log p(y_t | H, y_<t) over the real target tokens, per sentence
    CoVe(w) = MT-LSTM(GloVe(w))  (the top biLSTM layer, frozen)                 [2] Eq. (CoVe)
    downstream input: v = [GloVe(w); CoVe(w)]                                   [2] Eq. (v)

One run holds both stages: updates 0 .. mt_steps-1 train the MT-LSTM and decoder on
English -> German translation (SGD, as the released train.py); the next task_steps train
three task models side by side on the same labelled batches with the MT-LSTM frozen:
  cove         the task model on [GloVe(w); CoVe(w)]
  glove        the same task model on GloVe(w) alone: a bag of words, no context at all
  random_cove  on [GloVe(w); CoVe(w)] from the MT-LSTM as initialised (never trained)
This is not [1] Table 2's comparison: there the GloVe row's BCN has its own biLSTMs and so
sees context. Here cove vs glove is mostly "context vs none"; cove vs random_cove (the same
inputs and model, only the translation training missing) is the control that measures what
translation pre-training adds.

Data (procedural; nothing downloaded): numbers n in [0, 10^6) drawn log-uniformly (the draw
of common.data.number_pairs), written out in English words ("three hundred and forty-five
thousand, six hundred and seventy-two", tokens: words and the comma) and in German morphemes
("drei hundert fünf und vierzig tausend sechs hundert zwei und siebzig", the num2words
spelling cut into its parts). German puts the units before the tens, so the decoder needs
attention. The phrases are built from num2words's spellings of 0..999 (tests check them
against num2words). The held-out numbers are none of the pairs' or labelled phrases' (a
held-out draw seen in training is redrawn), so they are mostly the larger numbers. The
downstream task, on the English words only: the parity of n (label 1 when odd). The last
unit word decides, and a bag of word vectors does not know which word is last ("one
thousand and twenty" and "twenty thousand and one" have the same words).

Reproduce (CPU demo; 32-d word vectors, MT-LSTM of 2 x 32 per direction, decoder 64):
    python transformers/cove.py --preset quick --num-seeds 2 --plot transformers/cove.png
  Measured (--num-seeds 2, loaded 2-core CPU, 101 s compile + 171 s for the 1900 updates),
  on held-out numbers unseen in training: EN->DE exact match (greedy) 0.998 / 0.998, token
  accuracy 1.000 / 1.000; parity accuracy 0.992 / 0.996 on [GloVe; CoVe] vs 0.809 / 0.809
  on [GloVe; CoVe from the untrained MT-LSTM] and 0.721 / 0.670 on GloVe alone (no
  context). Plot: transformers/cove.png. At the tests' tiny size (16 per direction, 300
  translation updates at lr 0.25, token accuracy 0.236 / 0.173): 0.848 / 0.863 vs 0.652 /
  0.676 (untrained CoVe) and 0.688 / 0.684 (GloVe).
Paper scale (GPU; 300-d vectors, 300 per direction, 600 in the decoder, batch 64):
    python transformers/cove.py --preset paper
[1] [M] (the paper text could not be reached): the MT-LSTMs are trained on Multi30k
  (MT-Small, BLEU 38.5), IWSLT 2016 (MT-Medium, 25.54) and WMT 2017 (MT-Large, 28.96 on
  newstest2016); CoVe helps on every classification task of Table 2 and more with the
  larger MT sets (Fig. 4). The SST-5 53.7, IMDb 8.2 and TREC-6 4.2 (error) that ELMo and
  ULMFiT cite are [1] Table 4 test numbers of BCN + Char + CoVe, not GloVe + CoVe.

Differences from the paper:
- Data: procedural number phrases instead of WMT/IWSLT/Multi30k; GloVe is a frozen random
  table N(0, 0.4^2) (same for every seed; the released repo's README, "Unknown Words",
  gives N(0, 0.4^2) for GloVe-like vectors), not real GloVe (it cannot be downloaded).
- The task model is a simplified biattentive classification network (BCN, [1] Sec. 5):
  its position-wise ReLU layer and its pooling (max, mean, min and self-attentive pooling
  over positions) are kept; its own biLSTM encoder, biattention, integration biLSTM and
  maxout layers are left out, so that context reaches the task model only through CoVe
  (and the glove arm is a bag of words, weaker than [1]'s GloVe baseline).
- The attention has the biases b_1, b_2 of [1]'s equations (the released GlobalAttention
  has none), and masks the source pads in training too (the released code masks only at
  translation time, Translator.py applyMask; its batches are length-sorted). The decoder
  applies dropout once to the layer-0 input (the released one twice: Models.py and
  StackedLSTM). No learning-rate halving on validation perplexity and no stop when it
  falls below -lr_cutoff 0.03 (train.py): a fixed SGD rate for mt_steps updates; fixed
  pairs in the state rather than epochs of a corpus; the task model trains with Adam.
- Greedy decoding for the held-out exact match (no beam search, no BLEU).
"""

import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from common import run

ARMS = ("cove", "glove", "random_cove")
PAD, BOS, EOS = 0, 1, 2
DE_MORPHEMES = ("null", "eins", "ein", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht",
                "neun", "zehn", "elf", "zwölf", "sechzehn", "siebzehn", "zwanzig", "dreißig",
                "vierzig", "fünfzig", "sechzig", "siebzig", "achtzig", "neunzig", "hundert",
                "tausend", "und")
TASKS = {"parity": 2}

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """CoVe [1]: defaults are the released MT-LSTM's training settings (the OpenNMT-py fork's
    train.py defaults and its README's CoVe command -brnn -rnn_size 600 -word_vec_size 300
    -fix_embed)."""

    glove_dim: int = 300
    """size of the frozen source word vectors (GloVe 840B: 300)"""
    hidden_size: int = 600
    """MT-LSTM state: hidden_size / 2 per encoder direction, hidden_size in the decoder"""
    num_layers: int = 2
    """LSTM layers of the encoder (each bidirectional) and of the decoder"""
    tgt_embed_dim: int = 300
    """size of the decoder's target embeddings z (word_vec_size)"""
    dropout: float = 0.2
    """dropout on the encoder's inputs, between layers and outputs, and in the decoder"""
    init_scale: float = 0.1
    """parameters ~ U(-init_scale, init_scale) (param_init)"""
    dtype: str = "float32"
    """compute dtype of the matmuls: float32 or bfloat16 (parameters stay float32)"""
    num_pairs: int = 100_000
    """English -> German training pairs (fixed, held in the state)"""
    batch_size: int = 64
    """translation pairs per update"""
    mt_steps: int = 100_000
    """translation updates (stage 1; train.py stops once its lr, halved by 0.5 on validation
    perplexity, falls below -lr_cutoff 0.03)"""
    mt_lr: float = 1.0
    """SGD learning rate of the translation model"""
    max_grad_norm: float = 5.0
    """global-norm gradient clipping of the translation model"""
    task: str = "parity"
    """downstream task on the English words: parity (label 1 when n is odd)"""
    num_labelled: int = 1024
    """labelled task phrases"""
    task_batch: int = 64
    """labelled phrases per update"""
    task_steps: int = 2000
    """task-model updates (stage 2; the MT-LSTM frozen)"""
    task_lr: float = 1e-3
    """Adam learning rate of the task models"""
    task_hidden: int = 300
    """units of the task model's position-wise ReLU layer"""
    num_eval: int = 1024
    """held-out phrases: translation exact match and task accuracy of evaluate()"""
    data_seed: int = 0
    """seed of the pairs, the labelled and held-out sets and the GloVe table (fixed)"""

    @property
    def num_updates(self) -> int:
        return self.mt_steps + self.task_steps

    @property
    def steps_per_update(self) -> int:
        return self.batch_size

    def validate(self):
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r} must be one of {tuple(TASKS)}")
        if self.hidden_size % 2:
            raise ValueError(f"hidden_size={self.hidden_size} must be even (two directions)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.init_scale <= 0:
            raise ValueError(f"init_scale={self.init_scale} must be > 0")
        if self.mt_steps < 0 or self.task_steps < 0:
            raise ValueError(f"mt_steps={self.mt_steps}, task_steps={self.task_steps} must be >= 0")


PRESETS = {
    # CPU demo: 32-d vectors, 32 per direction, 1500 translation updates of 32 pairs
    "quick": dict(glove_dim=32, hidden_size=64, tgt_embed_dim=32, dropout=0.1, num_pairs=20_000,
                  batch_size=32, mt_steps=1500, num_labelled=256, task_batch=32, task_steps=400,
                  task_hidden=64, num_eval=512),
    "paper": dict(),
}

# --- DATA ---


def en_tokens(text: str) -> list[str]:
    """English words and the comma: "forty-five thousand, six" -> forty five thousand , six."""
    return text.replace("-", " ").replace(",", " ,").split()


def de_tokens(text: str) -> list[str]:
    """The German spelling cut into DE_MORPHEMES by greedy longest match."""
    out, i = [], 0
    by_len = sorted(DE_MORPHEMES, key=len, reverse=True)  # (sorted is stable: a fixed order)
    while i < len(text):
        m = next((m for m in by_len if text.startswith(m, i)), None)
        if m is None:
            raise ValueError(f"no morpheme at {text[i:]!r} of {text!r}")
        out.append(m)
        i += len(m)
    return out


@functools.cache
def spellings():
    """num2words's English and German spellings of 0..999 (the parts of every phrase)."""
    from num2words import num2words

    return tuple([num2words(k, lang=lang) for k in range(1000)] for lang in ("en", "de"))


def spell(n: int) -> tuple[str, str]:
    """(English, German) of 0 <= n < 10^6, composed as num2words writes them."""
    en, de = spellings()
    a, b = divmod(int(n), 1000)
    if a == 0:
        return en[b], de[b]
    e = en[a] + " thousand" + ("" if b == 0 else (", " if b >= 100 else " and ") + en[b])
    d = ("ein" if a == 1 else de[a]) + "tausend" + ("" if b == 0 else de[b])
    return e, d


@functools.cache
def vocabs():
    """(English words, German morphemes), each with PAD, BOS, EOS first."""
    en, _ = spellings()
    words = sorted({w for s in en for w in en_tokens(s)} | {"thousand", ","})
    return ("<pad>", "<s>", "</s>", *words), ("<pad>", "<s>", "</s>", *DE_MORPHEMES)


SRC_LEN, TGT_LEN = 12, 12  # longest English phrase (words and comma); German morphemes + EOS


def numbers(count: int, seed: int) -> np.ndarray:
    """Log-uniform integers in [0, 10^6): common.data.number_pairs's draw (its numbers, without
    its num2words strings, which encode() builds from the pieces instead)."""
    rng = np.random.default_rng(seed)
    return np.floor(np.exp(rng.uniform(0, np.log(1_000_000), count))).astype(int) - 1


@functools.cache
def _pieces():
    """Ids of the English and German spellings of 0..999, and of the joining words."""
    en, de = spellings()
    ev, dv = ({w: i for i, w in enumerate(v)} for v in vocabs())
    E = [[ev[w] for w in en_tokens(e)] for e in en]
    D = [[dv[m] for m in de_tokens(d)] for d in de]
    return E, D, ev["thousand"], ev[","], ev["and"], dv["ein"], dv["tausend"]


def encode(ns) -> tuple[np.ndarray, np.ndarray]:
    """Source ids (N, SRC_LEN) and target ids (N, TGT_LEN + 1) = [BOS, y..., EOS, PAD...],
    the token ids of spell(n) composed from the pieces of 0..999."""
    E, D, thousand, comma, and_, ein, tausend = _pieces()
    src = np.zeros((len(ns), SRC_LEN), np.uint8)
    tgt = np.zeros((len(ns), TGT_LEN + 1), np.uint8)
    for i, n in enumerate(ns):
        a, b = divmod(int(n), 1000)
        x, y = E[b], D[b]
        if a:
            x = E[a] + [thousand] + ([] if b == 0 else [comma if b >= 100 else and_] + E[b])
            y = ([ein] if a == 1 else D[a]) + [tausend] + (D[b] if b else [])
        src[i, : len(x)] = x
        tgt[i, : len(y) + 2] = [BOS, *y, EOS]
    return src, tgt


def labels(ns, task: str) -> np.ndarray:
    assert task == "parity", task
    return (np.asarray(ns) % 2).astype(np.int32)


@functools.cache
def split_numbers(cfg: Config) -> tuple:
    """The numbers of the pairs, of the labelled set and of the held-out set; a held-out
    draw that is among the pairs or the labelled phrases is redrawn (held out = unseen)."""
    s = cfg.data_seed
    n_pairs, n_lab = numbers(cfg.num_pairs, s), numbers(cfg.num_labelled, s + 1)
    seen = set(n_pairs.tolist()) | set(n_lab.tolist())
    cand = numbers(16 * cfg.num_eval + 256, s + 2)
    n_ev = cand[~np.isin(cand, list(seen))][: cfg.num_eval]
    if len(n_ev) < cfg.num_eval:
        raise ValueError(f"num_eval={cfg.num_eval}: too few numbers unseen in training")
    return n_pairs, n_lab, n_ev


@functools.cache
def device_data(cfg: Config) -> tuple:
    """(pairs src, tgt; labelled src, labels; held-out src, tgt, labels) as numpy, and the
    frozen GloVe stand-in (V_en, glove_dim) ~ N(0, 0.4^2), PAD's row zero."""
    n_pairs, n_lab, n_ev = split_numbers(cfg)
    src, tgt = encode(n_pairs)
    lab_src, _ = encode(n_lab)
    ev_src, ev_tgt = encode(n_ev)
    g = np.random.default_rng(cfg.data_seed).normal(0, 0.4, (len(vocabs()[0]), cfg.glove_dim))
    g[PAD] = 0
    y_lab, y_ev = labels(n_lab, cfg.task), labels(n_ev, cfg.task)
    return src, tgt, lab_src, y_lab, ev_src, ev_tgt, y_ev, g.astype(np.float32)


# --- NETWORKS ---


def uniform_tree(key, shapes: dict, scale: float):
    leaves, tree = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [jax.random.uniform(k, s, jnp.float32, -scale, scale)
                                     for k, s in zip(keys, leaves, strict=True)])


def lstm_shapes(n_in: int, n: int) -> dict:
    return {"w_ih": (n_in, 4 * n), "w_hh": (n, 4 * n), "b": (4 * n,)}


def init_mt(key, cfg: Config) -> dict:
    """Encoder (2 directions per layer) and decoder parameters, U(-0.1, 0.1)."""
    h, d, L = cfg.hidden_size // 2, cfg.hidden_size, cfg.num_layers
    v_de = len(vocabs()[1])
    enc = [
        {dr: lstm_shapes(cfg.glove_dim if l == 0 else 2 * h, h) for dr in ("fwd", "bwd")}
        for l in range(L)
    ]
    dec = [lstm_shapes(cfg.tgt_embed_dim + d if l == 0 else d, d) for l in range(L)]
    shapes = {"enc": enc, "dec": dec, "embed": (v_de, cfg.tgt_embed_dim), "W_1": (d, d),
              "b_1": (d,), "W_2": (2 * d, d), "b_2": (d,), "W_out": (d, v_de), "b_out": (v_de,)}
    return uniform_tree(key, shapes, cfg.init_scale)


def lstm_cell(p, x, h, c, dt):
    """One LSTM step, gates i, f, g, o (PyTorch's order, one bias)."""
    z = x.astype(dt) @ p["w_ih"].astype(dt) + h.astype(dt) @ p["w_hh"].astype(dt)
    z = z.astype(jnp.float32) + p["b"]
    i, f, g, o = jnp.split(z, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return jax.nn.sigmoid(o) * jnp.tanh(c), c


def lstm_scan(p, x, mask, reverse: bool, dt):
    """One direction over (B, T, in) by lax.scan; at pads (mask 0) the state is carried
    unchanged and the output is 0, so a padded phrase reads as the phrase alone (the
    backward direction starts at its last real word). Returns (outputs (B, T, n), (h, c))."""
    n = p["w_hh"].shape[0]

    def step(carry, xm):
        x_t, m_t = xm
        h, c = lstm_cell(p, x_t, *carry, dt)
        m = m_t[:, None]
        h, c = jnp.where(m, h, carry[0]), jnp.where(m, c, carry[1])
        return (h, c), jnp.where(m, h, 0.0)

    zeros = jnp.zeros((x.shape[0], n), jnp.float32)
    xs = (x.swapaxes(0, 1), mask.swapaxes(0, 1))  # (T, B, in), (T, B)
    final, out = jax.lax.scan(step, (zeros, zeros), xs, reverse=reverse)
    return out.swapaxes(0, 1), final


def dropout(x, rate: float, key, train):
    """Inverted dropout, on when the traced flag `train` is true."""
    if rate == 0:
        return x
    keep = jax.random.bernoulli(key, 1 - rate, x.shape)
    return jnp.where(train, jnp.where(keep, x / (1 - rate), 0.0), x)


def mt_lstm(enc, glove_x, mask, key, train, cfg: Config):
    """The encoder: per layer h_t = [->h_t; <-h_t] (forward first, as torch's biLSTM).
    Returns (H (B, T, hidden_size) of the top layer, per layer the final (h, c) of both
    directions concatenated (the decoder's initial state))."""
    dt = jnp.dtype(cfg.dtype)
    keys = jax.random.split(key, cfg.num_layers + 1)
    x, finals = glove_x, []
    for l, p in enumerate(enc):
        x = dropout(x, cfg.dropout, keys[l], train)  # on the inputs and between layers
        fw, (hf, cf) = lstm_scan(p["fwd"], x, mask, False, dt)
        bw, (hb, cb) = lstm_scan(p["bwd"], x, mask, True, dt)
        x = jnp.concatenate([fw, bw], -1)  # [2] Eq. (enc): h_t = [->h_t; <-h_t]
        finals.append((jnp.concatenate([hf, hb], -1), jnp.concatenate([cf, cb], -1)))
    return dropout(x, cfg.dropout, keys[-1], train), finals


def cove(enc, glove_table, src, cfg: Config):
    """CoVe(w) = MT-LSTM(GloVe(w)) ([2] Eq. (CoVe)): the top layer, no dropout, frozen
    (stop-gradient), as the released MTLSTM: (B, T, hidden_size), 0 at pads."""
    off = jnp.asarray(False)
    H, _ = mt_lstm(enc, glove_table[src], src > PAD, jax.random.PRNGKey(0), off, cfg)
    return jax.lax.stop_gradient(H)


def attention(p, s, H, src_mask, dt):
    """[2] Eq. (dec): a_t = softmax(H (W_1 s_t + b_1)) over the real source positions;
    h~_t = tanh(W_2 [H^T a_t; s_t] + b_2). s (B, d), H (B, T, d) -> (h~_t, a_t (B, T))."""
    q = (s.astype(dt) @ p["W_1"].astype(dt)).astype(jnp.float32) + p["b_1"]  # (B, d)
    scores = jnp.einsum("btd,bd->bt", H, q)
    alpha = jax.nn.softmax(jnp.where(src_mask, scores, -jnp.inf), axis=-1)  # pads: 0
    ctx = jnp.einsum("bt,btd->bd", alpha, H)  # H^T a_t
    z = jnp.concatenate([ctx, s], -1).astype(dt) @ p["W_2"].astype(dt)
    return jnp.tanh(z.astype(jnp.float32) + p["b_2"]), alpha


def decoder_step(p, carry, y_prev, H, src_mask, key, train, cfg: Config):
    """One teacher-forced (or greedy) step: s_t = LSTM([z_{t-1}; h~_{t-1}], s_{t-1})
    (input feeding), attention, logits W_out h~_t + b_out. carry = (h (L, B, d), c (L, B,
    d), h~_{t-1} (B, d)). Returns (carry, (logits (B, V), a_t (B, T)))."""
    dt = jnp.dtype(cfg.dtype)
    hs, cs, h_tilde = carry
    keys = jax.random.split(key, cfg.num_layers + 1)
    x = jnp.concatenate([p["embed"][y_prev], h_tilde], -1)  # [z_{t-1}; h~_{t-1}]
    new_h, new_c = [], []
    for l, q in enumerate(p["dec"]):
        x, c = lstm_cell(q, dropout(x, cfg.dropout, keys[l], train), hs[l], cs[l], dt)
        new_h, new_c = [*new_h, x], [*new_c, c]
    h_tilde, alpha = attention(p, x, H, src_mask, dt)
    out = dropout(h_tilde, cfg.dropout, keys[-1], train)
    logits = (out.astype(dt) @ p["W_out"].astype(dt)).astype(jnp.float32) + p["b_out"]
    return (jnp.stack(new_h), jnp.stack(new_c), h_tilde), (logits, alpha)


def decoder_init(finals, B: int, cfg: Config):
    """The decoder's first carry: the encoder's final (h, c) per layer (directions
    concatenated, Models.py _fix_enc_hidden) and h~_0 = 0."""
    hs, cs = (jnp.stack([f[i] for f in finals]) for i in (0, 1))
    return hs, cs, jnp.zeros((B, cfg.hidden_size))


def translate_logits(p, glove_table, src, tgt_in, key, train, cfg: Config):
    """Teacher forcing: the decoder reads tgt_in (B, M) = [BOS, y_1..y_{M-1}] and returns the
    logits (B, M, V) of y_1..y_M and the attention weights (B, M, T)."""
    mask = src > PAD
    k_enc, k_dec = jax.random.split(key)
    H, finals = mt_lstm(p["enc"], glove_table[src], mask, k_enc, train, cfg)
    carry = decoder_init(finals, src.shape[0], cfg)
    keys = jax.random.split(k_dec, tgt_in.shape[1])

    def step(carry, yk):
        return decoder_step(p, carry, yk[0], H, mask, yk[1], train, cfg)

    _, (logits, alpha) = jax.lax.scan(step, carry, (tgt_in.swapaxes(0, 1), keys))
    return logits.swapaxes(0, 1), alpha.swapaxes(0, 1)


def greedy_translate(p, glove_table, src, cfg: Config):
    """Greedy decoding of TGT_LEN tokens (the previous argmax fed back): (B, TGT_LEN)."""
    mask, off = src > PAD, jnp.asarray(False)
    H, finals = mt_lstm(p["enc"], glove_table[src], mask, jax.random.PRNGKey(0), off, cfg)
    B = src.shape[0]
    carry = decoder_init(finals, B, cfg)

    def step(c, _):
        carry, y = c
        carry, (logits, _) = decoder_step(p, carry, y, H, mask, jax.random.PRNGKey(0), off, cfg)
        y = logits.argmax(-1)
        return (carry, y), y

    _, ys = jax.lax.scan(step, (carry, jnp.full((B,), BOS)), None, length=TGT_LEN)
    return ys.swapaxes(0, 1)


def init_task(key, n_in: int, cfg: Config) -> dict:
    """Simplified BCN: position-wise ReLU layer, self-attentive pooling scores, classifier
    over [max; mean; min; self-attentive] pooling."""
    k = cfg.task_hidden
    C = TASKS[cfg.task]
    shapes = {"W_f": (n_in, k), "b_f": (k,), "v": (k,), "d": (1,), "W_c": (4 * k, C), "b_c": (C,)}
    return uniform_tree(key, shapes, 1 / np.sqrt(n_in))


def task_logits(p, v, mask):
    """v (B, T, D) word inputs, mask (B, T) -> class logits (B, C); pads excluded from every
    pooling. Self-attentive pooling: beta = softmax(X v + d) over positions."""
    x = jax.nn.relu(v @ p["W_f"] + p["b_f"])  # (B, T, k)
    m = mask[..., None]
    big = jnp.float32(1e9)
    x_max = jnp.where(m, x, -big).max(1)
    x_min = jnp.where(m, x, big).min(1)
    x_mean = (x * m).sum(1) / jnp.maximum(m.sum(1), 1)
    beta = jax.nn.softmax(jnp.where(mask, x @ p["v"] + p["d"], -jnp.inf), axis=-1)
    x_self = jnp.einsum("bt,btk->bk", beta, x)
    return jnp.concatenate([x_max, x_mean, x_min, x_self], -1) @ p["W_c"] + p["b_c"]


def arm_inputs(arm: str, glove_x, cove_trained, cove_random):
    """[GloVe(w); CoVe(w)] for the CoVe arms ([2] Eq. (v)), GloVe(w) for the baseline."""
    if arm == "glove":
        return glove_x
    return jnp.concatenate([glove_x, cove_trained if arm == "cove" else cove_random], -1)


# --- LOSS ---


def masked_nll(logits, targets):
    """The loss as the released train.py: -sum_t log p(y_t | H, y_<t) over the real (non-PAD)
    target tokens, summed over the batch and divided by the number of sentences
    (NLLLoss(size_average=False), loss.div(batch_size)); and, for the logs, the per-token
    mean NLL and the token accuracy."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    w = (targets != PAD).astype(jnp.float32)
    n = jnp.maximum(w.sum(), 1)
    tok_nll, acc = (nll * w).sum() / n, ((logits.argmax(-1) == targets) * w).sum() / n
    return (nll * w).sum() / targets.shape[0], (tok_nll, acc)


def xent(logits, y):
    logp = jax.nn.log_softmax(logits, -1)
    return -jnp.take_along_axis(logp, y[:, None], -1).mean(), (logits.argmax(-1) == y).mean()


# --- STATE ---


@struct.dataclass
class State:
    params: Any
    """{"mt": encoder + decoder, "task": {arm: task model}}"""
    enc0: Any
    """the encoder as initialised (the random_cove arm's frozen MT-LSTM)"""
    opt_mt: Any
    opt_task: Any
    key: jax.Array
    step: jax.Array
    data: tuple
    """device_data(cfg): uint8 ids, int32 labels, the float32 GloVe table; an input of the
    compiled chunks, not constants"""


def optimisers(cfg: Config):
    mt = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), optax.sgd(cfg.mt_lr))
    return mt, optax.adam(cfg.task_lr)


def init(key, cfg: Config) -> State:
    k_mt, k_task, key = jax.random.split(key, 3)
    mt = init_mt(k_mt, cfg)
    n_in = {a: cfg.glove_dim + (0 if a == "glove" else cfg.hidden_size) for a in ARMS}
    ks = jax.random.split(k_task, len(ARMS))
    task = {a: init_task(k, n_in[a], cfg) for a, k in zip(ARMS, ks, strict=True)}
    o_mt, o_task = optimisers(cfg)
    return State({"mt": mt, "task": task}, mt["enc"], o_mt.init(mt), o_task.init(task), key,
                 jnp.zeros((), jnp.int32), tuple(jnp.asarray(a) for a in device_data(cfg)))


# --- UPDATE ---


def update(state: State, cfg: Config):
    src_all, tgt_all, lab_src, lab_y, _, _, _, glove = state.data
    key, k_mt, k_task, k_drop = jax.random.split(state.key, 4)
    idx = jax.random.randint(k_mt, (cfg.batch_size,), 0, src_all.shape[0])
    src, tgt = src_all[idx].astype(jnp.int32), tgt_all[idx].astype(jnp.int32)
    j = jax.random.randint(k_task, (cfg.task_batch,), 0, lab_src.shape[0])
    x_lab, y_lab = lab_src[j].astype(jnp.int32), lab_y[j]
    task_stage = state.step >= cfg.mt_steps
    train = ~task_stage

    def mt_loss(mt):
        logits, _ = translate_logits(mt, glove, src, tgt[:, :-1], k_drop, train, cfg)
        return masked_nll(logits, tgt[:, 1:])

    (loss, (nll, acc)), g_mt = jax.value_and_grad(mt_loss, has_aux=True)(state.params["mt"])
    o_mt, o_task = optimisers(cfg)
    u_mt, s_mt = o_mt.update(g_mt, state.opt_mt, state.params["mt"])
    u_mt = jax.tree.map(lambda u: jnp.where(task_stage, 0.0, u), u_mt)  # frozen in stage 2
    s_mt = jax.tree.map(lambda n, o: jnp.where(task_stage, o, n), s_mt, state.opt_mt)
    mt = optax.apply_updates(state.params["mt"], u_mt)

    glove_x, mask = glove[x_lab], x_lab > PAD
    cove_t = cove(mt["enc"], glove, x_lab, cfg)  # CoVe(w) = MT-LSTM(GloVe(w)), frozen
    cove_r = cove(state.enc0, glove, x_lab, cfg)

    def task_loss(tp):
        out = {a: xent(task_logits(tp[a], arm_inputs(a, glove_x, cove_t, cove_r), mask), y_lab)
               for a in ARMS}
        return sum(o[0] for o in out.values()), out

    (_, out), g_t = jax.value_and_grad(task_loss, has_aux=True)(state.params["task"])
    u_t, s_t = o_task.update(g_t, state.opt_task)
    u_t = jax.tree.map(lambda u: jnp.where(task_stage, u, 0.0), u_t)
    s_t = jax.tree.map(lambda n, o: jnp.where(task_stage, n, o), s_t, state.opt_task)
    task = optax.apply_updates(state.params["task"], u_t)
    metrics = {"losses/mt": loss, "losses/mt_token_nll": nll, "charts/mt_token_acc": acc,
               "charts/mt_param_norm": optax.global_norm(mt),
               "charts/mt_stage": train.astype(jnp.float32),
               "charts/task_stage": task_stage.astype(jnp.float32),
               **{f"losses/task_{a}": out[a][0] for a in ARMS},
               **{f"charts/task_acc_{a}": out[a][1] for a in ARMS}}
    return state.replace(params={"mt": mt, "task": task}, opt_mt=s_mt, opt_task=s_t, key=key,
                         step=state.step + 1), metrics


# the translation metrics are undefined (NaN in the logs) in stage 2, the task ones before
NAN_UNLESS = {**{k: "charts/mt_stage" for k in ("losses/mt", "losses/mt_token_nll",
                                                 "charts/mt_token_acc")},
              **{f"{k}_{a}": "charts/task_stage" for a in ARMS
                 for k in ("losses/task", "charts/task_acc")}}


def evaluate(state: State, cfg: Config):
    """Held-out translation (greedy): exact match of the whole German phrase and teacher-
    forced token accuracy; held-out task accuracy of each arm."""
    _, _, _, _, ev_src, ev_tgt, ev_y, glove = state.data
    src, tgt = ev_src.astype(jnp.int32), ev_tgt.astype(jnp.int32)
    mt, off = state.params["mt"], jnp.asarray(False)
    logits, _ = translate_logits(mt, glove, src, tgt[:, :-1], jax.random.PRNGKey(0), off, cfg)
    _, (_, tok) = masked_nll(logits, tgt[:, 1:])
    ys, want = greedy_translate(mt, glove, src, cfg), tgt[:, 1:]
    ok = jnp.where(want == PAD, True, ys == want).all(-1)
    res = {"val_exact_match": ok.mean(), "val_token_acc": tok}
    glove_x, mask = glove[src], src > PAD
    c_t, c_r = cove(mt["enc"], glove, src, cfg), cove(state.enc0, glove, src, cfg)
    for a in ARMS:
        lg = task_logits(state.params["task"][a], arm_inputs(a, glove_x, c_t, c_r), mask)
        res[f"val_acc_{a}"] = (lg.argmax(-1) == ev_y).mean()
    return res


def plot(res, out: str) -> str:
    """Translation token accuracy over stage 1 and held-out task accuracy per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.plot import save_png

    h, f = res.history, {k: np.asarray(v) for k, v in res.final.items()}
    stage1 = np.asarray(h["charts/task_stage"][0]) == 0
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    acc = np.asarray(h["charts/mt_token_acc"])[:, stage1]
    ax[0].plot(acc.mean(0))
    ax[0].set(xlabel="translation update", ylabel="train token accuracy",
              title=f"EN->DE held-out exact match {f['val_exact_match'].mean():.2f}")
    n = len(f["val_acc_cove"])
    for i, a in enumerate(ARMS):
        ax[1].bar(np.arange(n) + (i - 1) * 0.27, f[f"val_acc_{a}"], 0.27, label=a)
    ax[1].set(xlabel="seed", ylabel="held-out task accuracy", xticks=np.arange(n), ylim=(0, 1),
              title="task model on [GloVe; CoVe] vs GloVe")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    """`--plot PNG` (this file's only extra flag) draws the curves and the accuracies."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=__doc__, nan_unless=NAN_UNLESS,
                   summary_keys=["val_exact_match", "val_token_acc",
                                 *[f"val_acc_{a}" for a in ARMS]])
    if flags["--plot"] is not None:
        print(plot(res, flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
