"""GPT: generative pre-training of a post-LN Transformer decoder, then supervised fine-tuning
with an auxiliary language-modelling objective.

[1] A. Radford, K. Narasimhan, T. Salimans, I. Sutskever. "Improving Language Understanding
    by Generative Pre-Training." OpenAI technical report, 2018 (no arXiv id). Released code:
    github.com/openai/finetune-transformer-lm (train.py, opt.py), read for the details below.
[2] L. Weng. "Generalized Language Models" (2019), section "OpenAI GPT".

    stage 1, unsupervised pre-training on a text stream U = (u_1, ..., u_n):
      L1(U) = -sum_i log P(u_i | u_{i-k}, ..., u_{i-1})                       [1] Eq. 1
      h_0 = U W_e + W_p;  h_l = block(h_{l-1});  P(u) = softmax(h_n W_e^T)     [1] Eq. 2
      block (post-LN, released code):  n = LN(x + Attn(x));  h = LN(n + MLP(n)),
        Attn causal multi-head (softmax(q k^T / sqrt(d_k) + M) v), MLP = W_2 GELU(W_1 n)
    stage 2, supervised fine-tuning on labelled (x^1..x^m, y):
      P(y | x^1..x^m) = softmax(h_l^m W_y)  (h_l^m: the final state of the extract token)
      L2(C) = -sum_{(x,y)} log P(y | x^1..x^m)                                [1] Eq. 3-4
      L3(C) = L2(C) + lambda * L1(C),  lambda = 0.5                           [1] Eq. 5
      ([2] writes L_cls without the minus sign; both are minimised as NLLs here)
    input transformation ([1] Sec. 3.3, Fig. 1): [start] x [extract] for one text,
      [start] x1 [delim] x2 [extract] for a pair; the start, delimiter and extract
      embeddings are new parameters of the fine-tuning stage
    learning rate: pre-training lr_max * min(t/2000, 1/2 (1 + cos(pi t / T)));
      fine-tuning lr * (t/T / 0.002 while t/T <= 0.002, else 1) * (1 - t/T)
      (opt.py warmup_cosine / warmup_linear; t counts from 0 within the stage)
    bits per character = L1 / ln 2, perplexity = exp(L1) per token ([2] "Perplexity")

One run holds both stages: updates 0 .. pretrain_steps-1 pre-train the language model on
character windows of a corpus shipped with Python; the next finetune_steps (3 epochs of the
labelled set) fine-tune the same parameters on L3 with fresh Adam moments. A traced flag of
the state (`scratch`, set by --finetune-from-scratch) re-initialises the parameters to the
seed's initial ones at the switch, so "fine-tuned from the pre-trained model" and "trained
from scratch on the labelled set" run as twins in one compiled program (the tests do this).

Task (procedural, because no labelled text set ships offline in this repo's dependencies;
gensim's polarity corpus is not installed): windows of text, half of them with their
characters randomly permuted; the label says which (0 as written, 1 shuffled). Character
counts are identical in both classes, so only knowledge of the order of characters helps:
what a left-to-right language model learns. The labelled set (num_labelled windows) comes from the
training split, the evaluation set from the validation split (never pre-trained on).
Tokenisation: characters (the sorted characters of the corpus) plus the start, delimiter,
extract and padding tokens; the paper preset sizes the table as GPT's 40,478-token BPE.

Real corpora: --corpus wikitext-2 (or enwik8, text8, wikitext-103, 1b-words) --data-dir
DIR reads common.data.REAL_CORPORA from DIR (characters, as the built-in corpora).
Hugging Face checkpoints: --init-from DIR (or DIR/model.safetensors) loads an
OpenAIGPTModel / OpenAIGPTLMHeadModel state dict (openai-gpt) through params_from_hf:
tokens_embed -> the first vocab_size rows of our token table, positions_embed -> positions,
h.{l}.attn.c_attn / attn.c_proj / mlp.c_fc / mlp.c_proj (Conv1D, stored (in, out) like a
flax kernel: copied, not transposed) and ln_1 / ln_2 -> h{l}. The block is HF's exactly
(post-LN, afn "gelu" = HF's gelu_new, the tanh form; LN eps 1e-5; causal mask -1e4 there,
-inf here: the same softmax). Not mapped: our 4 special-token rows (start, delimiter,
extract, pad, after the text rows: the new fine-tuning embeddings of [1] Sec. 3.3) and the
classifier W_y keep their random init; lm_head.weight is tied in both. The Config
expressing openai-gpt: --vocab-size 40478 --seq-len 512 and the paper's model (the default);
ours then has 40,482 LM columns, the first 40,478 equal HF's logits (tests/transformers/
test_gpt_hf.py: 3.7e-7 on a random 2-layer model). The ids must be the checkpoint's BPE
ids: this file's own tokens are characters, so loaded weights only mean something for
ids tokenised elsewhere. The checkpoint enters the compiled init as constants;
--finetune-from-scratch still re-initialises to the random init.

Reproduce (CPU demo, pydoc text, 2 layers of d 64, context 64, 1500 pre-training updates of
32 windows, then 3 epochs of 4096 labelled examples in batches of 32, lr 1e-3):
    python transformers/gpt.py --preset quick                      # pre-trained
    python transformers/gpt.py --preset quick --pretrain-steps 0   # baseline: no pre-training
  (--finetune-from-scratch is the twin baseline: the same pre-training run, re-initialised
  at the switch)
  Measured through the command line (2-core CPU shared with other jobs, --num-seeds 2):
  held-out task accuracy 0.777 / 0.814 pre-trained vs 0.490 / 0.502 with --pretrain-steps 0
  (fine-tuning only; the from-scratch twins of the same seeds, re-initialised at the switch,
  scored 0.500 / 0.500); validation 3.02 / 3.00 bits/char vs 3.84 / 3.85; 6.6 min wall,
  288 CPU s (pre-trained) and 1.7 min, 94 CPU s (--pretrain-steps 0). Plot:
  transformers/gpt_finetune.png. The preset before this calibration (512 labelled, 48
  fine-tuning updates at lr 5e-4): 0.553 / 0.566 vs 0.500 / 0.500, 2.74 bits/char.
  Slow gate (tests/transformers/test_gpt.py, pytest -m slow): context 32, 2000 pre-training
  updates of 16, 8 epochs of 1024 labelled in batches of 16: 0.814 / 0.742 pre-trained vs
  0.482 / 0.484 from-scratch twins vs 0.467 / 0.475 with no pre-training (6.5 min wall,
  195 CPU s).
Paper scale (GPU; 12 layers of 768, 12 heads, context 512, batch 64, 1M updates):
    python transformers/gpt.py --preset paper
[1] (BooksCorpus pre-training, 40k BPE; the test sets): MNLI-m 82.1, SNLI 89.9 (Table 2);
  RACE 59.0, Story Cloze 86.5 (Table 3); CoLA 45.4 (Matthews corr.), SST-2 91.3, GLUE 72.8
  (Table 4). The comparison this file's twins make is [1] Table 5: the GLUE average falls
  from 74.7 to 59.9 "w/o pre-training" (SST-2 91.3 -> 84.0, CoLA 45.4 -> 18.9). [1] Sec. 4.1
  says the LM "achieves a very low token level perplexity of 18.4 on this corpus", right
  after a sentence on the 1B Word Benchmark, and names no held-out split: which corpus and
  split the 18.4 is on is not certain. Checked against papers-with-code's results for [1]
  (MNLI-m, SNLI, RACE, Story Cloze), Wikipedia's GPT-1 article (CoLA, GLUE) and a
  transcription of [1]'s text and Tables 4-5 (SST-2, Table 5, the 18.4 sentence); the PDF
  itself was not read.

Differences from the paper:
- Data: character windows of the pydoc reference manual (or the stdlib sources) instead of
  BooksCorpus with 40k BPE; a procedural shuffled-text task instead of GLUE/RACE/ROCStories.
  Numbers are not comparable with [1]'s.
- The embedding dropout acts on the summed token + position embeddings; the released code
  drops entries of the embedding matrix itself (so the tied LM head sees it too).
- Token and position embeddings are two tables and the LM head is tied to the token table
  (vocabulary + special tokens); the released code keeps one table of vocab + special +
  n_ctx rows and its LM softmax also ranges over the position rows.
- The pre-training optimiser is the fine-tuning one of the released code (Adam with
  decoupled L2 0.01 on matrices, global-norm clipping at 1) under [1]'s pre-training schedule;
  [1] states L2 0.01 but not the clipping for pre-training. The paper's pre-training length is
  "100 epochs"; 1M updates is the post's table figure.
- Pre-training batches and fine-tuning batches share one shape (max of the two batch sizes,
  rows beyond a stage's batch are weighted 0), so both stages run in one compiled update.
- Fine-tuning batches are drawn as epochs over the labelled set (the remainder of an epoch
  is dropped), 3 epochs; the released code shuffles likewise.
- Attention uses jax.nn.dot_product_attention when attention dropout is off (evaluation);
  with dropout the explicit softmax path runs. GELU is the tanh approximation (released code).
"""

