"""GPT-2: a pre-LN Transformer decoder language model over byte-level tokens, pre-trained on
offline text, with a zero-shot probe and KV-cache sampling.

[1] A. Radford, J. Wu, R. Child, D. Luan, D. Amodei, I. Sutskever. "Language Models are
    Unsupervised Multitask Learners." OpenAI technical report, 2019 (no arXiv id). Released
    model: github.com/openai/gpt-2 src/model.py (read for the details below).
[2] L. Weng. "Generalized Language Models" (2019), section "OpenAI GPT-2".
[3] A. Radford et al. 2018 (GPT, transformers/gpt.py): the post-LN block GPT-2 changed.

    L(U) = -sum_i log P(u_i | u_{i-k}, ..., u_{i-1})                 (LM objective, [1] Sec. 2)
    h_0 = W_te[u] + W_pe;  h_l = block(h_{l-1});  P(u) = softmax(LN_f(h_n) W_te^T)   (tied)
    block, pre-LN ([1] Sec. 2.3: "layer normalization was moved to the input of each
      sub-block ... and an additional layer normalization was added after the final
      self-attention block"):
        x = x + c_proj(Attn(LN_1(x)));   x = x + mlp_proj(gelu(mlp_fc(LN_2(x))))
      Attn causal multi-head: softmax(q k^T / sqrt(d_k) + M) v, M = finfo.min above the diagonal
      gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))      (released model.py)
    init ([1] Sec. 2.3, "scale the weights of residual layers at initialization by a factor
      of 1/sqrt(N) where N is the number of residual layers"): weights N(0, 0.02), c_proj and
      mlp_proj N(0, 0.02 / sqrt(2 n_layer)) (two residual layers per block: from [1]'s text
      and HF's _init_weights; the released model.py is inference code with conv1d std 0.02
      and no scaled init); W_te N(0, 0.02); W_pe N(0, 0.01) as released model.py (HF: 0.02;
      this file picks 0.01)
    KV cache (released model.py `past`): step t appends k_t, v_t of every layer to the cache
      and attends q_t over positions <= t; the logits equal the full forward's.
    bits per token = L / ln 2; bits per byte = L / ln 2 * tokens / bytes; perplexity = exp(L)
    ([2] "Perplexity": 2^H, H in bits)

Tokens: byte-level. With --bpe-merges 0 the tokens are the 256 bytes of the UTF-8 text
(BPE with zero merges); with --bpe-merges M > 0 the byte-level BPE of transformers/bpe.py
(GPT-2's regex pre-split, [1] Sec. 2.2) is trained on the training split to 256 + M
tokens. The token stream travels in the state (uint8 or uint16), an input of the compiled
chunks, not a constant compiled into them.

Real corpora: --corpus wikitext-2 (or enwik8, text8, wikitext-103, 1b-words) --data-dir
DIR reads common.data.REAL_CORPORA from DIR (then bytes or BPE as the built-in corpora).
Hugging Face checkpoints: --init-from DIR (or DIR/model.safetensors) loads a GPT2Model /
GPT2LMHeadModel state dict (gpt2) through params_from_hf: wte, wpe, ln_f and h.{l}.ln_1 /
attn.c_attn / attn.c_proj / ln_2 / mlp.c_fc / mlp.c_proj -> h{l} (Conv1D weights are
stored (in, out), as flax kernels: copied, not transposed; transposing would not even fail
on the square c_proj). HF's block is ours with pre_ln (gelu_new = the tanh GELU, LN eps
1e-5, tied lm_head, finfo.min mask). GPT-2 small is the default Config (--vocab-size
50257 --seq-len 1024, 12 x 768, 12 heads); logits equal HF's (tests/transformers/
test_gpt_hf.py: 6.6e-7 on a random 2-layer model). Not used: lm_head.weight (tied) and old
checkpoints' attn.bias mask buffers. The ids must be GPT-2's BPE ids (this file's tokens
are bytes or its own BPE), so sampling from a loaded model needs ids tokenised elsewhere.
The checkpoint enters the compiled init as constants.

Zero-shot probe ([1] Sec. 3 evaluates the LM on tasks it was not trained for; at this
scale the tasks are): held-out perplexity and bits per byte, and a next-word cloze on the
held-out split: after up to seq_len tokens of real context, is the true next word more
likely than cloze_choices - 1 distractor words of the same length (chance 1 / cloze_choices)?
The distractors are frequency-matched (drawn from the held-out word occurrences, so as
often as they occur), so a context-free scorer is at chance: evaluate reports the
train-split word-frequency scorer's accuracy (cloze_freq_acc) beside chance.

Reproduce (CPU demo: pydoc bytes, 4 layers of d 64, context 64, 600 updates of 16):
    python transformers/gpt2.py --preset quick --num-seeds 2 --plot transformers/gpt2.png \
        --prompt "The "
    python transformers/gpt2.py --preset quick --num-seeds 2 --bpe-merges 256   # BPE tokens
  Measured through the command line (2 seeds, loaded 2-core CPU shared with other jobs):
  bytes: held-out 2.88 / 2.87 bits per byte (perplexity 7.37 / 7.32 per byte; the train-split
  unigram on val: 4.68); next-word cloze with frequency-matched distractors 0.234 / 0.238
  (256 items, 4 same-length choices; chance 0.25, context-free word-frequency scorer 0.254):
  the byte model does not beat chance, its context is not yet used for words;
  8.6k tokens/s, 25 s compile + 145 s loop. BPE with 256 merges (512 tokens, 2.27 bytes per
  token, same updates and context in tokens): 2.26 / 2.27 bits per byte, cloze 0.270 /
  0.305 (same items; chance 0.25, word-frequency 0.254); 2.8k tokens/s, 27 s compile + 431 s
  loop. (With the earlier uniform distractors, whose true word was the more frequent one,
  the cloze read 0.36 bytes / 0.43 BPE against a word-frequency scorer's 0.40.) Samples
  stay garbled at this size ("The inlis====las o bjetsc * ba iscte:").
  Figure: transformers/gpt2.png.
  Behaviour (tests/transformers/test_gpt2.py, 8 blocks of d 32, lr 1e-2 without warm-up,
  300 updates of 8 x 16 bytes): held-out 2.97 / 2.87 nats per byte with GPT-2's pre-LN and
  scaled init vs 3.32 / 3.30 with GPT's post-LN and std-0.02 residual init (unigram level).
  Without warm-up at lr 1e-2, this shows that post-LN without warm-up fails (as [3]-style
  blocks need warm-up); it does not isolate the scaled init, and the margin is calibrated
  (at lr 3e-3 the arms were not separated on both seeds).
Paper scale (GPT-2 small: 12 x 768, 12 heads, context 1024, 50,257-row table, batch 512):
    python transformers/gpt2.py --preset paper
  Trace-only: no micro-batching or rematerialisation, so one update needs the f32 logits
  of 512 x 1024 x 50,257 (98 GiB) and 24 GiB of attention probabilities per layer kept for
  the backward pass: beyond one GPU. Not run.
[1] Table 3 (zero-shot, 117M model): LAMBADA ppl 35.13 / acc 45.99, CBT-CN 87.65, CBT-NE 83.4,
  WikiText2 ppl 29.41, PTB 65.85, enwik8 1.16 bpb, text8 1.17 bpc, WikiText103 37.50,
  1BW 75.20 (checked against [1]'s text).

Differences from the paper:
- Data: Python's reference manual (pydoc) or the stdlib sources, not WebText (8M pages);
  numbers are not comparable with [1]'s.
- The paper preset keeps the byte tokens but sizes the table as GPT-2's 50,257 rows (the
  other rows are never seen); training GPT-2's BPE on 40 GB of text is out of reach here.
- [1] does not give the optimiser, schedule, steps or dropout; this file uses AdamW
  (decoupled weight decay 0.01 on matrices), global-norm clipping at 1, linear warm-up then
  cosine, GPT's lr 2.5e-4 [3]. No dropout: a choice (the released model.py is inference
  code; GPT [3] and HF's GPT2Config use 0.1). train_steps of the paper preset is a guess.
- No <|endoftext|> separator between documents: the corpus is one stream.
- `pre_ln` (a traced state flag) also runs the post-LN placement of [3] (no ln_f) for the
  behaviour test; `scaled_init` False gives every matrix std 0.02.
- The zero-shot probe is a held-out next-word cloze among same-length words (chance
  1 / cloze_choices), a tiny-scale stand-in for [1]'s LAMBADA / CBT; it is not [1]'s task.
- Under dtype bfloat16 the tied head (h W_te^T) stays f32, as do LN, softmax and the loss.
- Attention is the explicit masked softmax (finfo.min mask, f32 softmax) on every path, so
  that the cached and full forwards share one function; no fused kernel.
"""

