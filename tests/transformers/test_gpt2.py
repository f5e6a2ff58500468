"""Tests of transformers/gpt2.py: the pre-LN block by hand; one compiled decoding program for
causality (exactly 0), the KV cache against the full forward, generate (argmax, top-k,
temperature, tokenizer ids only) and the evaluation pieces; the cloze rows and their
frequency-matched distractors (host only); one tiny CLI run of 4 seeds (2 GPT-2, 2 post-LN +
unscaled twins) reused by the init, schedule, behaviour, purity and CLI tests; the
paper-preset trace and the Config fields."""

import contextlib
import dataclasses
import io
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.common import preset
from tests.common.cli import cli_args
from tests.common.compiled import compiled, main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.transformers.leak import assert_no_future_leak
from tests.transformers.tiny_run import jit0
from transformers import gpt2

# one tiny config for every test (the behaviour test's depth and learning rate)
TINY = gpt2.Config(
    vocab_size=None,
    seq_len=16,
    num_layers=8,
    d_model=32,
    num_heads=2,
    batch_size=8,
    train_steps=300,
    lr=1e-2,
    warmup_steps=0,
    eval_windows=64,
    cloze_items=16,
    sample_tokens=4,
    top_k=1,
)
CHUNK = 50
SEEDS = 2
KEYS = jax.random.split(jax.random.PRNGKey(0), 2 * SEEDS)  # the runner's keys (--seed 0)
_INIT = gpt2.init  # the file's own (the fixture patches gpt2.init)


def _params(cfg=TINY, seed=0):
    return compiled(
        lambda k: gpt2.model_of(cfg).init(k, jnp.zeros((1, cfg.seq_len), jnp.int32), 1.0),
        jax.random.PRNGKey(seed),
    )


