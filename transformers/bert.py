"""BERT: pre-training a bidirectional post-LN Transformer encoder with the masked language
model and next-sentence prediction, then fine-tuning a classifier on the pooled [CLS] and a
start/end span head.

[1] J. Devlin, M.-W. Chang, K. Lee, K. Toutanova. "BERT: Pre-training of Deep Bidirectional
    Transformers for Language Understanding." arXiv:1810.04805. Released code:
    github.com/google-research/bert @eedf571 (create_pretraining_data.py, modeling.py,
    run_pretraining.py, optimization.py, run_classifier.py, run_squad.py), read for the
    details below.
[2] L. Weng. "Generalized Language Models" (2019), section "BERT".

    input: [CLS] A [SEP] B [SEP] [PAD]...; token type 0 on [CLS] A [SEP], 1 on B [SEP]
      h_0 = LN(E_tok[x] + E_pos[i] + E_type[t]), learned positions        [1] Sec. 3, Fig. 2
      block (post-LN): a = LN(h + Attn(h)); h' = LN(a + W_2 gelu(W_1 a)), attention
        bidirectional over the non-[PAD] keys
    masked LM ([1] Sec. 3.1 Task #1, create_masked_lm_predictions): choose
      k = min(max_predictions_per_seq, max(1, round(0.15 n))) of the n tokens (never [CLS],
      [SEP], [PAD]); each chosen one becomes [MASK] w.p. 0.8, a random token w.p. 0.1, stays
      w.p. 0.1; the loss is on the chosen positions only:
      L_MLM = sum_j w_j (-log p(x_j | x~)) / (sum_j w_j + 1e-5),
      p = softmax(LN(gelu(h W_t)) E_tok^T + b)  (the output table is tied to E_tok)
    next sentence ([1] Sec. 3.1 Task #2): B is the real continuation w.p. 0.5 (label 0),
      else a span from another document (label 1); p = softmax(tanh(h_[CLS] W_p) W_nsp)
    pre-training loss L = L_MLM + L_NSP (run_pretraining.py, [2]: "the sum of the mean ...")
    fine-tuning ([1] Sec. 4, [2]): classification softmax(tanh(h_[CLS] W_p) W_cls);
      span: P_start(i) = softmax_i(h_i W_s), P_end(i) = softmax_i(h_i W_e),
      L_span = (CE(start) + CE(end)) / 2 (run_squad.py); no answer: start = end = [CLS]
      ([1] Sec. 4.3, SQuAD 2.0)
    optimiser (optimization.py): AdamW without bias correction, p <- p - lr (m / (sqrt(v) +
      1e-6) + 0.01 p), no decay on LayerNorm and bias parameters, gradients clipped to global
      norm 1; lr(t) = lr t / W for t < W, else lr (1 - t / T) (linear decay from step 0)

One run holds both stages, as transformers/gpt.py does: pretrain_steps updates of MLM + NSP
on instances of the training split, then finetune_steps updates on the labelled task with
fresh Adam moments and re-initialised task heads; the traced `scratch` flag (set by
--finetune-from-scratch) also re-initialises the encoder at the switch, so "fine-tuned from
the pre-trained model" and "trained from scratch" are twins in one compiled program.

Data: characters of Python's reference manual (common.data.text_corpus). Documents are the
blocks between two blank lines (pydoc's topics and large sections), "sentences" end at
. ! ? and are cut at word boundaries to at most (seq_len - 3) // 4 characters (a scaled-down
WordPiece sentence: ~4 per sequence, as ~25-token sentences in 128). Instances are built on
the host exactly as create_instances_from_document (target length, short_seq_prob, a_end,
the random document, putting unused segments back, truncate_seq_pair), dupe_factor times.
Task (procedural; no labelled text set ships offline): windows of seq_len - 2 characters of
the text, half of them with span_len consecutive characters replaced, each by a different
character drawn from the training text's unigram distribution. The classifier says whether a
window was tampered with, the span head finds the replaced characters ([CLS] for none). The
replacements keep the character statistics of the text; only knowing which characters are
plausible from BOTH sides tells them apart, which is what the masked LM learns. (The task
before this one permuted a substring: it keeps the window's bag of characters, and a linear
probe of the pre-trained encoder's [CLS] features scored 0.508 on it with the whole window
permuted, 0.500 untrained: nothing for fine-tuning to start from, and neither twin learned
it. On 8 replaced characters the same probe scores 0.625 pre-trained vs 0.500 untrained.)
Labelled windows come from the training split, the held-out ones from the validation split
(never pre-trained on).

Real corpora: --corpus wikitext-2 (or enwik8, text8, wikitext-103, 1b-words) --data-dir
DIR reads common.data.REAL_CORPORA from DIR (characters, documents and sentences as above).
Hugging Face checkpoints: --init-from DIR (or DIR/model.safetensors) loads a
BertForPreTraining (or BertModel + heads) state dict (bert-base-uncased) through
params_from_hf: embeddings.{word,position,token_type}_embeddings, embeddings.LayerNorm ->
ours; encoder.layer.{l}.attention.self.{query,key,value} -> layer_{l}/qkv (side by side),
attention.output.dense / LayerNorm, intermediate.dense, output.dense / LayerNorm -> layer_{l};
pooler.dense -> pooler; cls.predictions.transform.dense / LayerNorm -> transform /
transform_LayerNorm; cls.predictions.bias -> output_bias; cls.seq_relationship -> nsp. torch
Linear weights are (out, in): transposed. Old LayerNorm names gamma / beta are read too.
The block is HF's exactly with --gelu erf (HF's hidden_act "gelu"; bert-base-uncased's), LN
eps 1e-12, 2 token types; masked keys get -10000 here, the dtype's minimum there: the same
softmax. Not mapped: the fine-tuning heads (classifier, span) keep their random init;
cls.predictions.decoder.weight is tied to the word embeddings in both. config.json must
agree on num_attention_heads, hidden_act, layer_norm_eps and type_vocab_size. The Config
expressing bert-base-uncased: the paper preset's model (the default) with --gelu erf; its
MLM and NSP logits then equal HF's (tests/transformers/test_bert_hf.py: 8.3e-7 and 5.7e-7
on a random 2-layer model). The ids must be the checkpoint's WordPiece ids, and the [PAD]
id our key mask uses is this file's (after the characters): for the checkpoint's own ids
build BERT(cfg, 30522, pad=0). The checkpoint enters the compiled init as constants; a
run with --finetune-from-scratch still re-initialises the encoder to the random init.

Reproduce (CPU demo, pydoc text, 2 layers of d 64, context 64, 1000 pre-training updates of
32 instances, then 3 epochs of 4096 labelled windows in batches of 32 at lr 3e-4, span_len 12):
    python transformers/bert.py --preset quick --num-seeds 2                      # pre-trained
    python transformers/bert.py --preset quick --num-seeds 2 --pretrain-steps 0   # no pre-training
  (--finetune-from-scratch is the twin baseline of the same run.) Measured through the
  command line (2-core CPU shared with other jobs, load ~13; 23.5 min wall for the
  pre-trained run, 4.5 min of it compiling, and 5 min for the other): over updates 900-1000
  the MLM's accuracy on the chosen positions is 0.251 / 0.258 against 0.150 / 0.152 for the
  unigram guess on the same positions (MLM loss 2.86 / 2.83 nats), NSP accuracy 0.574 / 0.574.
  Held-out task accuracy after fine-tuning: **0.566 / 0.635 pre-trained vs 0.500 / 0.500
  without pre-training** (the classifier loss of the latter stays at ln 2); pre-training helps,
  by little. The span head does not learn at this size (exact match 0.5 / 0.5 for both: always
  "no answer"), and fine-tuning costs the pre-trained encoder most of its MLM (held out 0.154
  / 0.163 after it, unigram 0.148). Measured on the way (one pre-trained encoder of 1500
  updates, seed 0, transformers/bert_finetune.png shows the runs above): the task before this
  one (a permuted substring of 24, or the whole window) stayed at 0.5 at lr 1e-3 and 1e-4;
  12 replaced characters 0.570 at 1e-4 and 0.594 at 3e-4 (its twin from scratch 0.500); 4
  replaced characters 0.5 at both rates. At lr 1e-3 (the old preset) the fine-tuning
  collapses the MLM (held-out 0.08-0.11, below the unigram guess) and the task stays at 0.5.
Paper scale (GPU; BERT-base: 12 layers of 768, 12 heads, 512 positions, 30,522 rows,
batch 256, 1M updates, lr 1e-4, warm-up 10k):
    python transformers/bert.py --preset paper
[1] BERT-base: GLUE average 79.6 (Table 1: MNLI-m 84.6, SST-2 93.5, CoLA 52.1); SQuAD v1.1
  dev EM 80.8 / F1 88.5 (Table 2); SQuAD 2.0 (BERT-large) test F1 83.1 (Table 3). Ablation
  (Table 5): "No NSP" MNLI-m 83.9 vs 84.4; a left-to-right LM without NSP 82.1 and SQuAD F1
  87.9 -> 77.8. Not comparable with this file's numbers.

Differences from the paper:
- Data: characters of the pydoc text with 4 special tokens instead of BooksCorpus +
  Wikipedia with WordPiece; sentences are cut to fit the character context (see above); a
  procedural replaced-characters task (classify and find the span) instead of GLUE / SQuAD.
- Masking is dynamic (drawn again every time an instance is used, in `update`); the released
  code masks each instance once, dupe_factor = 10 copies with different masks. The random
  replacement is drawn from the text characters; the released code draws from the whole
  WordPiece vocabulary, special tokens included.
- Pre-training instances are drawn uniformly with replacement; one sequence length
  (the paper trains 90% of the steps at 128 tokens, then 10% at 512).
- Fine-tuning trains the classifier and the span head together (L_cls + L_span, the default
  finetune_heads = both) so that one run shows both; [1] fine-tunes each task on its own
  (--finetune-heads cls or span). The two stages share one batch shape (max of both batch
  sizes; rows beyond a stage's batch get weight 0). The span logits are not masked at [PAD]
  (as run_squad.py; the task windows have no padding).
- GELU is the tanh approximation (the released modeling.py) by default; HF transformers
  uses the exact erf form (--gelu erf). Weights are N(0, 0.02) instead of the truncated
  normal of modeling.py.
- Attention uses jax.nn.dot_product_attention when attention dropout is off (evaluation);
  with dropout the explicit softmax path runs (-10000 on masked keys in both, as released).
"""