import functools
import json
import math
import re
from collections import Counter
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
    """GPT-2 [1]: defaults are GPT-2 small (117M) where [1] and its released model state them."""

    corpus: str = "pydoc"
    """text of common.data.text_corpus: pydoc, stdlib, this, or a real corpus of
    common.data.REAL_CORPORA (read from data_dir)"""
    data_dir: str | None = None
    """folder of a real corpus when `corpus` names one: common.data.REAL_CORPORA"""
    init_from: str | None = None
    """a downloaded Hugging Face checkpoint: its model.safetensors (or the folder holding it),
    read by common.data.read_safetensors and mapped by params_from_hf"""
    val_fraction: float = 0.1
    """last fraction of the text held out (perplexity and cloze)"""
    bpe_merges: int = 0
    """0: byte tokens (256); > 0: train transformers/bpe.py byte-level BPE with this many
    merges on the training split (256 + bpe_merges tokens)"""
    vocab_size: int | None = 50257
    """rows of the token table (GPT-2: 50,257); None: the tokenizer's own size"""
    seq_len: int = 1024
    """context n_ctx (tokens per window; rows of the position table)"""
    num_layers: int = 12
    """transformer blocks"""
    d_model: int = 768
    """hidden size"""
    num_heads: int = 12
    """attention heads"""
    pre_ln: bool = True
    """GPT-2's pre-LN blocks + ln_f; False: GPT's post-LN placement (the broken variant)"""
    scaled_init: bool = True
    """residual projections c_proj, mlp_proj init std 0.02 / sqrt(2 num_layers); False: 0.02"""
    dtype: str = "float32"
    """compute dtype of the block matmuls: float32 or bfloat16 (params, softmax, LN, the
    tied-head matmul and the loss stay f32)"""
    batch_size: int = 512
    """windows per update"""
    train_steps: int = 500_000
    """updates (not stated in [1])"""
    lr: float = 2.5e-4
    """peak learning rate (tuned per model in [1]; GPT's value)"""
    warmup_steps: int = 2000
    """linear warm-up updates, then cosine decay to 0"""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay on matrices"""
    max_grad_norm: float = 1.0
    """global-norm gradient clipping"""
    eval_windows: int = 1024
    """held-out windows for the perplexity of evaluate() (a multiple of batch_size)"""
    cloze_items: int = 256
    """held-out next-word cloze items"""
    cloze_choices: int = 4
    """candidates per cloze item (the true word and same-length distractors)"""
    data_seed: int = 0
    """seed of the cloze items (fixed across training seeds)"""
    sample_tokens: int = 200
    """tokens sampled after --prompt"""
    temperature: float = 1.0
    """sampling temperature"""
    top_k: int = 40
    """sample among the k most likely tokens ([1]'s samples: k = 40); 0: all"""

    @property
    def num_updates(self) -> int:
        return self.train_steps

    @property
    def steps_per_update(self) -> int:
        return self.batch_size * self.seq_len  # tokens per update

    def validate(self):
        if self.corpus in data.REAL_CORPORA and self.data_dir is None:
            data.text_corpus(self.corpus)  # text_corpus's ValueError: pass data_dir
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}"
            )
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction} must be in (0, 1)")
        if self.bpe_merges < 0:
            raise ValueError(f"bpe_merges={self.bpe_merges} must be >= 0")
        if self.eval_windows % self.batch_size:
            raise ValueError(
                f"eval_windows={self.eval_windows} is not a multiple of "
                f"batch_size={self.batch_size}"
            )
        if self.cloze_choices < 2 or (self.cloze_items * self.cloze_choices) % self.batch_size:
            raise ValueError(
                f"cloze_items * cloze_choices={self.cloze_items} * "
                f"{self.cloze_choices} must be a multiple of batch_size="
                f"{self.batch_size} (and cloze_choices >= 2)"
            )
        if not 1 <= self.sample_tokens < self.seq_len:
            raise ValueError(f"sample_tokens={self.sample_tokens} must be in [1, seq_len)")
        if self.temperature <= 0 or self.top_k < 0:
            raise ValueError(
                f"temperature={self.temperature} must be > 0 and top_k={self.top_k} >= 0"
            )
        d = data_of(self)
        if self.vocab_size is not None and self.vocab_size < d["size"]:
            raise ValueError(
                f"vocab_size={self.vocab_size} is below the tokenizer's {d['size']} tokens"
            )
        if min(len(d["train"]), len(d["val"])) < self.seq_len + 2:
            raise ValueError(
                f"seq_len={self.seq_len}: a split of corpus={self.corpus!r} is "
                f"shorter than a window"
            )