import functools
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from common import data, run

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """GPT [1]: defaults are the paper's model and both stages' hyperparameters."""

    corpus: str = "pydoc"
    """text of common.data.text_corpus for pre-training and the task: pydoc, stdlib, this, or
    a real corpus of common.data.REAL_CORPORA (read from data_dir)"""
    data_dir: str | None = None
    """folder of a real corpus when `corpus` names one: common.data.REAL_CORPORA"""
    init_from: str | None = None
    """a downloaded Hugging Face checkpoint: its model.safetensors (or the folder holding it),
    read by common.data.read_safetensors and mapped by params_from_hf"""
    val_fraction: float = 0.1
    """last fraction of the text held out (validation LM loss and the task's test set)"""
    vocab_size: int | None = 40478
    """text-token rows of the embedding (the paper's BPE: 40,478); None: the corpus's own
    characters. Characters are the tokens; the 4 special tokens come after these rows"""
    seq_len: int = 512
    """context n_ctx (tokens per window and per task sequence)"""
    num_layers: int = 12
    """transformer blocks"""
    d_model: int = 768
    """hidden size"""
    num_heads: int = 12
    """attention heads"""
    embd_dropout: float = 0.1
    """dropout on the summed embeddings"""
    attn_dropout: float = 0.1
    """dropout on the attention probabilities"""
    resid_dropout: float = 0.1
    """dropout on the attention and MLP outputs before their residual sums"""
    clf_dropout: float = 0.1
    """dropout on the extract token's final state before W_y"""
    dtype: str = "float32"
    """compute dtype of the matmuls: float32 or bfloat16 (parameters stay float32)"""
    batch_size: int = 64
    """pre-training windows per update"""
    pretrain_steps: int = 1_000_000
    """pre-training updates (stage 1)"""
    pretrain_lr: float = 2.5e-4
    """pre-training maximum learning rate"""
    pretrain_warmup: int = 2000
    """pre-training linear warm-up updates (then cosine to 0)"""
    num_labelled: int = 4096
    """labelled training examples of the task (windows, half of them shuffled)"""
    num_eval: int = 1024
    """held-out task examples scored by evaluate()"""
    finetune_batch: int = 32
    """fine-tuning examples per update"""
    finetune_epochs: int = 3
    """epochs over the labelled set"""
    finetune_lr: float = 6.25e-5
    """fine-tuning maximum learning rate"""
    finetune_warmup_frac: float = 0.002
    """fraction of fine-tuning spent in linear warm-up (then linear decay to 0)"""
    lm_coef: float = 0.5
    """lambda: weight of the auxiliary LM loss L1 in L3 = L2 + lambda L1"""
    finetune_from_scratch: bool = False
    """re-initialise the parameters when fine-tuning starts (the no-pre-training baseline)"""
    weight_decay: float = 0.01
    """decoupled L2 on weight matrices (the paper's 'modified L2', w = 0.01)"""
    max_grad_norm: float = 1.0
    """global-norm gradient clipping"""
    adam_b1: float = 0.9
    """Adam beta1"""
    adam_b2: float = 0.999
    """Adam beta2"""
    adam_eps: float = 1e-8
    """Adam epsilon"""
    task_seed: int = 0
    """seed of the labelled and held-out task sets (fixed across training seeds)"""
    eval_windows: int = 256
    """validation text windows for the LM bits/char of evaluate()"""

    @property
    def rows(self) -> int:
        return max(self.batch_size, self.finetune_batch)  # one batch shape for both stages

    @property
    def finetune_steps(self) -> int:
        return self.finetune_epochs * (self.num_labelled // self.finetune_batch)

    @property
    def num_updates(self) -> int:
        return self.pretrain_steps + self.finetune_steps

    @property
    def steps_per_update(self) -> int:
        return self.rows * self.seq_len  # tokens per update (padded rows included)

    def validate(self):
        if self.corpus in data.REAL_CORPORA and self.data_dir is None:
            data.text_corpus(self.corpus)  # text_corpus's ValueError: pass data_dir
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}"
            )
        if self.seq_len < 3:
            raise ValueError(f"seq_len={self.seq_len} must be >= 3 (start, text, extract)")
        if self.num_labelled < self.finetune_batch:
            raise ValueError(
                f"num_labelled={self.num_labelled} must be >= finetune_batch={self.finetune_batch}"
            )
        for name in ("num_eval", "eval_windows"):
            if getattr(self, name) % self.rows:
                raise ValueError(
                    f"{name}={getattr(self, name)} is not a multiple of "
                    f"max(batch_size, finetune_batch)={self.rows}"
                )
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")
        for name in ("embd_dropout", "attn_dropout", "resid_dropout", "clf_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction} must be in (0, 1)")
        if self.pretrain_steps < 0 or self.pretrain_warmup < 0:
            raise ValueError(
                f"pretrain_steps={self.pretrain_steps} and pretrain_warmup="
                f"{self.pretrain_warmup} must be >= 0"
            )
        if self.finetune_epochs < 1:
            raise ValueError(f"finetune_epochs={self.finetune_epochs} must be >= 1")
        if self.adam_eps <= 0:
            raise ValueError(f"adam_eps={self.adam_eps} must be > 0")
        chars = len(text_data(self.corpus, self.val_fraction, self.data_dir)[2])
        if self.vocab_size is not None and self.vocab_size < chars:
            raise ValueError(
                f"vocab_size={self.vocab_size} is below the corpus's {chars} characters"
            )