import functools
import random
import re
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
    """BERT [1]: defaults are BERT-base and the released code's pre-training settings."""

    corpus: str = "pydoc"
    """text of common.data.text_corpus: pydoc, stdlib, this, or a real corpus of
    common.data.REAL_CORPORA (read from data_dir)"""
    data_dir: str | None = None
    """folder of a real corpus when `corpus` names one: common.data.REAL_CORPORA"""
    init_from: str | None = None
    """a downloaded Hugging Face checkpoint: its model.safetensors (or the folder holding it),
    read by common.data.read_safetensors and mapped by params_from_hf"""
    val_fraction: float = 0.1
    """last fraction of the text held out (held-out MLM/NSP instances and task windows)"""
    vocab_size: int | None = 30522
    """rows of the token table (BERT's WordPiece: 30,522); None: the corpus's characters +
    4 special tokens ([CLS], [SEP], [MASK], [PAD] follow the characters)"""
    seq_len: int = 512
    """max_seq_length: tokens per instance, special tokens included"""
    max_positions: int = 512
    """rows of the learned position table (max_position_embeddings)"""
    num_layers: int = 12
    """encoder blocks"""
    d_model: int = 768
    """hidden size"""
    num_heads: int = 12
    """attention heads"""
    d_ff: int = 3072
    """intermediate size of the feed-forward layer"""
    gelu: str = "tanh"
    """GELU of the blocks and the MLM transform: tanh (the approximation of the released
    modeling.py) or erf (the exact form: HF's hidden_act 'gelu', as bert-base-uncased)"""
    hidden_dropout_prob: float = 0.1
    """dropout on the embeddings and on every sub-layer output"""
    attention_dropout_prob: float = 0.1
    """dropout on the attention probabilities"""
    dtype: str = "float32"
    """compute dtype of the matmuls: float32 or bfloat16 (parameters stay float32)"""
    mask_prob: float = 0.15
    """masked_lm_prob: fraction of the tokens chosen for prediction"""
    mask_token_prob: float = 0.8
    """chosen tokens replaced by [MASK]"""
    random_token_prob: float = 0.1
    """chosen tokens replaced by a random token (the rest stay unchanged)"""
    max_predictions_per_seq: int = 76
    """cap on chosen tokens per instance (released: 20 at length 128, 76 at 512)"""
    short_seq_prob: float = 0.1
    """instances whose target length is drawn in [2, seq_len - 3]"""
    dupe_factor: int = 10
    """passes over the documents when building the instances (different A/B splits)"""
    batch_size: int = 256
    """pre-training instances per update"""
    pretrain_steps: int = 1_000_000
    """pre-training updates"""
    pretrain_lr: float = 1e-4
    """pre-training peak learning rate"""
    pretrain_warmup: int = 10_000
    """pre-training linear warm-up updates (then linear decay to 0 at pretrain_steps)"""
    span_len: int = 16
    """consecutive characters replaced in a tampered task window (drawn from the unigram
    distribution of the training text, each different from the one it replaces)"""
    num_labelled: int = 4096
    """labelled task windows (half tampered)"""
    num_eval: int = 1024
    """held-out task windows scored by evaluate()"""
    finetune_batch: int = 32
    """fine-tuning windows per update"""
    finetune_epochs: int = 3
    """epochs over the labelled set"""
    finetune_lr: float = 5e-5
    """fine-tuning peak learning rate"""
    finetune_warmup_frac: float = 0.1
    """warmup_proportion of fine-tuning (then linear decay to 0)"""
    finetune_heads: str = "both"
    """fine-tuning loss: cls (pooled [CLS] classifier), span (start/end) or both (sum)"""
    finetune_from_scratch: bool = False
    """re-initialise the encoder when fine-tuning starts (the no-pre-training twin)"""
    weight_decay: float = 0.01
    """decoupled weight decay (not on LayerNorm and bias parameters)"""
    max_grad_norm: float = 1.0
    """global-norm gradient clipping"""
    adam_b1: float = 0.9
    """Adam beta1"""
    adam_b2: float = 0.999
    """Adam beta2"""
    adam_eps: float = 1e-6
    """Adam epsilon"""
    task_seed: int = 0
    """seed of the instances, the task sets and the held-out masks (fixed across seeds)"""
    eval_instances: int = 256
    """held-out MLM/NSP instances scored by evaluate()"""

    @property
    def rows(self) -> int:
        return max(self.batch_size, self.finetune_batch)  # one batch shape for both stages

    @property
    def sentence_chars(self) -> int:
        return max(8, (self.seq_len - 3) // 4)

    @property
    def finetune_steps(self) -> int:
        return self.finetune_epochs * (self.num_labelled // self.finetune_batch)

    @property
    def num_updates(self) -> int:
        return self.pretrain_steps + self.finetune_steps

    @property
    def steps_per_update(self) -> int:
        return self.rows * self.seq_len

    def validate(self):
        if self.corpus in data.REAL_CORPORA and self.data_dir is None:
            data.text_corpus(self.corpus)  # text_corpus's ValueError: pass data_dir
        if self.gelu not in ("tanh", "erf"):
            raise ValueError(f"gelu={self.gelu!r} must be 'tanh' or 'erf'")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}"
            )
        if not 8 <= self.seq_len <= self.max_positions:
            raise ValueError(
                f"seq_len={self.seq_len} must be in [8, max_positions={self.max_positions}]"
            )
        if not 1 <= self.max_predictions_per_seq <= self.seq_len:
            raise ValueError(
                f"max_predictions_per_seq={self.max_predictions_per_seq} must "
                f"be in [1, seq_len={self.seq_len}]"
            )
        if self.mask_token_prob + self.random_token_prob > 1:
            raise ValueError(
                f"mask_token_prob + random_token_prob = "
                f"{self.mask_token_prob + self.random_token_prob} must be <= 1"
            )
        if not 2 <= self.span_len <= self.seq_len - 2:
            raise ValueError(f"span_len={self.span_len} must be in [2, seq_len - 2]")
        for name in ("hidden_dropout_prob", "attention_dropout_prob"):
            if getattr(self, name) >= 1:
                raise ValueError(f"{name}={getattr(self, name)} must be < 1")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction} must be in (0, 1)")
        if self.pretrain_steps < 0 or self.pretrain_warmup < 0:
            raise ValueError(
                f"pretrain_steps={self.pretrain_steps} and pretrain_warmup="
                f"{self.pretrain_warmup} must be >= 0"
            )
        if self.num_labelled < self.finetune_batch:
            raise ValueError(
                f"num_labelled={self.num_labelled} must be >= finetune_batch={self.finetune_batch}"
            )
        for name in ("num_eval", "eval_instances"):
            if getattr(self, name) % self.rows:
                raise ValueError(
                    f"{name}={getattr(self, name)} is not a multiple of "
                    f"max(batch_size, finetune_batch)={self.rows}"
                )
        if self.finetune_heads not in ("cls", "span", "both"):
            raise ValueError(f"finetune_heads={self.finetune_heads!r} must be cls, span or both")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")
        for name in ("dupe_factor", "finetune_epochs", "max_positions", "d_ff"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.adam_eps <= 0:
            raise ValueError(f"adam_eps={self.adam_eps} must be > 0")
        docs = corpus_docs(self.corpus, self.val_fraction, self.sentence_chars, self.data_dir)
        chars = len(docs[2])
        if self.vocab_size is not None and self.vocab_size < chars + 4:
            raise ValueError(
                f"vocab_size={self.vocab_size} is below the corpus's {chars} "
                f"characters + 4 special tokens"
            )
        if len(instances(self, "val")[0]) < self.eval_instances:
            raise ValueError(
                f"eval_instances={self.eval_instances} exceeds the held-out "
                f"instances ({len(instances(self, 'val')[0])})"
            )


PRESETS = {
    # CPU demo: 2 blocks of d 64, context 64, 1000 pre-training updates of 32 instances
    # (the MLM's accuracy is flat after ~750), 3 epochs of 4096 labelled windows in batches
    # of 32 (384 fine-tuning updates) at lr 3e-4 (pre-trained, 12 replaced characters, seed
    # 0: held-out accuracy 0.570 at 1e-4, 0.594 at 3e-4; at 1e-3 the MLM's held-out accuracy
    # fell to 0.08-0.11, below the unigram guess, and the task stayed at 0.5)
    "quick": dict(
        vocab_size=None,
        seq_len=64,
        max_positions=64,
        num_layers=2,
        d_model=64,
        num_heads=4,
        d_ff=256,
        max_predictions_per_seq=10,
        dupe_factor=2,
        batch_size=32,
        pretrain_steps=1000,
        pretrain_lr=5e-4,
        pretrain_warmup=100,
        span_len=12,
        num_eval=512,
        finetune_lr=3e-4,
    ),
    "paper": dict(),
}

# --- DATA ---


@functools.cache
def corpus_docs(corpus: str, val_fraction: float, sentence_chars: int, data_dir=None):
    """(train documents, val documents, characters): a document is a list of sentences, a
    sentence an int32 array of character ids, whitespace collapsed to one space. The text
    is cut at 1 - val_fraction of its characters, then into documents at two blank lines."""
    text = data.text_corpus(corpus, data_dir=data_dir)
    cut = int(len(text) * (1 - val_fraction))

    def pieces_of(sentence):
        """Word-boundary pieces of at most sentence_chars characters."""
        pieces, piece = [], ""
        for w in sentence.split():
            while len(w) >= sentence_chars:  # a word longer than a sentence: hard cuts
                pieces += [piece, w[: sentence_chars - 1]] if piece else [w[: sentence_chars - 1]]
                piece, w = "", w[sentence_chars - 1 :]
            if piece and len(piece) + 2 + len(w) > sentence_chars:
                pieces.append(piece)
                piece = w
            elif w:
                piece = f"{piece} {w}" if piece else w
        return [p + " " for p in pieces + ([piece] if piece else [])]  # words stay apart

    def docs(part):
        blocks = (re.split(r"(?<=[.!?])\s+|\n\s*\n", b) for b in re.split(r"\n\s*\n\s*\n", part))
        return [d for d in ([p for sent in b for p in pieces_of(sent)] for b in blocks) if d]

    train, val = docs(text[:cut]), docs(text[cut:])
    chars = sorted({c for d in train + val for s in d for c in s})
    lut = {c: i for i, c in enumerate(chars)}
    enc = lambda ds: [[np.array([lut[c] for c in s], np.int32) for s in d] for d in ds]
    return enc(train), enc(val), chars


def specials(cfg: Config) -> dict:
    """Ids of [CLS], [SEP], [MASK], [PAD] after the characters (`chars`: how many), and the
    token table size `rows`."""
    c = len(corpus_docs(cfg.corpus, cfg.val_fraction, cfg.sentence_chars, cfg.data_dir)[2])
    return dict(cls=c, sep=c + 1, mask=c + 2, pad=c + 3, chars=c, rows=cfg.vocab_size or c + 4)


def truncate_seq_pair(a: list, b: list, max_tokens: int, rng: random.Random):
    """create_pretraining_data.py: drop tokens from the longer of A and B, from its front or
    back at random, until len(A) + len(B) <= max_tokens (in place)."""
    while len(a) + len(b) > max_tokens:
        t = a if len(a) > len(b) else b
        if rng.random() < 0.5:
            del t[0]
        else:
            t.pop()


def make_instances(docs, cfg: Config, rng: random.Random, dupe_factor: int):
    """create_instances_from_document over every document, dupe_factor times: (tokens
    (N, seq_len) int32 [CLS] A [SEP] B [SEP] [PAD]..., is_random_next (N,) int32)."""
    s, max_tokens = specials(cfg), cfg.seq_len - 3
    docs = [[list(map(int, seg)) for seg in doc] for doc in docs]
    toks, labels = [], []
    for _ in range(dupe_factor):
        for d, doc in enumerate(docs):
            target = max_tokens
            if rng.random() < cfg.short_seq_prob:
                target = rng.randint(2, max_tokens)
            chunk, length, i = [], 0, 0
            while i < len(doc):
                chunk.append(doc[i])
                length += len(doc[i])
                if i == len(doc) - 1 or length >= target:
                    a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
                    a = [t for seg in chunk[:a_end] for t in seg]
                    b = []
                    is_random = len(chunk) == 1 or rng.random() < 0.5
                    if is_random:  # B from another document
                        for _ in range(10):
                            r = rng.randint(0, len(docs) - 1)
                            if r != d:
                                break
                        other = docs[r]
                        for seg in other[rng.randint(0, len(other) - 1) :]:
                            b.extend(seg)
                            if len(b) >= target - len(a):
                                break
                        i -= len(chunk) - a_end  # put the unused segments back
                    else:
                        b = [t for seg in chunk[a_end:] for t in seg]
                    truncate_seq_pair(a, b, max_tokens, rng)
                    if a and b:
                        seq = [s["cls"], *a, s["sep"], *b, s["sep"]]
                        toks.append(seq + [s["pad"]] * (cfg.seq_len - len(seq)))
                        labels.append(int(is_random))
                    chunk, length = [], 0
                i += 1
    order = np.array(rng.sample(range(len(toks)), len(toks)), np.int64)
    return np.array(toks, np.int32)[order], np.array(labels, np.int32)[order]


@functools.cache
def instances(cfg: Config, split: str):
    """Pre-training instances of the training split or the held-out instances of the
    validation split (dupe_factor passes each)."""
    train, val, _ = corpus_docs(cfg.corpus, cfg.val_fraction, cfg.sentence_chars, cfg.data_dir)
    rng = random.Random(cfg.task_seed + (split == "val"))
    return make_instances(train if split == "train" else val, cfg, rng, cfg.dupe_factor)


@functools.cache
def task_data(cfg: Config):
    """The replaced-characters task: (train tokens, labels, starts, ends, eval tokens, labels,
    starts, ends) as numpy. [CLS] window [SEP], the window seq_len - 2 characters of the
    text's sentences joined by spaces; label 1: the span_len characters at a random offset
    were replaced, each by a different character drawn from the training text's unigram
    distribution, start/end their first/last token positions; label 0: start = end = 0
    ([CLS], no answer)."""
    train, val, chars = corpus_docs(cfg.corpus, cfg.val_fraction, cfg.sentence_chars, cfg.data_dir)
    s, n, m = specials(cfg), cfg.seq_len - 2, cfg.span_len
    rng = np.random.default_rng(cfg.task_seed)
    space = np.array([chars.index(" ")], np.int32)
    streams = [np.concatenate([x for d in ds for seg in d for x in (seg, space)])
               for ds in (train, val)]
    freq = np.bincount(streams[0], minlength=len(chars)) / len(streams[0])

    def make(stream, count):
        labels = (np.arange(count) % 2).astype(np.int32)
        rng.shuffle(labels)
        toks = np.zeros((count, cfg.seq_len), np.int32)
        start, end = np.zeros(count, np.int32), np.zeros(count, np.int32)
        for i, y in enumerate(labels):
            w = stream[(a := rng.integers(0, len(stream) - n)) : a + n].copy()
            if y:
                o = rng.integers(0, n - m + 1)
                new = w[o : o + m].copy()
                while (same := new == w[o : o + m]).any():  # redraw until every one differs
                    new[same] = rng.choice(len(chars), same.sum(), p=freq)
                w[o : o + m], start[i], end[i] = new, 1 + o, o + m
            toks[i] = [s["cls"], *w, s["sep"]]
        return toks, labels, start, end

    return (*make(streams[0], cfg.num_labelled), *make(streams[1], cfg.num_eval))


@functools.cache
def unigram_mode(cfg: Config) -> int:
    """The most frequent character of the training instances (the unigram baseline's guess)."""
    x = instances(cfg, "train")[0]
    return int(np.bincount(x[x < specials(cfg)["chars"]]).argmax())


def token_types(tokens, sep: int, pad: int):
    """Segment ids: 0 up to and including the first [SEP], 1 after it, 0 on [PAD]."""
    is_sep = (tokens == sep).astype(jnp.int32)
    return (((jnp.cumsum(is_sep, axis=1) - is_sep) >= 1) & (tokens != pad)).astype(jnp.int32)


def mask_tokens(key, tokens, cfg: Config):
    """[1] Sec. 3.1 / create_masked_lm_predictions, batched and jittable. Chooses
    k = min(P, max(1, round(mask_prob * n))) of each row's non-special tokens (n counts
    [CLS] and [SEP], not [PAD]) in random order; each becomes [MASK] w.p. mask_token_prob,
    a random character w.p. random_token_prob, else stays. Returns (inputs (B, L),
    positions (B, P), labels (B, P), weights (B, P)), P = max_predictions_per_seq."""
    s, P = specials(cfg), cfg.max_predictions_per_seq
    k_order, k_how, k_tok = jax.random.split(key, 3)
    cand = (tokens != s["cls"]) & (tokens != s["sep"]) & (tokens != s["pad"])
    n = (tokens != s["pad"]).sum(1)
    k = jnp.minimum(P, jnp.maximum(1, jnp.round(n * cfg.mask_prob))).astype(jnp.int32)
    score = jnp.where(cand, jax.random.uniform(k_order, tokens.shape), 2.0)
    positions = jnp.argsort(score, axis=1)[:, :P]  # (B, P): candidates first, shuffled
    chosen = jnp.take_along_axis(cand, positions, 1)
    weights = (jnp.arange(P)[None] < k[:, None]) & chosen
    labels = jnp.take_along_axis(tokens, positions, 1)
    u = jax.random.uniform(k_how, positions.shape)
    rand = jax.random.randint(k_tok, positions.shape, 0, s["chars"])
    new = jnp.where(
        u < cfg.mask_token_prob,
        s["mask"],
        jnp.where(u < cfg.mask_token_prob + cfg.random_token_prob, rand, labels),
    )
    rows = jnp.arange(tokens.shape[0])[:, None]
    inputs = tokens.at[rows, positions].set(jnp.where(weights, new, labels))
    return inputs, positions, labels, weights.astype(jnp.float32)


# --- NETWORKS ---

init_w = nn.initializers.normal(0.02)  # modeling.py initializer_range 0.02
LN = functools.partial(nn.LayerNorm, epsilon=1e-12)  # modeling.py layer_norm (TF's 1e-12)


def gelu(x, kind: str = "tanh"):
    """modeling.py gelu: the tanh approximation; kind erf: x Phi(x) exactly (HF's 'gelu')."""
    if kind == "erf":
        return 0.5 * x * (1 + jax.lax.erf(x / jnp.sqrt(2.0).astype(x.dtype)))
    return 0.5 * x * (1 + jnp.tanh(jnp.sqrt(2 / jnp.pi).astype(x.dtype) * (x + 0.044715 * x**3)))


def attention(q, k, v, key_mask, drop_rate: float, rng, train: bool):
    """softmax(q k^T / sqrt(d_k) - 10000 [key is PAD]) v on (B, L, H, d_k); dropout on the
    probabilities when training (modeling.py attention_layer)."""
    if not train or drop_rate == 0:
        bias = jnp.where(key_mask, 0.0, -10000.0)[:, None, None, :].astype(q.dtype)
        return jax.nn.dot_product_attention(q, k, v, bias=bias)
    w = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    w = w + jnp.where(key_mask, 0.0, -10000.0)[:, None, None, :].astype(w.dtype)
    p = jax.nn.softmax(w.astype(jnp.float32), axis=-1)
    keep = jax.random.bernoulli(rng, 1 - drop_rate, p.shape)
    p = jnp.where(keep, p / (1 - drop_rate), 0).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)  # (B, L, H, d_k)