PRESETS = {
    # CPU demo: 4 blocks of d 64, context 64, 600 updates of 16 windows
    "quick": dict(
        vocab_size=None,
        seq_len=64,
        num_layers=4,
        d_model=64,
        num_heads=4,
        batch_size=16,
        train_steps=600,
        lr=2e-3,
        warmup_steps=50,
        eval_windows=256,
        cloze_items=256,
        sample_tokens=60,
    ),
    "paper": dict(corpus="stdlib"),
}

# --- DATA ---


@functools.cache
def tokenizer(corpus: str, val_fraction: float, bpe_merges: int, data_dir: str | None = None):
    """(encode: str -> np.ndarray of ids, decode: ids -> str, size) of the config: the UTF-8
    bytes, or transformers/bpe.py's byte-level BPE trained on the training split."""
    if bpe_merges == 0:
        return (
            lambda s: np.frombuffer(s.encode("utf-8"), np.uint8),
            lambda ids: bytes(int(i) for i in ids).decode("utf-8", errors="replace"),
            256,
        )
    from transformers import bpe  # the tokenizer IS the other algorithm (DESIGN.md sec. 2)

    train_text = split_text(corpus, val_fraction, data_dir)[0]
    tok = bpe.Tokenizer(bpe.train(train_text, 256 + bpe_merges))
    return (lambda s: bpe.encode_corpus(tok, s)), (lambda ids: tok.decode(ids)), tok.vocab_size