PRESETS = {
    # CPU demo: 2 blocks of d 64, context 64; 1500 pre-training updates, 3 epochs of 4096
    # (384 fine-tuning updates; with 512 examples, 48 updates, at lr 5e-4 the held-out
    # accuracy was 0.553 / 0.566 vs 0.500 / 0.500 from scratch)
    "quick": dict(
        vocab_size=None,
        seq_len=64,
        num_layers=2,
        d_model=64,
        num_heads=4,
        batch_size=32,
        pretrain_steps=1500,
        pretrain_lr=2e-3,
        pretrain_warmup=100,
        num_labelled=4096,
        num_eval=512,
        finetune_lr=1e-3,
        eval_windows=256,
    ),
    "paper": dict(),
}

# --- DATA ---


@functools.cache
def text_data(corpus: str, val_fraction: float, data_dir: str | None = None):
    """(train ids, val ids, characters) of the corpus as numpy (loaded once)."""
    return data.char_corpus(corpus, val_fraction, data_dir=data_dir)


def specials(cfg: Config) -> dict:
    """Token ids of the special tokens, after the text rows; `rows`: embedding table size."""
    v = cfg.vocab_size or len(text_data(cfg.corpus, cfg.val_fraction, cfg.data_dir)[2])
    return dict(start=v, delim=v + 1, extract=v + 2, pad=v + 3, rows=v + 4)