class Layer(nn.Module):
    """Post-LN encoder layer (modeling.py transformer_model): a = LN(h + Attn(h)),
    h' = LN(a + W_2 gelu(W_1 a))."""

    cfg: Config

    @nn.compact
    def __call__(self, h, key_mask, train: bool):
        cfg, (B, L, d) = self.cfg, h.shape
        dense = functools.partial(nn.Dense, kernel_init=init_w, dtype=jnp.dtype(cfg.dtype))
        drop = nn.Dropout(cfg.hidden_dropout_prob, deterministic=not train)
        qkv = dense(3 * d, name="qkv")(h).reshape(B, L, 3, cfg.num_heads, d // cfg.num_heads)
        rng = self.make_rng("dropout") if train and cfg.attention_dropout_prob else None
        a = attention(
            qkv[:, :, 0],
            qkv[:, :, 1],
            qkv[:, :, 2],
            key_mask,
            cfg.attention_dropout_prob,
            rng,
            train,
        ).reshape(B, L, d)
        a = LN(name="attention_LayerNorm")(h + drop(dense(d, name="attention_output")(a)))
        m = dense(d, name="output")(gelu(dense(cfg.d_ff, name="intermediate")(a), cfg.gelu))
        return LN(name="output_LayerNorm")(a + drop(m))


class BERT(nn.Module):
    """Embeddings, post-LN encoder, tanh pooler, and the heads: MLM (transform + LN + tied
    output table + output bias) at `positions`, NSP and the classifier on the pooled [CLS],
    start/end logits on every token."""

    cfg: Config
    rows: int
    pad: int

    @nn.compact
    def __call__(self, tokens, types, positions, train: bool = False):
        cfg, L = self.cfg, tokens.shape[1]
        embed = nn.Embed(self.rows, cfg.d_model, embedding_init=init_w, name="word_embeddings")
        pos = self.param("position_embeddings", init_w, (cfg.max_positions, cfg.d_model))
        typ = nn.Embed(2, cfg.d_model, embedding_init=init_w, name="token_type_embeddings")
        h = LN(name="embeddings_LayerNorm")(embed(tokens) + pos[:L] + typ(types))
        h = nn.Dropout(cfg.hidden_dropout_prob, deterministic=not train)(h)
        key_mask = tokens != self.pad
        for l in range(cfg.num_layers):
            h = Layer(cfg, name=f"layer_{l}")(h, key_mask, train)
        h = h.astype(jnp.float32)
        pooled = jnp.tanh(nn.Dense(cfg.d_model, kernel_init=init_w, name="pooler")(h[:, 0]))
        # masked LM head (run_pretraining.py get_masked_lm_output)
        x = jnp.take_along_axis(h, positions[..., None], axis=1)  # (B, P, d)
        x = LN(name="transform_LayerNorm")(
            gelu(nn.Dense(cfg.d_model, kernel_init=init_w, name="transform")(x), cfg.gelu)
        )
        mlm = embed.attend(x) + self.param("output_bias", nn.initializers.zeros, (self.rows,))
        nsp = nn.Dense(2, kernel_init=init_w, name="nsp")(pooled)
        # fine-tuning heads (run_classifier.py: dropout on the pooled output; run_squad.py)
        dropped = nn.Dropout(cfg.hidden_dropout_prob, deterministic=not train)(pooled)
        cls = nn.Dense(2, kernel_init=init_w, name="classifier")(dropped)
        span = nn.Dense(2, kernel_init=init_w, name="span")(h)  # (B, L, 2): start, end
        return dict(mlm=mlm, nsp=nsp, cls=cls, start=span[..., 0], end=span[..., 1])


HEADS = ("classifier", "span")  # new parameters of the fine-tuning stage

# --- HUGGING FACE CHECKPOINTS ---

# ours -> BertLayer's names under encoder.layer.{l}. (torch Linear weights are (out, in):
# transposed into flax kernels; query, key and value side by side in our qkv kernel)
HF_LAYER = {"attention_output": "attention.output.dense", "intermediate": "intermediate.dense",
            "output": "output.dense", "attention_LayerNorm": "attention.output.LayerNorm",
            "output_LayerNorm": "output.LayerNorm"}
HF_TOP = {"embeddings_LayerNorm": "embeddings.LayerNorm", "pooler": "pooler.dense",
          "transform": "cls.predictions.transform.dense",
          "transform_LayerNorm": "cls.predictions.transform.LayerNorm",
          "nsp": "cls.seq_relationship"}


def hf_getter(t: dict, what: str):
    """get(name, shape, fields): the tensor as float32, checked; LayerNorm's weight/bias
    may be stored under the old names gamma/beta (as bert-base-uncased's)."""

    def get(name, shape, fields):
        old = name.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta")
        if name not in t and old not in t:
            raise ValueError(f"init_from: tensor {name!r} is missing from the checkpoint "
                             f"(num_layers? a {what} checkpoint?)")
        a = np.asarray(t[name] if name in t else t[old], np.float32)
        if a.shape != tuple(shape):
            raise ValueError(f"init_from: tensor {name!r} has shape {a.shape}, ours "
                             f"{tuple(shape)}: set {fields} to the checkpoint's")
        return a

    def module(name, ours, fields):  # a Linear (kernel = weight^T) or a LayerNorm
        if "kernel" in ours:
            w = get(name + ".weight", ours["kernel"].shape[::-1], fields)
            return {"kernel": jnp.asarray(w.T), "bias": jnp.asarray(get(
                name + ".bias", ours["bias"].shape, fields))}
        return {k: jnp.asarray(get(f"{name}.{hf}", ours[k].shape, fields))
                for k, hf in (("scale", "weight"), ("bias", "bias"))}

    return get, module


def params_from_hf(tensors: dict, cfg: Config, params) -> dict:
    """HF BertForPreTraining state-dict tensors (names as in bert-base-uncased's
    model.safetensors, with or without the `bert.` prefix) as this file's params. `params`
    (this file's init) gives the shapes and keeps what HF's pre-training model lacks: the
    fine-tuning heads (classifier, span). cls.predictions.decoder.weight is not read (tied to
    the word embeddings, as ours); the output bias is cls.predictions.bias (or the decoder's
    own bias). A shape mismatch raises naming the tensor and the Config field to change."""
    t = {k.removeprefix("bert."): v for k, v in tensors.items()}
    if f"encoder.layer.{cfg.num_layers}.output.dense.weight" in t:
        raise ValueError(f"init_from: the checkpoint has more than num_layers={cfg.num_layers} "
                         "layers: set num_layers to its num_hidden_layers")
    get, module = hf_getter(t, "BertForPreTraining")
    p, d = params["params"], cfg.d_model
    out = {k: p[k] for k in HEADS}
    rows = p["word_embeddings"]["embedding"].shape[0]
    out["word_embeddings"] = {"embedding": jnp.asarray(get(
        "embeddings.word_embeddings.weight", (rows, d), "vocab_size / d_model"))}
    out["position_embeddings"] = jnp.asarray(get(
        "embeddings.position_embeddings.weight", (cfg.max_positions, d),
        "max_positions (max_position_embeddings) / d_model"))
    out["token_type_embeddings"] = {"embedding": jnp.asarray(get(
        "embeddings.token_type_embeddings.weight", (2, d), "d_model (type_vocab_size 2)"))}
    bias = "cls.predictions.bias" if "cls.predictions.bias" in t else "cls.predictions.decoder.bias"
    out["output_bias"] = jnp.asarray(get(bias, (rows,), "vocab_size"))
    for ours, hf in HF_TOP.items():
        out[ours] = module(hf, p[ours], "d_model")
    for l in range(cfg.num_layers):
        ours, hf = p[f"layer_{l}"], f"encoder.layer.{l}."
        layer = {k: module(hf + v, ours[k], "d_model / d_ff") for k, v in HF_LAYER.items()}
        qkv = [module(f"{hf}attention.self.{n}", {"kernel": np.zeros((d, d)),
                                                  "bias": np.zeros(d)}, "d_model")
               for n in ("query", "key", "value")]
        layer["qkv"] = {k: jnp.concatenate([m[k] for m in qkv], -1) for k in ("kernel", "bias")}
        out[f"layer_{l}"] = layer
    return {"params": out}


def load_hf(path: str, cfg: Config, params) -> dict:
    """init_from: read model.safetensors (the file, or in the folder) and map it with
    params_from_hf; a config.json beside it must agree with the Config where the tensors'
    shapes cannot tell."""
    return params_from_hf(data.read_hf_checkpoint(path, {
        "num_attention_heads": (cfg.num_heads, "set num_heads to it"),
        "hidden_act": ("gelu" if cfg.gelu == "erf" else ("gelu_new", "gelu_pytorch_tanh"),
                       "set gelu (erf: 'gelu', tanh: 'gelu_new')"),
        "layer_norm_eps": (1e-12, "this file's LayerNorm is fixed"),
        "type_vocab_size": (2, "this file's token types are fixed")}), cfg, params)


def nll(logits, labels):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), labels[..., None], -1)[..., 0]