@functools.cache
def split_text(corpus: str, val_fraction: float, data_dir: str | None = None) -> tuple[str, str]:
    text = data.text_corpus(corpus, data_dir=data_dir)
    cut = int(len(text) * (1 - val_fraction))
    return text[:cut], text[cut:]


@functools.cache
def corpus_data(
    corpus: str,
    val_fraction: float,
    bpe_merges: int,
    seq_len: int,
    cloze_items: int,
    cloze_choices: int,
    data_seed: int,
    data_dir: str | None = None,
) -> dict:
    """Host-side data of a config: train / val token streams (uint8 for bytes, else uint16),
    the cloze rows (items * choices, seq_len + 1) int32 and their target masks
    (items * choices, seq_len), the val split's bytes per token, the tokenizer size and the
    unigram baseline (train token frequencies, add-1) in bits per byte on val."""
    encode, _, size = tokenizer(corpus, val_fraction, bpe_merges, data_dir)
    train_text, val_text = split_text(corpus, val_fraction, data_dir)
    train, val = encode(train_text), encode(val_text)  # uint8 bytes or uint16 BPE ids
    bytes_per_token = len(val_text.encode("utf-8")) / max(len(val), 1)
    counts = np.bincount(train, minlength=size) + 1.0
    unigram = -np.log2(counts[val] / counts.sum()).mean() / bytes_per_token

    # next-word cloze on the held-out text: lower-case words after a space, with context.
    # An item's C candidates are C occurrences of one word length drawn i.i.d. (so each
    # word as often as it occurs: frequency-matched), redrawn until their words differ; the
    # first one's context is the item's. The candidates are exchangeable, so a context-free
    # scorer is at chance 1 / C in expectation; freq_acc measures one (train-split counts).
    rng = np.random.default_rng(data_seed)
    word_re = r" ([a-z]{4,10})(?=[ ,.;:])"
    found = [
        (m.start(), m.group(1)) for m in re.finditer(word_re, val_text) if m.start() >= 4 * seq_len
    ]
    by_len: dict[int, list[tuple[int, str]]] = {}
    for s, w in found:
        by_len.setdefault(len(w), []).append((s, w))
    pool = [o for occ in by_len.values() if len({w for _, w in occ}) >= cloze_choices for o in occ]
    train_counts = Counter(m.group(1) for m in re.finditer(word_re, train_text))
    rows = np.zeros((cloze_items * cloze_choices, seq_len + 1), np.int32)
    masks = np.zeros((cloze_items * cloze_choices, seq_len), np.float32)
    freq_acc = 0.0
    for i in range(cloze_items if pool else 0):
        while True:
            start, word = pool[rng.integers(len(pool))]
            occ = by_len[len(word)]
            picks = [word] + [occ[k][1] for k in rng.integers(len(occ), size=cloze_choices - 1)]
            if len(set(picks)) == cloze_choices:
                break
        counts = np.array([train_counts[w] for w in picks])
        if counts[0] == counts.max():  # ties share the point: chance in expectation
            freq_acc += 1 / (counts == counts.max()).sum() / cloze_items
        ctx = encode(val_text[start - 4 * seq_len : start]).tolist()
        for c, w in enumerate(picks):
            cand = encode(" " + w).tolist()[:seq_len]
            seq = (ctx + cand)[-(seq_len + 1) :]
            rows[i * cloze_choices + c, -len(seq) :] = seq
            masks[i * cloze_choices + c, -len(cand) :] = 1
    return dict(
        train=train,
        val=val,
        cloze=rows,
        cloze_mask=masks,
        size=size,
        bytes_per_token=bytes_per_token,
        unigram_bpb=unigram,
        freq_acc=freq_acc,
    )