def transform(texts, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """[1] Sec. 3.3 input transformation, on the host. Each item is one token sequence x
    (-> [start] x [extract]) or a tuple of them (-> [start] x1 [delim] x2 ... [extract]),
    right-padded with PAD to seq_len + 1 (the input and its next-token targets). Returns
    (tokens (N, seq_len + 1) int32, extract positions (N,))."""
    s = specials(cfg)
    out = np.full((len(texts), cfg.seq_len + 1), s["pad"], np.int32)
    pos = np.zeros(len(texts), np.int32)
    for i, item in enumerate(texts):
        parts = item if isinstance(item, tuple) else (item,)
        seq = [s["start"]]
        for j, p in enumerate(parts):
            seq += ([s["delim"]] if j else []) + list(p)
        seq.append(s["extract"])
        if len(seq) > cfg.seq_len:
            raise ValueError(f"a task sequence of {len(seq)} tokens exceeds seq_len={cfg.seq_len}")
        out[i, : len(seq)], pos[i] = seq, len(seq) - 1
    return out, pos


@functools.cache
def task_data(cfg: Config):
    """The shuffle task: (train tokens, train labels, eval tokens, eval labels) as numpy.
    Windows of seq_len - 2 characters (start and extract fill the context); label 1 when
    the window's characters were randomly permuted, 0 when it is the text as written;
    balanced. Training windows come from the training split, eval from validation."""
    train_ids, val_ids, _ = text_data(cfg.corpus, cfg.val_fraction, cfg.data_dir)
    rng = np.random.default_rng(cfg.task_seed)
    n = cfg.seq_len - 2

    def make(ids, count):
        starts = rng.integers(0, len(ids) - n, count)
        labels = (np.arange(count) % 2).astype(np.int32)  # balanced
        rng.shuffle(labels)
        texts = [
            rng.permutation(ids[s : s + n]) if y else ids[s : s + n]
            for s, y in zip(starts, labels, strict=True)
        ]
        return transform(texts, cfg)[0], labels

    return (*make(train_ids, cfg.num_labelled), *make(val_ids, cfg.num_eval))


# --- NETWORKS ---

init_w = nn.initializers.normal(0.02)  # [1] Sec. 4.1: N(0, 0.02) weights


def causal_attention(q, k, v, drop_rate: float, rng, train: bool):
    """softmax(q k^T / sqrt(d_k) + M) v on (B, L, H, d_k), M = -inf above the diagonal;
    attention dropout on the probabilities when training (released code's _attn)."""
    if not train or drop_rate == 0:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)
    w = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    L = q.shape[1]
    w = jnp.where(jnp.tril(jnp.ones((L, L), bool)), w, jnp.finfo(w.dtype).min)
    p = jax.nn.softmax(w.astype(jnp.float32), axis=-1)
    keep = jax.random.bernoulli(rng, 1 - drop_rate, p.shape)
    p = jnp.where(keep, p / (1 - drop_rate), 0).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)  # (B, L, H, d_k)