def mlm_loss(logits, labels, weights):
    """L_MLM: the weighted mean NLL over the chosen positions (denominator + 1e-5)."""
    return (nll(logits, labels) * weights).sum() / (weights.sum() + 1e-5)


def row_loss(logits, labels, rows):
    """Mean NLL over the weighted rows (NSP, classifier)."""
    return (nll(logits, labels) * rows).sum() / jnp.maximum(rows.sum(), 1)


def span_loss(start_logits, end_logits, start, end, rows):
    """run_squad.py: (CE(start) + CE(end)) / 2, softmax over the token positions."""
    return (row_loss(start_logits, start, rows) + row_loss(end_logits, end, rows)) / 2


def learning_rate(step, cfg: Config):
    """optimization.py create_optimizer, per stage (t from the stage's first update):
    lr t / W while t < W, else lr (1 - t / T). Fine-tuning: W = warmup_frac T_ft."""
    t = step.astype(jnp.float32)
    sched = lambda t, lr, W, T: lr * jnp.where(t < W, t / max(W, 1), jnp.maximum(1 - t / T, 0))
    pre = sched(t, cfg.pretrain_lr, cfg.pretrain_warmup, max(cfg.pretrain_steps, 1))
    ft = sched(
        t - cfg.pretrain_steps,
        cfg.finetune_lr,
        int(cfg.finetune_warmup_frac * cfg.finetune_steps),
        cfg.finetune_steps,
    )
    return jnp.where(step < cfg.pretrain_steps, pre, ft)