def data_of(cfg: Config) -> dict:
    return corpus_data(
        cfg.corpus,
        cfg.val_fraction,
        cfg.bpe_merges,
        cfg.seq_len,
        cfg.cloze_items,
        cfg.cloze_choices,
        cfg.data_seed,
        cfg.data_dir,
    )


def vocab_rows(cfg: Config) -> int:
    return cfg.vocab_size or data_of(cfg)["size"]


# --- NETWORKS ---

init_w = nn.initializers.normal(0.02)  # [1] / released model.py: N(0, 0.02) weights


def causal_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(d_k) + M) v on (B, Lq, H, d_k) x (B, Lk, H, d_k); `mask` (Lq, Lk)
    True where a query may look; M = finfo(f32).min elsewhere; f32 logits and softmax."""
    w = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
    w = jnp.where(mask, w, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(w, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)


class Block(nn.Module):
    """Pre-LN decoder block ([1] Sec. 2.3; released `block`): x + Attn(LN_1 x), then
    x + MLP(LN_2 x). With pre_ln = 0 (traced): post-LN as GPT [3], LN_1(x + Attn x), ...
    With a cache (k, v each (B, n_ctx, H, d_k)), x is one position `pos`: its k, v are
    written into the cache and q attends over positions <= pos."""

    cfg: Config

    @nn.compact
    def __call__(self, x, pre_ln, cache=None, pos=0):
        cfg, (B, L, d) = self.cfg, x.shape
        H = cfg.num_heads
        resid_std = 0.02 / math.sqrt(2 * cfg.num_layers) if cfg.scaled_init else 0.02
        dense = functools.partial(nn.Dense, kernel_init=init_w, dtype=jnp.dtype(cfg.dtype))
        resid = functools.partial(dense, kernel_init=nn.initializers.normal(resid_std))
        ln_1 = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name="ln_1")
        ln_2 = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name="ln_2")
        pre = pre_ln > 0

        qkv = dense(3 * d, name="c_attn")(jnp.where(pre, ln_1(x), x))
        q, k, v = jnp.split(qkv.reshape(B, L, 3, H, d // H), 3, axis=2)
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
        if cache is None:
            mask = jnp.tril(jnp.ones((L, L), bool))
        else:  # one new position: append its k, v ([1]'s released `present` / `past`)
            k = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), pos, 1)
            v = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), pos, 1)
            cache = (k, v)
            mask = (jnp.arange(k.shape[1]) <= pos)[None, :]
        a = resid(d, name="c_proj")(causal_attention(q, k, v, mask).reshape(B, L, d))
        x = jnp.where(pre, x + a, ln_1(x + a))
        m = dense(4 * d, name="mlp_fc")(jnp.where(pre, ln_2(x), x))
        m = resid(d, name="mlp_proj")(nn.gelu(m, approximate=True))
        return jnp.where(pre, x + m, ln_2(x + m)), cache


class GPT2(nn.Module):
    """h_0 = W_te[u] + W_pe[pos]; blocks; ln_f (pre-LN only); logits = h W_te^T (tied).
    Returns (logits (B, L, rows) f32, the updated per-layer caches or None)."""

    cfg: Config
    rows: int

    @nn.compact
    def __call__(self, tokens, pre_ln, cache=None, pos=0):
        cfg, L = self.cfg, tokens.shape[1]
        wte = nn.Embed(self.rows, cfg.d_model, embedding_init=init_w, name="wte")
        wpe = self.param("wpe", nn.initializers.normal(0.01), (cfg.seq_len, cfg.d_model))
        h = wte(tokens) + jax.lax.dynamic_slice_in_dim(wpe, pos, L)
        new = []
        for l in range(cfg.num_layers):
            h, c = Block(cfg, name=f"h{l}")(h, pre_ln, None if cache is None else cache[l], pos)
            new.append(c)
        h = jnp.where(pre_ln > 0, nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name="ln_f")(h), h)
        return wte.attend(h.astype(jnp.float32)), (None if cache is None else tuple(new))


def model_of(cfg: Config) -> GPT2:
    return GPT2(cfg, vocab_rows(cfg))


# --- HUGGING FACE CHECKPOINTS ---

# ours -> GPT2Model's names under h.{l}. (Conv1D weights are stored (in, out), as flax
# kernels: copied as they are; transposing them is the trap, and square c_proj would not
# even fail on shape)
HF_BLOCK = {("c_attn", "kernel"): "attn.c_attn.weight", ("c_attn", "bias"): "attn.c_attn.bias",
            ("c_proj", "kernel"): "attn.c_proj.weight", ("c_proj", "bias"): "attn.c_proj.bias",
            ("mlp_fc", "kernel"): "mlp.c_fc.weight", ("mlp_fc", "bias"): "mlp.c_fc.bias",
            ("mlp_proj", "kernel"): "mlp.c_proj.weight", ("mlp_proj", "bias"): "mlp.c_proj.bias",
            ("ln_1", "scale"): "ln_1.weight", ("ln_1", "bias"): "ln_1.bias",
            ("ln_2", "scale"): "ln_2.weight", ("ln_2", "bias"): "ln_2.bias"}


def params_from_hf(tensors: dict, cfg: Config, params) -> dict:
    """HF GPT2 state-dict tensors (names as in gpt2's model.safetensors, with or without the
    LM model's `transformer.` prefix) as this file's params: wte, wpe, the blocks, ln_f.
    `params` (this file's init) gives the shapes. lm_head.weight is not read (tied to wte,
    as ours); the attention-mask buffers (h.{l}.attn.bias of old checkpoints) are ignored.
    A shape mismatch raises naming the tensor and the Config field."""
    t = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    if f"h.{cfg.num_layers}.ln_1.weight" in t:
        raise ValueError(f"init_from: the checkpoint has more than num_layers={cfg.num_layers} "
                         "blocks: set num_layers to its n_layer")
    p = params["params"]

    def get(name, like, fields="d_model"):
        if name not in t:
            raise ValueError(f"init_from: tensor {name!r} is missing from the checkpoint "
                             f"(num_layers={cfg.num_layers}?)")
        a = np.asarray(t[name], np.float32)
        if a.shape != like.shape:
            raise ValueError(f"init_from: tensor {name!r} has shape {a.shape}, ours "
                             f"{like.shape}: set {fields} to the checkpoint's")
        return jnp.asarray(a)

    out = {"wte": {"embedding": get("wte.weight", p["wte"]["embedding"], "vocab_size / d_model")},
           "wpe": get("wpe.weight", p["wpe"], "seq_len (n_positions) / d_model"),
           "ln_f": {"scale": get("ln_f.weight", p["ln_f"]["scale"]),
                    "bias": get("ln_f.bias", p["ln_f"]["bias"])}}
    for l in range(cfg.num_layers):
        out[f"h{l}"] = {}
        for (mod, leaf), name in HF_BLOCK.items():
            arr = get(f"h.{l}.{name}", p[f"h{l}"][mod][leaf])
            out[f"h{l}"].setdefault(mod, {})[leaf] = arr
    return {"params": out}


def load_hf(path: str, cfg: Config, params) -> dict:
    """init_from: read model.safetensors (the file, or in the folder) and map it; a
    config.json beside it must agree on n_head (not visible in the tensors' shapes), the
    activation and the LN epsilon."""
    return params_from_hf(data.read_hf_checkpoint(path, {
        "n_head": (cfg.num_heads, "set num_heads to it"),
        "activation_function": (("gelu_new", "gelu_pytorch_tanh"),
                                "this file has the tanh GELU (gelu_new) only"),
        "layer_norm_epsilon": (1e-5, "this file's LN eps is 1e-5")}), cfg, params)


# --- LOSS ---


def token_nll(logits, targets):
    """-log softmax(logits)[target] per position (nats), f32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


# --- STATE ---


@struct.dataclass
class State:
    params: Any
    opt_state: Any
    key: jax.Array
    step: jax.Array
    pre_ln: jax.Array
    """1.0: pre-LN + ln_f (GPT-2); 0.0: post-LN (GPT) -- traced, one program runs both"""
    data: dict
    """train / val token streams and the cloze rows: inputs of the compiled chunks"""


def optimizer(cfg: Config):
    sched = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, cfg.warmup_steps, max(cfg.train_steps, cfg.warmup_steps + 1)
    )
    decay_mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
    return optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.adamw(sched, weight_decay=cfg.weight_decay, mask=decay_mask),
    ), sched