class Block(nn.Module):
    """Post-LN decoder block ([1] Fig. 1, released code `block`):
    n = LN(x + Attn(x)); h = LN(n + MLP(n))."""

    cfg: Config

    @nn.compact
    def __call__(self, x, train: bool):
        cfg, (B, L, d) = self.cfg, x.shape
        dense = functools.partial(nn.Dense, kernel_init=init_w, dtype=jnp.dtype(cfg.dtype))
        drop = nn.Dropout(cfg.resid_dropout, deterministic=not train)
        qkv = dense(3 * d, name="c_attn")(x).reshape(B, L, 3, cfg.num_heads, d // cfg.num_heads)
        rng = self.make_rng("dropout") if train and cfg.attn_dropout else None
        a = causal_attention(
            qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], cfg.attn_dropout, rng, train
        ).reshape(B, L, d)  # (B, L, d)
        a = drop(dense(d, name="c_proj")(a))
        n = nn.LayerNorm(epsilon=1e-5, name="ln_1")(x + a)
        m = dense(d, name="mlp_proj")(nn.gelu(dense(4 * d, name="mlp_fc")(n)))
        return nn.LayerNorm(epsilon=1e-5, name="ln_2")(n + drop(m))


class GPT(nn.Module):
    """Token + position embeddings, post-LN blocks, tied LM head (h W_e^T) and the
    classifier W_y on the extract token's final state. Returns (lm logits (B, L, rows),
    class logits (B, 2))."""

    cfg: Config
    rows: int

    @nn.compact
    def __call__(self, tokens, extract_pos, train: bool = False):
        cfg, L = self.cfg, tokens.shape[1]
        embed = nn.Embed(self.rows, cfg.d_model, embedding_init=init_w, name="tokens")
        pos = self.param("positions", init_w, (cfg.seq_len, cfg.d_model))
        h = embed(tokens) + pos[:L]  # [1] Eq. 2: h_0 = U W_e + W_p
        h = nn.Dropout(cfg.embd_dropout, deterministic=not train)(h)
        for l in range(cfg.num_layers):
            h = Block(cfg, name=f"h{l}")(h, train)
        lm_logits = embed.attend(h.astype(jnp.float32))  # P(u) = softmax(h_n W_e^T)
        h_m = h[jnp.arange(h.shape[0]), extract_pos]  # (B, d): h_l^m of the extract token
        h_m = nn.Dropout(cfg.clf_dropout, deterministic=not train)(h_m)
        cls_logits = nn.Dense(2, kernel_init=init_w, name="clf")(h_m.astype(jnp.float32))
        return lm_logits, cls_logits


# --- HUGGING FACE CHECKPOINTS ---

# ours -> OpenAIGPTModel's names under h.{l}. (Conv1D weights are stored (in, out), as flax
# kernels: copied as they are, no transpose)
HF_BLOCK = {("c_attn", "kernel"): "attn.c_attn.weight", ("c_attn", "bias"): "attn.c_attn.bias",
            ("c_proj", "kernel"): "attn.c_proj.weight", ("c_proj", "bias"): "attn.c_proj.bias",
            ("mlp_fc", "kernel"): "mlp.c_fc.weight", ("mlp_fc", "bias"): "mlp.c_fc.bias",
            ("mlp_proj", "kernel"): "mlp.c_proj.weight", ("mlp_proj", "bias"): "mlp.c_proj.bias",
            ("ln_1", "scale"): "ln_1.weight", ("ln_1", "bias"): "ln_1.bias",
            ("ln_2", "scale"): "ln_2.weight", ("ln_2", "bias"): "ln_2.bias"}