def decay_mask(params):
    """optimization.py _do_use_weight_decay: no decay where the name holds LayerNorm or bias."""

    def use(path, _):
        names = [str(getattr(p, "key", p)) for p in path]
        return not any("LayerNorm" in n or "bias" in n for n in names)

    return jax.tree_util.tree_map_with_path(use, params)


def adamw_step(params, grads, opt, lr, cfg: Config):
    """optimization.py AdamWeightDecayOptimizer after clip_by_global_norm: m, v moments,
    no bias correction, p <- p - lr (m / (sqrt(v) + eps) + wd p [decay_mask])."""
    m, v = opt
    norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
    scale = cfg.max_grad_norm / jnp.maximum(norm, cfg.max_grad_norm)
    grads = jax.tree.map(lambda g: g * scale, grads)
    m = jax.tree.map(lambda m, g: cfg.adam_b1 * m + (1 - cfg.adam_b1) * g, m, grads)
    v = jax.tree.map(lambda v, g: cfg.adam_b2 * v + (1 - cfg.adam_b2) * g * g, v, grads)

    def step(p, m, v, decay):
        return p - lr * (m / (jnp.sqrt(v) + cfg.adam_eps) + (cfg.weight_decay * p if decay else 0))

    return jax.tree.map(step, params, m, v, decay_mask(params)), (m, v), norm