def init(key, cfg: Config) -> State:
    k_init, key = jax.random.split(key)
    params = model_of(cfg).init(k_init, jnp.zeros((1, cfg.seq_len), jnp.int32), 1.0)
    if cfg.init_from is not None:  # the checkpoint's arrays replace the random ones
        params = load_hf(cfg.init_from, cfg, params)
    d = data_of(cfg)
    arrays = {k: jnp.asarray(d[k]) for k in ("train", "val", "cloze", "cloze_mask")}
    return State(
        params,
        optimizer(cfg)[0].init(params),
        key,
        jnp.zeros((), jnp.int32),
        jnp.asarray(float(cfg.pre_ln), jnp.float32),
        arrays,
    )


# --- UPDATE ---


def update(state: State, cfg: Config):
    model = model_of(cfg)
    tx, sched = optimizer(cfg)
    key, k_batch = jax.random.split(state.key)
    x, y = data.lm_windows(k_batch, state.data["train"], cfg.batch_size, cfg.seq_len)

    def loss_fn(p):
        logits, _ = model.apply(p, x.astype(jnp.int32), state.pre_ln)
        return token_nll(logits, y).mean()  # L(U), nats per token

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "losses/loss": loss,
        "charts/bits_per_token": data.bits(loss),
        "charts/lr": sched(state.step),
        "charts/grad_norm": optax.global_norm(grads),
    }
    return state.replace(params=params, opt_state=opt_state, key=key, step=state.step + 1), metrics