def params_from_hf(tensors: dict, cfg: Config, params) -> dict:
    """HF OpenAIGPT state-dict tensors (names as in openai-gpt's model.safetensors, with or
    without the LM model's `transformer.` prefix) as this file's params. `params` (this
    file's init) gives the shapes and keeps what HF lacks: the 4 special-token rows after
    the vocab_size text rows and the classifier W_y. lm_head.weight is not read (tied to
    tokens_embed, as ours). A shape mismatch raises naming the tensor and the field."""
    t = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    if f"h.{cfg.num_layers}.ln_1.weight" in t:
        raise ValueError(f"init_from: the checkpoint has more than num_layers={cfg.num_layers} "
                         "blocks: set num_layers to its n_layer")
    flat = dict(jax.tree_util.tree_flatten_with_path(params["params"])[0])
    flat = {tuple(k.key for k in path): v for path, v in flat.items()}
    v = specials(cfg)["rows"] - 4

    def get(name, shape, fields):
        if name not in t:
            raise ValueError(f"init_from: tensor {name!r} is missing from the checkpoint "
                             f"(num_layers={cfg.num_layers}?)")
        a = np.asarray(t[name], np.float32)
        if a.shape != tuple(shape):
            raise ValueError(f"init_from: tensor {name!r} has shape {a.shape}, ours "
                             f"{tuple(shape)}: set {fields} to the checkpoint's")
        return jnp.asarray(a)

    emb = flat["tokens", "embedding"]
    out = {"tokens": {"embedding": emb.at[:v].set(get("tokens_embed.weight", (v, cfg.d_model),
                                                      "vocab_size / d_model"))},
           "positions": get("positions_embed.weight", flat["positions",].shape,
                            "seq_len (n_positions) / d_model"),
           "clf": params["params"]["clf"]}
    for l in range(cfg.num_layers):
        out[f"h{l}"] = {}
        for (mod, leaf), name in HF_BLOCK.items():
            arr = get(f"h.{l}.{name}", flat[f"h{l}", mod, leaf].shape, "d_model")
            out[f"h{l}"].setdefault(mod, {})[leaf] = arr
    return {"params": out}


def load_hf(path: str, cfg: Config, params) -> dict:
    """init_from: read model.safetensors (the file, or in the folder) and map it; a
    config.json beside it must agree on n_head (not visible in the tensors' shapes), the
    activation and the LN epsilon."""
    return params_from_hf(data.read_hf_checkpoint(path, {
        "n_head": (cfg.num_heads, "set num_heads to it"),
        "afn": (("gelu", "gelu_new"), "this file has the tanh GELU (gelu_new) only"),
        "layer_norm_epsilon": (1e-5, "this file's LN eps is 1e-5")}), cfg, params)


# --- LOSS ---


def lm_loss(lm_logits, tokens, weights):
    """L1 per token (nats): inputs tokens[:, :-1], targets tokens[:, 1:]; `weights` (B, L)
    marks the targets that count (not PAD, rows in the batch). Per-sequence mean, then the
    mean over rows with any weight (released code: sum(loss M) / sum(M) per sequence)."""
    logp = jax.nn.log_softmax(lm_logits, axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # (B, L)
    per_seq = (nll * weights).sum(1) / jnp.maximum(weights.sum(1), 1)
    used = weights.sum(1) > 0
    return (per_seq * used).sum() / jnp.maximum(used.sum(), 1)


def cls_loss(cls_logits, labels, row_weights):
    """L2 per example: -log softmax(h_l^m W_y)[y], mean over the weighted rows."""
    logp = jax.nn.log_softmax(cls_logits, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
    return (nll * row_weights).sum() / jnp.maximum(row_weights.sum(), 1)


def objective(l1, l2, finetune, lm_coef):
    """Stage 1: L1. Stage 2: L3 = L2 + lambda L1 ([1] Eq. 5)."""
    return jnp.where(finetune, l2 + lm_coef * l1, l1)


def learning_rate(step, cfg: Config):
    """The rate of update `step` (0-based over the whole run). Pre-training: linear warm-up
    over pretrain_warmup updates, then 1/2 (1 + cos(pi t / T)) ([1] Sec. 4.1, the form of
    opt.py warmup_cosine). Fine-tuning (t counted from its first update): opt.py
    warmup_linear, (x / w if x <= w else 1) * (1 - x) with x = t / T_ft, w = 0.002."""
    t = step.astype(jnp.float32)
    warm = t / max(cfg.pretrain_warmup, 1)
    pre = cfg.pretrain_lr * jnp.where(
        t < cfg.pretrain_warmup, warm, 0.5 * (1 + jnp.cos(jnp.pi * t / max(cfg.pretrain_steps, 1)))
    )
    x = (t - cfg.pretrain_steps) / cfg.finetune_steps
    w = cfg.finetune_warmup_frac
    ft = cfg.finetune_lr * jnp.where(x <= w, x / max(w, 1e-12), 1.0) * (1 - x)
    return jnp.where(step < cfg.pretrain_steps, pre, ft)


def adam_step(params, grads, opt, lr, cfg: Config):
    """Released opt.py `adam` with its weight-decay fix: clip by global norm, then
    p <- p - lr_t (m_t / (sqrt(v_t) + eps) + l2 p [matrices only]), with
    lr_t = lr sqrt(1 - b2^t) / (1 - b1^t). Returns (params, (m, v, t))."""
    m, v, t = opt
    norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
    grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, cfg.max_grad_norm / (norm + 1e-12)), grads)
    t = t + 1
    b1, b2 = cfg.adam_b1, cfg.adam_b2
    m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
    v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, v, grads)
    lr_t = lr * jnp.sqrt(1 - b2**t) / (1 - b1**t)

    def step(p, m, v):
        decay = cfg.weight_decay * p if p.ndim > 1 else 0.0
        return p - lr_t * (m / (jnp.sqrt(v) + cfg.adam_eps) + decay)

    return jax.tree.map(step, params, m, v), (m, v, t), norm