def _ln(x, p, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def test_block_is_pre_ln_and_the_head_is_tied_to_ln_f():
    """Block(x) in numpy: x + c_proj(Attn(LN_1 x)), then x + mlp_proj(gelu_tanh(mlp_fc(LN_2 x)));
    pre_ln = 0 gives LN_1(x + Attn x), LN_2(. + MLP .) instead; the model's logits are
    LN_f(h_L) W_te^T with no other output matrix (tied)."""
    cfg = dataclasses.replace(TINY, num_layers=1)
    params = _big(_params(cfg))  # non-trivial LN, big weights
    B, L, d, H = 2, cfg.seq_len, cfg.d_model, cfg.num_heads
    tokens = np.random.default_rng(1).integers(0, 256, (B, L))
    fn = jit0(lambda p, t, f: gpt2.model_of(cfg).apply(p, t, f)[0])
    got_pre, got_post = np.asarray(fn(params, tokens, 1.0)), np.asarray(fn(params, tokens, 0.0))

    p = params["params"]
    b = p["h0"]
    dense = lambda z, q: z @ q["kernel"] + q["bias"]

    def attn(z):
        q, k, v = np.split(dense(z, b["c_attn"]).reshape(B, L, 3, H, d // H), 3, axis=2)
        q, k, v = (a[:, :, 0].transpose(0, 2, 1, 3) for a in (q, k, v))
        w = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d // H)
        w = np.where(np.tril(np.ones((L, L), bool)), w, -np.inf)
        a = np.exp(w - w.max(-1, keepdims=True))
        a = (a / a.sum(-1, keepdims=True)) @ v
        return dense(a.transpose(0, 2, 1, 3).reshape(B, L, d), b["c_proj"])

    gelu = lambda z: 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))
    mlp = lambda z: dense(gelu(dense(z, b["mlp_fc"])), b["mlp_proj"])
    wte = p["wte"]["embedding"]
    x = wte[tokens] + p["wpe"][:L]
    h = x + attn(_ln(x, b["ln_1"]))
    h = h + mlp(_ln(h, b["ln_2"]))
    np.testing.assert_allclose(got_pre, _ln(h, p["ln_f"]) @ wte.T, rtol=2e-4, atol=2e-4)
    n = _ln(x + attn(x), b["ln_1"])
    np.testing.assert_allclose(got_post, _ln(n + mlp(n), b["ln_2"]) @ wte.T, rtol=2e-4, atol=2e-4)
    assert np.abs(got_pre - got_post).max() > 0.5
    leaves = jax.tree_util.tree_flatten_with_path(p)[0]
    assert [jax.tree_util.keystr(k) for k, v in leaves if v.shape[0] == 256] == [
        "['wte']['embedding']"
    ]  # the only vocabulary-sized matrix: input and output tied


# the causality, cache and sampling checks: TINY at 2 blocks, one compiled program
SHALLOW = dataclasses.replace(TINY, num_layers=2)
WIDE = dataclasses.replace(SHALLOW, vocab_size=1024, top_k=0)  # 1,024 rows, 256 byte ids
SAMPLERS = {  # generate's settings (pre-LN): greedy by temperature, top 2
    "cold": dataclasses.replace(SHALLOW, top_k=0, temperature=1e-6),
    "top2": dataclasses.replace(SHALLOW, top_k=2),
}
P, LEAK_T = 5, 9  # prompt length; first perturbed position of the leak check


def _perturbed(tokens):
    """assert_no_future_leak's own perturbation of positions >= LEAK_T."""
    L = tokens.shape[1]
    return tokens.at[:, LEAK_T:].set((tokens[:, LEAK_T:] + 1 + jnp.arange(L - LEAK_T)) % 256)


def _decode_program(params, big, wide, tokens, rows, mask, key):
    """Everything the decoding tests need, both placements, in one program."""
    out, model, L = {}, gpt2.model_of(SHALLOW), TINY.seq_len
    for flag in (1.0, 0.0):
        out[str(flag)] = {
            "full": model.apply(params, tokens, flag)[0],
            "other": model.apply(params, _perturbed(tokens), flag)[0],
            "cached": gpt2.cached_logits(params, tokens, flag, SHALLOW),
            "log_probs": gpt2.log_probs(params, flag, rows, mask, SHALLOW),
        }
    for name, cfg in SAMPLERS.items():
        gen = gpt2.generate(big, tokens[:, :P], key, 1.0, cfg, L - P, 256)
        out[name], out[name + "_full"] = gen, model.apply(big, gen, 1.0)[0]
    out["wide"] = gpt2.generate(wide, tokens[:, :P], key, 1.0, WIDE, L - P, 256)
    return out


def _big(params, seed=2):
    """params + N(0, 0.3^2): non-trivial LN and weights big enough that the next token is not
    just the current one (at init the tied head mostly predicts the input token again)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda a: np.asarray(a) + np.float32(0.3) * rng.normal(size=a.shape).astype(np.float32),
        params,
    )


@pytest.fixture(scope="module")
def decoded():
    params = _params(SHALLOW, seed=3)
    wide = _params(WIDE, seed=4)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (4, TINY.seq_len), 0, 256)
    d = gpt2.data_of(TINY)
    rows, mask = d["cloze"][:16], d["cloze_mask"][:16]
    return tokens, jit0(_decode_program)(
        params, _big(params), wide, tokens, rows, mask, jax.random.PRNGKey(0)
    )


def test_causal_leak_is_exactly_zero(decoded):
    """Logits before position t are bit-identical when tokens >= t change (both placements)."""
    tokens, out = decoded
    for flag in (1.0, 0.0):
        o = out[str(flag)]
        fn = lambda t, o=o: o["full"] if np.array_equal(t, tokens) else o["other"]
        assert_no_future_leak(fn, tokens, LEAK_T, 256, atol=0.0)


def test_kv_cache_logits_equal_the_full_forward_and_generate_uses_them(decoded):
    """Every position's logits through the per-layer KV cache (one token at a time) equal the
    full forward's to 1e-5, pre- and post-LN. generate keeps the prompt; with temperature
    1e-6 and no top-k every sampled token is the argmax of the full forward's logits on the
    generated sequence; with top_k = 2 it is among their top 2, and not always the top 1.
    On a 1,024-row table with 256 byte ids, top_k = 0 samples byte ids only."""
    tokens, out = decoded
    for flag in (1.0, 0.0):
        o = out[str(flag)]
        np.testing.assert_allclose(o["cached"], o["full"], atol=1e-5, rtol=0)
    for name in SAMPLERS:
        gen, full = np.asarray(out[name]), np.asarray(out[name + "_full"])
        np.testing.assert_array_equal(gen[:, :P], tokens[:, :P])
        top1 = np.argmax(full[:, P - 1 : -1], -1)
        if name == "top2":
            top2 = np.argsort(full[:, P - 1 : -1], -1)[..., -2:]
            assert (top2 == gen[:, P:, None]).any(-1).all(), name
            assert not np.array_equal(gen[:, P:], top1)
        else:
            np.testing.assert_array_equal(gen[:, P:], top1, err_msg=name)
            assert (gen[:, P:] != gen[:, P - 1 : -1]).mean() > 0.5  # not a copy of the last
    wide = np.asarray(out["wide"])
    assert (wide < 256).all() and len(np.unique(wide[:, P:])) > 10, wide


def test_log_probs_and_cloze_accuracy(decoded):
    """The evaluation pieces: log_probs is a sum of log-probabilities over the masked tokens
    (<= 0, 0 on an empty mask, below -1 on a non-empty one at init); cloze_accuracy counts
    items whose first (true) score is strictly the largest (bits per byte is common.data.bits,
    tested in tests/common)."""
    _, out = decoded
    mask = gpt2.data_of(TINY)["cloze_mask"][:16]
    for flag in (1.0, 0.0):
        lp = np.asarray(out[str(flag)]["log_probs"])
        assert (lp[mask.sum(1) > 0] < -1).all() and (lp[mask.sum(1) == 0] == 0).all(), lp
    scores = np.array([[0.0, -1, -2, -3], [-1, 0, -2, -3], [-1, -1, -2, -3], [-0.5, -1, -2, -3]])
    assert float(gpt2.cloze_accuracy(jnp.asarray(scores))) == 0.5


def test_cloze_rows_hold_the_true_word_first_and_mask_its_tokens():
    """Each cloze item: choices rows sharing one context, the first one's candidate is the
    word that follows the context in the held-out text; masks cover the candidate tokens;
    distractors have the true word's length and differ from it."""
    d = gpt2.data_of(TINY)
    _, decode, _ = gpt2.tokenizer(TINY.corpus, TINY.val_fraction, TINY.bpe_merges)
    val_text = gpt2.split_text(TINY.corpus, TINY.val_fraction)[1]
    C = TINY.cloze_choices
    rows, masks = (
        d["cloze"].reshape(-1, C, TINY.seq_len + 1),
        d["cloze_mask"].reshape(-1, C, TINY.seq_len),
    )
    for r, m in zip(rows, masks, strict=True):
        words = [decode(r[c, 1:][m[c] > 0]) for c in range(C)]
        ctx = decode(r[0, 1:][m[0] == 0])
        assert all(w.startswith(" ") and len(w) == len(words[0]) for w in words), words
        assert len(set(words)) == C, words
        assert (ctx + words[0]) in val_text, (ctx, words)
        np.testing.assert_array_equal(r[0, : -len(words[0])], r[1, : -len(words[0])])


def test_cloze_distractors_are_frequency_matched():
    """Over 512 items the context-free train-split word-frequency scorer (the true word's
    count strictly highest; ties share the point) is within 3 sigma of chance 1 / C, computed
    here from the rows, and equals the file's reported baseline. With distractors drawn
    uniformly over distinct same-length words it scored 0.398 on 128 items (review)."""
    import collections
    import re

    cfg = dataclasses.replace(TINY, cloze_items=512)
    d = gpt2.data_of(cfg)
    _, decode, _ = gpt2.tokenizer(cfg.corpus, cfg.val_fraction, cfg.bpe_merges)
    train_text = gpt2.split_text(cfg.corpus, cfg.val_fraction)[0]
    counts = collections.Counter(re.findall(r" ([a-z]{4,10})(?=[ ,.;:])", train_text))
    C = cfg.cloze_choices
    acc = 0.0
    rows = d["cloze"].reshape(-1, C, cfg.seq_len + 1)
    masks = d["cloze_mask"].reshape(-1, C, cfg.seq_len)
    for r, m in zip(rows, masks, strict=True):
        c = np.array([counts[decode(r[k, 1:][m[k] > 0])[1:]] for k in range(C)])
        acc += (c[0] == c.max()) / (c == c.max()).sum() / len(rows)
    sigma = math.sqrt((1 / C) * (1 - 1 / C) / len(rows))
    print(f"word-frequency scorer {acc:.3f}, chance {1 / C}, sigma {sigma:.3f}")
    assert abs(acc - 1 / C) < 3 * sigma, acc
    assert abs(d["freq_acc"] - acc) < 1e-9


def test_bpe_tokens_travel_as_uint16_and_decode_to_the_text():
    """--bpe-merges 64: transformers/bpe.py's byte-level BPE trained on the training split;
    the streams are uint16 ids below 256 + 64 that decode back to the split's text, with more
    than one byte per token; bytes (--bpe-merges 0) are uint8, one byte per token."""
    cfg = dataclasses.replace(TINY, bpe_merges=64)
    d = gpt2.data_of(cfg)
    _, decode, size = gpt2.tokenizer(cfg.corpus, cfg.val_fraction, 64)
    train_text, val_text = gpt2.split_text(cfg.corpus, cfg.val_fraction)
    assert size == 320 and d["size"] == 320 and gpt2.vocab_rows(cfg) == 320
    assert d["train"].dtype == np.uint16 and d["train"].max() < 320
    assert decode(d["val"]) == val_text and decode(d["train"][:5000]) in train_text
    assert d["bytes_per_token"] > 1.2
    b = gpt2.data_of(TINY)
    assert b["train"].dtype == np.uint8 and b["bytes_per_token"] == 1.0


def _twin_init(key, cfg):
    """gpt2.init; seeds SEEDS..2 SEEDS-1 (same keys as 0..SEEDS-1) are the broken variant:
    post-LN (GPT's placement, no ln_f) with unscaled residual init."""
    i = jnp.argmax(jnp.all(key == KEYS, -1))
    good = _INIT(KEYS[i % SEEDS], cfg)
    bad = _INIT(KEYS[i % SEEDS], dataclasses.replace(cfg, pre_ln=False, scaled_init=False))
    return jax.tree.map(lambda a, b: jnp.where(i >= SEEDS, b, a), good, bad)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """TINY through the command line, in-process, once, 2 x SEEDS seeds,
    with the runner's compiled chunks recorded for the purity rerun."""
    argv = cli_args(TINY, gpt2.Config()) + [
        "--num-seeds",
        str(2 * SEEDS),
        "--log-every",
        str(CHUNK),
        "--no-progress",
        "--run-dir",
        str(tmp_path_factory.mktemp("run")),
        "--prompt",
        "The ",
    ]
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setattr(gpt2, "init", _twin_init)
        res, chunks = main_recording_chunks(gpt2.main, argv)
    saved = json.loads((res.run_dir / "config.json").read_text())["config"]
    assert saved == json.loads(json.dumps(dataclasses.asdict(TINY), default=str))
    return res, chunks, out.getvalue()


def test_init_stds_residual_projections_scaled_by_depth(tiny_run):
    """[1] Sec. 2.3, from the run's recorded initial states: c_proj and mlp_proj ~ N(0, 0.02 /
    sqrt(2 L)) (within 10%), c_attn and mlp_fc 0.02, W_te 0.02, W_pe 0.01; the twins
    (scaled_init False) have residual projections of std 0.02."""
    _, chunks, _ = tiny_run
    params = chunks[0][1].params["params"]
    for i in range(2 * SEEDS):
        p = jax.tree.map(lambda x, i=i: np.asarray(x[i]), params)
        resid = 0.02 / math.sqrt(2 * TINY.num_layers) if i < SEEDS else 0.02
        want = {"c_proj": resid, "mlp_proj": resid, "c_attn": 0.02, "mlp_fc": 0.02}
        for l in range(TINY.num_layers):
            for name, w in want.items():
                std = float(np.std(p[f"h{l}"][name]["kernel"]))
                assert abs(std / w - 1) < 0.1, (i, l, name, std, w)
        assert abs(float(np.std(p["wpe"])) / 0.01 - 1) < 0.1
        assert abs(float(np.std(p["wte"]["embedding"])) / 0.02 - 1) < 0.1


def test_schedule_and_weight_decay_mask(tiny_run):
    """The logged lr is the optimiser's schedule (no warm-up in TINY: the peak, then cosine
    to ~0); AdamW's decoupled decay (lr * 0.01 * w at a zero gradient) shrinks the matrices
    and leaves the biases, LayerNorm gains and offsets alone."""
    res, chunks, _ = tiny_run
    lr = np.asarray(res.history["charts/lr"])
    tx, sched = gpt2.optimizer(TINY)
    np.testing.assert_allclose(lr[0], sched(np.arange(TINY.train_steps)), rtol=1e-6, atol=1e-9)
    assert lr[0, 0] == np.float32(TINY.lr) and lr[0, -1] < 1e-3 * TINY.lr
    p = jax.tree.map(lambda x: np.asarray(x[0]), chunks[0][1].params)
    upd = jit0(lambda p: tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)[0])(p)
    for path, u in jax.tree_util.tree_flatten_with_path(upd)[0]:
        w = p
        for k in path:
            w = w[k.key]
        want = -TINY.lr * TINY.weight_decay * w if w.ndim > 1 else np.zeros_like(w)
        np.testing.assert_allclose(u, want, rtol=1e-5, atol=1e-12, err_msg=str(path))