# --- STATE ---


@struct.dataclass
class State:
    params: Any
    opt: Any
    """AdamW (m, v); zeroed when fine-tuning starts"""
    key: jax.Array
    init_key: jax.Array
    """the key of the initial parameters (re-initialisations at the switch reuse it)"""
    step: jax.Array
    scratch: jax.Array
    """1 (traced): re-initialise the encoder too when fine-tuning starts"""
    data: tuple
    """device_data(cfg), stored uint8 (uint16 above 256 values): an input of the compiled
    chunks, not constants of each program; one copy per seed"""


def compact(a, bound: int):
    """Values in [0, bound) in the narrowest unsigned type that holds them (the gathers
    cast back to int32)."""
    return np.asarray(a).astype(
        np.uint8 if bound <= 256 else np.uint16 if bound <= 65536 else np.int32
    )


def device_data(cfg: Config) -> tuple:
    """(pre-training tokens, NSP labels, then the task's train tokens, labels, starts, ends,
    then its eval tokens, labels, starts, ends, then eval_instances held-out instances and
    their NSP labels) as compact numpy arrays."""
    t, L = specials(cfg)["pad"] + 1, cfg.seq_len  # token ids are < pad + 1
    vx, vy = (a[: cfg.eval_instances] for a in instances(cfg, "val"))
    arrays = (*instances(cfg, "train"), *task_data(cfg), vx, vy)
    return tuple(
        compact(a, b) for a, b in zip(arrays, (t, 2, t, 2, L, L, t, 2, L, L, t, 2), strict=True)
    )