# --- STATE ---


@struct.dataclass
class State:
    params: Any
    opt: Any
    """Adam (m, v, t); zeroed when fine-tuning starts"""
    key: jax.Array
    init_key: jax.Array
    """the key of the initial parameters (the from-scratch re-initialisation reuses it)"""
    step: jax.Array
    scratch: jax.Array
    """1 (traced): re-initialise the parameters when fine-tuning starts"""
    data: tuple
    """device_data(cfg): the text's ids and the task's sets, stored uint8 (uint16 above 256
    rows): an input of the compiled chunks, not constants of each program; one copy per
    seed (pydoc 0.8 MB at the quick preset, stdlib 12 MB)"""


def compact(a, rows: int):
    """Token ids (or labels) in the narrowest unsigned type that holds `rows` values; the
    gathers cast them back to int32."""
    return np.asarray(a).astype(np.uint8 if rows <= 256 else np.uint16)


def device_data(cfg: Config) -> tuple:
    """(train ids, val ids, x_lab, y_lab, x_ev, y_ev) as compact numpy arrays."""
    train_ids, val_ids, _ = text_data(cfg.corpus, cfg.val_fraction, cfg.data_dir)
    x_lab, y_lab, x_ev, y_ev = task_data(cfg)
    rows = specials(cfg)["rows"]
    return (
        compact(train_ids, rows),
        compact(val_ids, rows),
        compact(x_lab, rows),
        compact(y_lab, 2),
        compact(x_ev, rows),
        compact(y_ev, 2),
    )


def model_of(cfg: Config) -> GPT:
    return GPT(cfg, specials(cfg)["rows"])


def init_params(key, cfg: Config):
    L = cfg.seq_len
    return model_of(cfg).init(key, jnp.zeros((1, L), jnp.int32), jnp.zeros((1,), jnp.int32))


def zeros_opt(params):
    z = jax.tree.map(jnp.zeros_like, params)
    return (z, z, jnp.zeros((), jnp.int32))


def init(key, cfg: Config) -> State:
    k_init, key = jax.random.split(key)
    params = init_params(k_init, cfg)
    if cfg.init_from is not None:  # the checkpoint's arrays replace the random ones
        params = load_hf(cfg.init_from, cfg, params)
    return State(
        params,
        zeros_opt(params),
        key,
        k_init,
        jnp.zeros((), jnp.int32),
        jnp.asarray(int(cfg.finetune_from_scratch), jnp.int32),
        tuple(jnp.asarray(a) for a in device_data(cfg)),
    )


# --- UPDATE ---