def test_pre_ln_scaled_init_beats_post_ln_unscaled(tiny_run):
    """Behaviour, one compiled run: 8 blocks of d 32 at lr 1e-2 with no warm-up, 300 updates
    of 8 x 16 bytes; the GPT-2 seeds (pre-LN + ln_f, residual init 0.02 / sqrt(16)) reach a
    lower held-out loss than their twins with GPT's post-LN placement and std-0.02 residual
    init (same keys, same batches). Measured (loaded 2-core CPU): 2.97 / 2.87 nats/token vs
    3.32 / 3.30 (the broken arm stays at the unigram level, ~3.25); the calibration sweep
    (same sizes): at 200 updates the gap was only 0.07, at lr 3e-3 it was not stable
    (2.99 / 2.77 vs 3.33 / 2.57)."""
    res, _, _ = tiny_run
    val = np.asarray(res.final["val_loss"])
    good, bad = val[:SEEDS], val[SEEDS:]
    print(f"held-out nats/token gpt2 {good} post-LN unscaled {bad}")
    assert (good < bad - 0.1).all(), (good, bad)


def test_train_is_pure_and_seeded(tiny_run):
    """The recorded first chunk, rerun on a copy of its input states, gives the run's first
    rows bit for bit; the seeds differ; the losses are finite; twins get the flags."""
    res, chunks, _ = tiny_run
    fn, states = chunks[0]
    _, metrics = jax.device_get(fn(states))
    for k in res.history:
        np.testing.assert_array_equal(res.history[k][:, :CHUNK], metrics[k], err_msg=k)
    loss = res.history["losses/loss"]
    assert loss.shape == (2 * SEEDS, TINY.num_updates) and np.isfinite(loss).all()
    assert not np.array_equal(loss[0], loss[1])
    np.testing.assert_array_equal(res.state.pre_ln, [1.0] * SEEDS + [0.0] * SEEDS)