def model_of(cfg: Config) -> BERT:
    s = specials(cfg)
    return BERT(cfg, s["rows"], s["pad"])


def init_params(key, cfg: Config):
    z = jnp.zeros((1, cfg.seq_len), jnp.int32)
    return model_of(cfg).init(key, z, z, z[:, : cfg.max_predictions_per_seq])


def init(key, cfg: Config) -> State:
    k_init, key = jax.random.split(key)
    params = init_params(k_init, cfg)
    if cfg.init_from is not None:  # the checkpoint's arrays replace the random ones
        params = load_hf(cfg.init_from, cfg, params)
    z = jax.tree.map(jnp.zeros_like, params)
    return State(
        params,
        (z, z),
        key,
        k_init,
        jnp.zeros((), jnp.int32),
        jnp.asarray(int(cfg.finetune_from_scratch), jnp.int32),
        tuple(jnp.asarray(a) for a in device_data(cfg)),
    )


# --- UPDATE ---


def batch(state: State, cfg: Config):
    """(tokens (R, L), NSP labels, task labels, starts, ends, row weights, finetune flag):
    uniformly drawn pre-training instances, or a minibatch of the labelled set (an epoch is
    a permutation of it, drawn from the seed's key)."""
    pre_x, pre_y, x_lab, y_lab, s_lab, e_lab = state.data[:6]
    R, n = cfg.rows, cfg.num_labelled
    finetune = state.step >= cfg.pretrain_steps
    k_pre = jax.random.fold_in(state.key, 0)
    i_pre = jax.random.randint(k_pre, (R,), 0, pre_x.shape[0])
    per_epoch = n // cfg.finetune_batch
    t = jnp.maximum(state.step - cfg.pretrain_steps, 0)
    perm = jax.random.permutation(jax.random.fold_in(state.init_key, t // per_epoch), n)
    idx = perm[((t % per_epoch) * cfg.finetune_batch + jnp.arange(R)) % n]
    i32 = lambda a: a.astype(jnp.int32)
    tokens = jnp.where(finetune, i32(x_lab[idx]), i32(pre_x[i_pre]))
    rows = jnp.arange(R) < jnp.where(finetune, cfg.finetune_batch, cfg.batch_size)
    return (
        tokens,
        i32(pre_y[i_pre]),
        i32(y_lab[idx]),
        i32(s_lab[idx]),
        i32(e_lab[idx]),
        rows.astype(jnp.float32),
        finetune,
    )


def update(state: State, cfg: Config):
    s, model = specials(cfg), model_of(cfg)
    # stage switch: fresh AdamW moments, fresh task heads; the scratch twin: fresh encoder
    switch = state.step == cfg.pretrain_steps
    fresh = init_params(state.init_key, cfg)
    new = {
        "params": {
            k: jax.tree.map(
                lambda a, b, k=k: jnp.where(switch & ((state.scratch > 0) | (k in HEADS)), b, a),
                v,
                fresh["params"][k],
            )
            for k, v in state.params["params"].items()
        }
    }
    opt = jax.tree.map(lambda x: jnp.where(switch, jnp.zeros_like(x), x), state.opt)

    tokens, nsp_y, cls_y, start, end, rows, finetune = batch(state, cfg)
    key, k_mask, k_drop = jax.random.split(state.key, 3)
    masked, positions, labels, weights = mask_tokens(k_mask, tokens, cfg)
    inputs = jnp.where(finetune, tokens, masked)
    types = token_types(inputs, s["sep"], s["pad"])
    weights = weights * rows[:, None]
    use_cls = cfg.finetune_heads in ("cls", "both")
    use_span = cfg.finetune_heads in ("span", "both")

    def loss_fn(p):
        out = model.apply(p, inputs, types, positions, train=True, rngs={"dropout": k_drop})
        l_mlm = mlm_loss(out["mlm"], labels, weights)
        l_nsp = row_loss(out["nsp"], nsp_y, rows)
        l_cls = row_loss(out["cls"], cls_y, rows)
        l_span = span_loss(out["start"], out["end"], start, end, rows)
        fine = use_cls * l_cls + use_span * l_span
        return jnp.where(finetune, fine, l_mlm + l_nsp), (l_mlm, l_nsp, l_cls, l_span, out)

    (loss, (l_mlm, l_nsp, l_cls, l_span, out)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        new
    )
    lr = learning_rate(state.step, cfg)
    params, opt, gnorm = adamw_step(new, grads, opt, lr, cfg)
    hit = lambda logits, y: (logits.argmax(-1) == y).astype(jnp.float32)
    mlm_acc = (hit(out["mlm"], labels) * weights).sum() / jnp.maximum(weights.sum(), 1)
    unigram_acc = ((labels == unigram_mode(cfg)) * weights).sum() / jnp.maximum(weights.sum(), 1)
    em = hit(out["start"], start) * hit(out["end"], end)
    pre = 1 - finetune.astype(jnp.float32)
    metrics = {
        "losses/loss": loss,
        "losses/mlm": l_mlm,
        "losses/nsp": l_nsp,
        "losses/cls": l_cls,
        "losses/span": l_span,
        "charts/mlm_acc": mlm_acc,
        "charts/unigram_acc": unigram_acc,
        "charts/nsp_acc": (hit(out["nsp"], nsp_y) * rows).sum() / rows.sum(),
        "charts/train_acc": (hit(out["cls"], cls_y) * rows).sum() / rows.sum(),
        "charts/train_span_em": (em * rows).sum() / rows.sum(),
        "charts/finetuning": 1 - pre,
        "charts/pretraining": pre,
        "charts/lr": lr,
        "charts/grad_norm": gnorm,
    }
    return state.replace(params=params, opt=opt, key=key, step=state.step + 1), metrics


# the pre-training metrics are undefined (NaN in the logs) while fine-tuning, and the
# fine-tuning ones while pre-training
NAN_UNLESS = {
    **{
        k: "charts/finetuning"
        for k in ("losses/cls", "losses/span", "charts/train_acc", "charts/train_span_em")
    },
    **{
        k: "charts/pretraining"
        for k in (
            "losses/mlm",
            "losses/nsp",
            "charts/mlm_acc",
            "charts/unigram_acc",
            "charts/nsp_acc",
        )
    },
}


def evaluate(state: State, cfg: Config):
    """Held-out task accuracy, loss and span exact match on num_eval windows of the
    validation split; MLM accuracy and NSP accuracy on eval_instances held-out instances
    (masks drawn from task_seed), beside the unigram baseline's accuracy on the same masked
    positions (always the most frequent training character)."""
    s, model, R = specials(cfg), model_of(cfg), cfg.rows
    x_ev, y_ev, s_ev, e_ev, vx, vy = state.data[6:]
    i32 = lambda a: a.astype(jnp.int32)
    mode = unigram_mode(cfg)
    ones = jnp.ones((R,), jnp.float32)

    def task_chunk(i):
        x, y, st, en = (
            i32(jax.lax.dynamic_slice_in_dim(a, i * R, R)) for a in (x_ev, y_ev, s_ev, e_ev)
        )
        out = model.apply(
            state.params,
            x,
            jnp.zeros_like(x),
            jnp.zeros((R, cfg.max_predictions_per_seq), jnp.int32),
        )
        em = (out["start"].argmax(-1) == st) & (out["end"].argmax(-1) == en)
        return row_loss(out["cls"], y, ones), (out["cls"].argmax(-1) == y).mean(), em.mean()

    def mlm_chunk(i):
        x, y = (i32(jax.lax.dynamic_slice_in_dim(a, i * R, R)) for a in (vx, vy))
        inputs, positions, labels, w = mask_tokens(
            jax.random.fold_in(jax.random.PRNGKey(cfg.task_seed), i), x, cfg
        )
        out = model.apply(state.params, inputs, token_types(inputs, s["sep"], s["pad"]), positions)
        return (
            ((out["mlm"].argmax(-1) == labels) * w).sum(),
            ((labels == mode) * w).sum(),
            w.sum(),
            (out["nsp"].argmax(-1) == y).mean(),
        )

    l, acc, em = jax.lax.map(task_chunk, jnp.arange(cfg.num_eval // R))
    hits, uni, count, nsp = jax.lax.map(mlm_chunk, jnp.arange(cfg.eval_instances // R))
    return {
        "val_acc": acc.mean(),
        "val_cls_loss": l.mean(),
        "val_span_em": em.mean(),
        "val_mlm_acc": hits.sum() / count.sum(),
        "val_unigram_acc": uni.sum() / count.sum(),
        "val_nsp_acc": nsp.mean(),
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
            "val_span_em",
            "val_mlm_acc",
            "val_unigram_acc",
            "val_nsp_acc",
            "charts/train_acc",
        ],
    )


if __name__ == "__main__":
    main()