def log_probs(params, pre_ln, rows, mask, cfg: Config):
    """sum_t mask_t log P(rows_{t+1} | rows_{<=t}) per row of rows (N, L + 1) (nats, <= 0)."""
    logits = model_of(cfg).apply(params, rows[:, :-1], pre_ln)[0]
    return -(token_nll(logits, rows[:, 1:]) * mask).sum(1)


def cloze_accuracy(scores):
    """scores (items, choices), the true word first: is it strictly the most likely?"""
    return (scores[:, 0] > scores[:, 1:].max(1)).mean()


def evaluate(state: State, cfg: Config):
    """Held-out LM loss over eval_windows windows of the val split (nats/token, bits/token,
    bits/byte, perplexity per token) and the zero-shot next-word cloze accuracy, beside its
    chance level and the context-free word-frequency scorer's accuracy. The windows (every
    target counted) and the cloze rows (the candidate's tokens counted) go through one
    masked forward."""
    d = data_of(cfg)
    val, B, L, W = state.data["val"], cfg.batch_size, cfg.seq_len, cfg.eval_windows
    starts = jnp.linspace(0, val.shape[0] - L - 2, W).astype(jnp.int32)
    windows = jax.vmap(lambda a: jax.lax.dynamic_slice(val, (a,), (L + 1,)))(starts)
    rows = jnp.concatenate([windows.astype(jnp.int32), state.data["cloze"]])
    mask = jnp.concatenate([jnp.ones((W, L), jnp.float32), state.data["cloze_mask"]])
    lp = jax.lax.map(
        lambda a: log_probs(state.params, state.pre_ln, *a, cfg),
        (rows.reshape(-1, B, L + 1), mask.reshape(-1, B, L)),
    ).reshape(-1)
    loss = -lp[:W].mean() / L  # nats per token
    return {
        "val_loss": loss,
        "val_bits_per_token": data.bits(loss),
        "val_bits_per_byte": data.bits(loss, d["bytes_per_token"]),
        "val_perplexity": data.perplexity(loss),
        "cloze_acc": cloze_accuracy(lp[W:].reshape(cfg.cloze_items, cfg.cloze_choices)),
        "cloze_chance": jnp.float32(1 / cfg.cloze_choices),
        "cloze_freq_acc": jnp.float32(d["freq_acc"]),
        "unigram_bits_per_byte": jnp.float32(d["unigram_bpb"]),
    }


# --- KV-CACHE DECODING ---