def test_cli_runs_samples_and_documents_every_field(tiny_run, capsys):
    """--help lists every field; the run wrote finite summaries; the bits-per-byte and
    perplexity identities hold; --prompt printed a sample of the prompt + sample_tokens
    tokens, and sample_text (the same cached compiled sampler) gives it again."""
    res, _, printed = tiny_run
    with pytest.raises(SystemExit):
        gpt2.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(gpt2.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out
    f = {k: np.asarray(v) for k, v in res.final.items()}
    np.testing.assert_allclose(f["val_bits_per_token"], f["val_loss"] / math.log(2), rtol=1e-6)
    np.testing.assert_allclose(f["val_bits_per_byte"], f["val_bits_per_token"], rtol=1e-6)
    np.testing.assert_allclose(f["val_perplexity"], np.exp(f["val_loss"]), rtol=1e-5)
    assert ((0 <= f["cloze_acc"]) & (f["cloze_acc"] <= 1)).all()
    np.testing.assert_allclose(f["cloze_freq_acc"], gpt2.data_of(TINY)["freq_acc"])
    summary = json.loads((res.run_dir / "summary.json").read_text())
    assert len(summary["cloze_acc"]) == 2 * SEEDS
    ids = gpt2.sample_ids(res, TINY, "The ")
    assert len(ids) == 4 + TINY.sample_tokens and ids[:4] == list(b"The ")
    assert f"--- sample (seed 0) ---\n{gpt2.sample_text(res, TINY, 'The ')}\n" in printed


def test_bad_values_fail_with_named_field(tmp_path):
    with pytest.raises(ValueError, match="d_model=30 is not divisible by num_heads=4"):
        gpt2.main(["--preset", "quick", "--d-model", "30", "--run-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="vocab_size=10 is below"):
        gpt2.main(["--preset", "quick", "--vocab-size", "10", "--run-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="bpe_merges=-1"):
        gpt2.main(["--preset", "quick", "--bpe-merges", "-1", "--run-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="eval_windows=100"):
        gpt2.main(["--preset", "quick", "--eval-windows", "100", "--run-dir", str(tmp_path)])


def test_every_config_field_is_read():
    assert unread_fields(gpt2) == []


def test_paper_preset_traces_gpt2_small():
    """eval_shape of init and one update at the paper preset (pydoc instead of the stdlib,
    to keep the trace light): 12 x 768, context 1024, 50,257 rows: 124.4M parameters
    (GPT-2 small; [1] Table 2 says 117M); bf16 compute keeps f32 parameters."""
    cfg, state, after = preset.trace_paper(gpt2, corpus="pydoc")
    assert jax.tree.structure(after[0]) == jax.tree.structure(state)
    n = sum(x.size for x in jax.tree.leaves(state.params))
    assert 124e6 < n < 125e6, n
    assert state.params["params"]["wte"]["embedding"].shape == (50257, 768)
    assert state.params["params"]["wpe"].shape == (1024, 768)
    bf = dataclasses.replace(cfg, dtype="bfloat16")
    st = jax.eval_shape(lambda k: gpt2.init(k, bf), jax.random.PRNGKey(0))
    assert {x.dtype for x in jax.tree.leaves(st.params)} == {jnp.dtype("float32")}
    logits = jax.eval_shape(
        lambda p: gpt2.model_of(bf).apply(p, jnp.zeros((1, 8), jnp.int32), 1.0)[0], st.params
    )
    assert logits.dtype == jnp.float32