def batch(state: State, cfg: Config):
    """The update's (tokens (R, L + 1), labels (R,), row weights (R,), finetune flag):
    pre-training windows of the training text, or a minibatch of the labelled set (an
    epoch is a permutation of it, drawn from the seed's key)."""
    train_ids, _, x_lab, y_lab, _, _ = state.data
    R, n = cfg.rows, cfg.num_labelled
    finetune = state.step >= cfg.pretrain_steps
    k_lm, k_ep = jax.random.split(jax.random.fold_in(state.key, 0))
    x, y = data.lm_windows(k_lm, train_ids, R, cfg.seq_len)
    windows = jnp.concatenate([x, y[:, -1:]], axis=1).astype(jnp.int32)  # (R, L + 1)
    per_epoch = n // cfg.finetune_batch
    t = jnp.maximum(state.step - cfg.pretrain_steps, 0)
    perm = jax.random.permutation(jax.random.fold_in(state.init_key, t // per_epoch), n)
    idx = perm[((t % per_epoch) * cfg.finetune_batch + jnp.arange(R)) % n]
    tokens = jnp.where(finetune, x_lab[idx].astype(jnp.int32), windows)
    rows = jnp.arange(R) < jnp.where(finetune, cfg.finetune_batch, cfg.batch_size)
    return tokens, y_lab[idx].astype(jnp.int32), rows.astype(jnp.float32), finetune


def update(state: State, cfg: Config):
    s = specials(cfg)
    model = model_of(cfg)
    # [1] stage switch: fresh Adam moments; the scratch twin also gets its initial weights
    switch = state.step == cfg.pretrain_steps
    fresh = init_params(state.init_key, cfg)
    reinit = switch & (state.scratch > 0)
    params = jax.tree.map(lambda a, b: jnp.where(reinit, b, a), state.params, fresh)
    opt = jax.tree.map(lambda x: jnp.where(switch, jnp.zeros_like(x), x), state.opt)

    tokens, labels, rows, finetune = batch(state, cfg)
    inputs = tokens[:, :-1]
    extract_pos = jnp.argmax(inputs == s["extract"], axis=1)  # released code's pool_idx
    weights = (tokens[:, 1:] != s["pad"]) * rows[:, None]
    key, k_drop = jax.random.split(state.key)

    def loss_fn(p):
        lm_logits, cls_logits = model.apply(
            p, inputs, extract_pos, train=True, rngs={"dropout": k_drop}
        )
        l1 = lm_loss(lm_logits, tokens, weights)
        l2 = cls_loss(cls_logits, labels, rows)
        acc = ((cls_logits.argmax(-1) == labels) * rows).sum() / rows.sum()
        return objective(l1, l2, finetune, cfg.lm_coef), (l1, l2, acc)

    (loss, (l1, l2, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    lr = learning_rate(state.step, cfg)
    params, opt, gnorm = adam_step(params, grads, opt, lr, cfg)
    metrics = {
        "losses/loss": loss,
        "losses/lm": l1,
        "losses/cls": l2,
        "charts/train_acc": acc,
        "charts/finetuning": finetune.astype(jnp.float32),
        "charts/bits_per_char": data.bits(l1),
        "charts/perplexity": data.perplexity(l1),
        "charts/lr": lr,
        "charts/grad_norm": gnorm,
    }
    return state.replace(params=params, opt=opt, key=key, step=state.step + 1), metrics


# losses/cls and charts/train_acc are undefined (NaN in the logs) during pre-training
NAN_UNLESS = {"losses/cls": "charts/finetuning", "charts/train_acc": "charts/finetuning"}


def evaluate(state: State, cfg: Config):
    """Held-out task accuracy and L2 on num_eval examples of the validation split, and the
    LM's bits/char and perplexity (per character) on eval_windows validation windows."""
    s = specials(cfg)
    model = model_of(cfg)
    _, val_ids, _, _, x_ev, y_ev = state.data
    val_ids = val_ids.astype(jnp.int32)  # once per evaluation (keeps its sums bit for bit)
    R, L = cfg.rows, cfg.seq_len
    ones = jnp.ones((R,), jnp.float32)

    def task_chunk(i):
        x = jax.lax.dynamic_slice_in_dim(x_ev, i * R, R).astype(jnp.int32)
        y = jax.lax.dynamic_slice_in_dim(y_ev, i * R, R).astype(jnp.int32)
        _, logits = model.apply(state.params, x[:, :-1], jnp.argmax(x == s["extract"], 1))
        return cls_loss(logits, y, ones), (logits.argmax(-1) == y).mean()

    starts = jnp.linspace(0, val_ids.shape[0] - L - 2, cfg.eval_windows).astype(jnp.int32)

    def lm_chunk(st):
        w = jax.vmap(lambda a: jax.lax.dynamic_slice(val_ids, (a,), (L + 1,)))(st)
        logits, _ = model.apply(state.params, w[:, :-1], jnp.zeros((R,), jnp.int32))
        return lm_loss(logits, w, jnp.ones((R, L)))

    l2, acc = jax.lax.map(task_chunk, jnp.arange(cfg.num_eval // R))
    l1 = jax.lax.map(lm_chunk, starts.reshape(-1, R)).mean()
    return {
        "val_acc": acc.mean(),
        "val_cls_loss": l2.mean(),
        "val_lm_loss": l1,
        "val_bits_per_char": data.bits(l1),
        "val_perplexity": data.perplexity(l1),
    }


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
        nan_unless=NAN_UNLESS,
        summary_keys=[
            "val_acc",
            "val_cls_loss",
            "val_bits_per_char",
            "val_perplexity",
            "losses/lm",
            "charts/train_acc",
        ],
    )


if __name__ == "__main__":
    main()