def empty_cache(cfg: Config, batch: int):
    shape = (batch, cfg.seq_len, cfg.num_heads, cfg.d_model // cfg.num_heads)
    z = jnp.zeros(shape, jnp.dtype(cfg.dtype))
    return tuple((z, z) for _ in range(cfg.num_layers))


def cached_step(params, cache, token, pos, pre_ln, cfg: Config):
    """One decoding step: token (B,) at position `pos` -> (logits (B, rows), cache)."""
    logits, cache = model_of(cfg).apply(params, token[:, None], pre_ln, cache, pos)
    return logits[:, 0], cache


def cached_logits(params, tokens, pre_ln, cfg: Config):
    """The logits of every position of tokens (B, L), one position at a time through the
    per-layer KV cache (lax.scan over positions): must equal the full forward's."""

    def step(cache, x):
        t, pos = x
        logits, cache = cached_step(params, cache, t, pos, pre_ln, cfg)
        return cache, logits

    L = tokens.shape[1]
    _, logits = jax.lax.scan(step, empty_cache(cfg, tokens.shape[0]), (tokens.T, jnp.arange(L)))
    return logits.transpose(1, 0, 2)


def generate(params, prompt, key, pre_ln, cfg: Config, num_new: int, n_vocab: int):
    """Sample num_new tokens after prompt (B, P) with the KV cache: the prompt is fed one
    token at a time, then each sampled token (top-k, temperature) is fed back. Only the
    tokenizer's n_vocab ids are sampled (released sample.py keeps logits[:, :, :n_vocab]):
    the table's other rows (paper preset: 50,257 rows for 256 bytes) get -inf."""
    B, P = prompt.shape
    seq = jnp.zeros((B, P + num_new), jnp.int32).at[:, :P].set(prompt)

    def step(carry, pos):
        seq, cache, key = carry
        logits, cache = cached_step(params, cache, seq[:, pos], pos, pre_ln, cfg)
        logits = jnp.where(jnp.arange(logits.shape[-1]) < n_vocab, logits, -jnp.inf)
        logits = logits / cfg.temperature
        if cfg.top_k:
            kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        key, k = jax.random.split(key)
        nxt = jax.random.categorical(k, logits)
        nxt = jnp.where(pos + 1 < P, seq[:, jnp.minimum(pos + 1, P - 1)], nxt)
        return (seq.at[:, pos + 1].set(nxt), cache, key), None

    (seq, _, _), _ = jax.lax.scan(
        step, (seq, empty_cache(cfg, B), key), jnp.arange(P + num_new - 1)
    )
    return seq


# --- MAIN ---


@functools.cache
def sampler(cfg: Config):
    """generate, jitted once per config: sample_tokens after a prompt, tokenizer ids only."""
    n_vocab = tokenizer(cfg.corpus, cfg.val_fraction, cfg.bpe_merges, cfg.data_dir)[2]
    return jax.jit(lambda p, t, k, f: generate(p, t, k, f, cfg, cfg.sample_tokens, n_vocab))


def sample_ids(res, cfg: Config, prompt: str, seed: int = 0) -> list[int]:
    """--prompt: seed 0's model continues `prompt` by sample_tokens tokens (prompt ids first)."""
    encode = tokenizer(cfg.corpus, cfg.val_fraction, cfg.bpe_merges, cfg.data_dir)[0]
    ids = encode(prompt).tolist()[-(cfg.seq_len - cfg.sample_tokens) :] or [10]
    params = jax.tree.map(lambda x: x[0], res.state.params)
    key = jax.random.PRNGKey(seed)
    out = sampler(cfg)(params, jnp.asarray([ids], jnp.int32), key, res.state.pre_ln[0])
    return np.asarray(out[0]).tolist()


def sample_text(res, cfg: Config, prompt: str, seed: int = 0) -> str:
    decode = tokenizer(cfg.corpus, cfg.val_fraction, cfg.bpe_merges, cfg.data_dir)[1]
    return decode(sample_ids(res, cfg, prompt, seed))


def plot(res, out: str) -> str:
    """Training loss per seed (bits per token) with the held-out bits per token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.plot import save_png

    h, f = res.history, {k: np.asarray(v) for k, v in res.final.items()}
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for i, row in enumerate(np.asarray(h["charts/bits_per_token"])):
        (line,) = ax.plot(row, lw=0.8, label=f"seed {i} train")
        v = f["val_bits_per_token"][i]
        ax.axhline(v, color=line.get_color(), ls="--", label=f"seed {i} held-out (end) {v:.2f}")
    acc, chance = f["cloze_acc"].mean(), f["cloze_chance"].mean()
    title = f"GPT-2 pre-LN; cloze acc {acc:.2f} (chance {chance:.2f})"
    ax.set(xlabel="update", ylabel="bits per token", ylim=(0, 8), title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, out)


def main(argv=None):
    """`--plot PNG` draws the losses; `--prompt TEXT` samples a continuation after training."""
    flags, argv = run.pop_flags(argv, "--plot", "--prompt")
    keys = ["val_bits_per_byte", "val_perplexity", "cloze_acc", "cloze_freq_acc"]
    keys += ["unigram_bits_per_byte", "losses/loss"]
    kw = dict(presets=PRESETS, evaluate=evaluate, argv=argv, doc=__doc__, summary_keys=keys)
    res = run.main(Config, init, update, **kw)
    cfg = Config(**json.loads((res.run_dir / "config.json").read_text())["config"])
    if flags["--plot"] is not None:
        print(plot(res, flags["--plot"]))
    if flags["--prompt"] is not None:
        print(f"--- sample (seed 0) ---\n{sample_text(res, cfg, flags['--prompt'])}")
    return res


if __name__ == "__main__":
    main()
