"""Tests of transformers/attention_is_all_you_need.py: attention and positions by hand, the
causal mask, KV-cache decoding, source padding, learning, purity, CLI and a torch port."""

import dataclasses
import functools
import json
import math
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import run
from tests.common import preset
from tests.common.compiled import compiled
from tests.common.config_fields import unread_fields
from tests.transformers import leak, peer
from tests.transformers import tiny_run as tiny_run_module
from transformers import attention_is_all_you_need as aiayn

# Numbers below 1000, a 2+2-layer model of width 32: data in ~1 s, compiles in seconds.
TINY = aiayn.Config(max_number=1000, num_pairs=2000, num_val=50, d_model=32, num_heads=4,
                    d_ff=64, num_encoder_layers=2, num_decoder_layers=2, batch_size=16,
                    warmup_steps=10, total_updates=3)


@functools.cache
def tiny_model(**overrides):
    """A random-init TINY model (dropout off) and a batch of real source/target pairs
    (built once per overrides)."""
    pairs = aiayn.load_pairs(TINY)
    model = aiayn.make_model(TINY, dropout=0.0, **overrides)
    src = jnp.asarray(pairs.val_src[:4], jnp.int32)
    tgt = jnp.asarray(pairs.val_tgt[:4], jnp.int32)
    params = compiled(lambda k_: model.init(k_, src, src != aiayn.PAD, tgt[:, :-1]),
                      jax.random.PRNGKey(0))
    return model, params, src, tgt


def test_attention_is_softmax_of_scaled_scores():
    """[1] Eq. 1 with the 1/sqrt(d_k) inside the exponent: equals jax.nn.dot_product_attention
    (with a key mask), and a one-query case computed by hand."""
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(s, (2, 3, 5, 8)) for s in (kq, kk, kv))  # (B, h, L, d_k)
    mask = jnp.arange(5)[None, None, None, :] < jnp.array([5, 3])[:, None, None, None]
    qq, kk_, vv = np.array([1.0, 2.0]), np.array([[1.0, 0.0], [0.0, 3.0]]), np.array([[1.0], [5.0]])
    hand = [jnp.asarray(x)[None, None, None] if x.ndim == 1 else jnp.asarray(x)[None, None]
            for x in (qq, kk_, vv)]

    @tiny_run_module.jit0  # one program for the three cases
    def cases(q, k, v, mask, hand):
        ref = jax.nn.dot_product_attention(*(x.transpose(0, 2, 1, 3) for x in (q, k, v)),
                                           mask=jnp.broadcast_to(mask, (2, 3, 5, 5)))
        return (aiayn.attention(q, k, v, mask), ref, aiayn.attention(*hand),
                aiayn.attention(q, k, v, jnp.zeros((1, 1, 1, 5), bool)))

    ours, ref, got, masked = cases(q, k, v, mask, hand)
    np.testing.assert_allclose(ours, ref.transpose(0, 2, 1, 3), atol=1e-5)
    s = kk_ @ qq / math.sqrt(2)  # scores 1/sqrt2, 6/sqrt2, scaled BEFORE the exponent
    w = np.exp(s) / np.exp(s).sum()
    np.testing.assert_allclose(got[0, 0, 0], w @ vv, rtol=1e-6)
    # a fully masked row stays finite (large finite negative, not -inf)
    assert np.isfinite(masked).all()


def test_sinusoid_by_hand_and_relative_rotation():
    """[1] Sec. 3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...); and
    PE(pos + k) is a fixed rotation of PE(pos) in each (sin, cos) pair."""
    d = 8
    pe = np.asarray(aiayn.sinusoid(jnp.arange(50), d))
    for pos in (0, 1, 7, 49):
        for i in range(d // 2):
            w = pos / 10000 ** (2 * i / d)
            np.testing.assert_allclose(pe[pos, 2 * i], math.sin(w), atol=1e-5)
            np.testing.assert_allclose(pe[pos, 2 * i + 1], math.cos(w), atol=1e-5)
    np.testing.assert_array_equal(pe[0], np.tile([0.0, 1.0], d // 2))
    k, i = 5, 1
    f = 1 / 10000 ** (2 * i / d)
    rot = np.array([[math.cos(k * f), -math.sin(k * f)], [math.sin(k * f), math.cos(k * f)]])
    np.testing.assert_allclose(pe[10 + k, 2:4], pe[10, 2:4] @ rot, atol=1e-5)


def test_decoder_has_no_future_leak_and_mask_off_leaks():
    model, params, src, tgt = tiny_model()
    vocab = model.vocab_size
    broken = aiayn.make_model(TINY, dropout=0.0, causal=False)  # same params, mask off
    both = tiny_run_module.jit0(  # one program for both models, every t
        lambda t: [m.apply(params, src, src != aiayn.PAD, t) for m in (model, broken)])
    for t in (1, 5, 12):
        leak.assert_no_future_leak(lambda x: both(x)[0], tgt[:, :-1], t, vocab)
    leak.assert_leaks(lambda x: both(x)[1], tgt[:, :-1], 5, vocab)


@pytest.mark.parametrize("positional", ["sinusoidal", "learned"])
def test_kv_cache_decoding_equals_full_pass(positional):
    """Greedy decoding one position at a time with cached keys/values gives the logits of the
    uncached full pass over the growing prefix at every step (1e-5) and the same tokens."""
    model, params, src, tgt = tiny_model(positional=positional)
    length = tgt.shape[1] - 1
    @tiny_run_module.jit0  # one program: cached and uncached decoding, teacher forcing
    def decode(params):
        (toks_c, logits_c), (toks_f, logits_f) = (
            aiayn.greedy_decode(model, params, src, src != aiayn.PAD, length, cached)
            for cached in (True, False))
        buf = jnp.concatenate([jnp.full((4, 1), aiayn.BOS), toks_f[:, :-1]], 1)
        full = model.apply(params, src, src != aiayn.PAD, buf)
        return toks_c, logits_c, toks_f, logits_f, full

    toks_c, logits_c, toks_f, logits_f, full = decode(params)
    np.testing.assert_allclose(logits_c, logits_f, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(toks_c, toks_f)
    assert logits_c.shape == (4, length, model.vocab_size)
    # the teacher-forced logits of the decoded prefix (`full`) are the same numbers again
    first_eos = np.argmax(np.asarray(toks_f) == aiayn.EOS, 1)
    for b in range(4):  # up to the first EOS the buffer holds exactly the greedy tokens
        n = first_eos[b] + 1 if (np.asarray(toks_f[b]) == aiayn.EOS).any() else length
        np.testing.assert_allclose(full[b, :n], logits_f[b, :n], atol=1e-5, rtol=1e-5)


def test_source_padding_changes_nothing():
    """With the source key mask, the token ids at padded positions, and extra padding columns,
    leave the decoder's logits unchanged."""
    model, params, src, tgt = tiny_model()
    mask = src != aiayn.PAD
    assert (~mask).any()
    noise = jax.random.randint(jax.random.PRNGKey(1), src.shape, 3, model.vocab_size)
    other = jnp.where(mask, src, noise)
    longer = jnp.pad(src, ((0, 0), (0, 6)))

    @tiny_run_module.jit0  # one program for the four passes
    def passes(src, other, longer):
        apply = lambda s, m: model.apply(params, s, m, tgt[:, :-1])
        return (apply(src, mask), apply(other, mask), apply(longer, longer != aiayn.PAD),
                apply(other, jnp.ones_like(mask)))

    base, padded_noise, padded_longer, unmasked = passes(src, other, longer)
    np.testing.assert_allclose(padded_noise, base, atol=1e-6)
    np.testing.assert_allclose(padded_longer, base, atol=1e-5)
    # without the mask (all keys visible) the pad tokens do change the output
    assert np.abs(unmasked - base).max() > 1e-3


def test_schedule_and_label_smoothing_by_hand():
    """[1] Eq. 3 at steps 1, warmup and 4 * warmup; label-smoothed CE on a 3-symbol case."""
    cfg = dataclasses.replace(TINY, d_model=512, warmup_steps=4000)
    lr = aiayn.schedule(cfg)
    np.testing.assert_allclose(lr(0), 512 ** -0.5 * 4000 ** -1.5, rtol=1e-6)
    np.testing.assert_allclose(lr(3999), 512 ** -0.5 * 4000 ** -0.5, rtol=1e-6)
    np.testing.assert_allclose(lr(15999), 512 ** -0.5 * 16000 ** -0.5, rtol=1e-6)
    logits = jnp.array([[[0.0, -1.0, 0.5, 2.0], [0.5, 0.5, 0.0, 3.0]]])
    targets = jnp.array([[3, aiayn.PAD]])  # the second position is padding: ignored
    loss, (nll, acc) = aiayn.translation_loss(logits, targets, 0.1)
    logp = np.asarray(jax.nn.log_softmax(logits[0, 0]))
    q = np.array([0.1 / 4, 0.1 / 4, 0.1 / 4, 0.9 + 0.1 / 4])  # (1 - eps) one_hot + eps / V
    np.testing.assert_allclose(loss, -(q * logp).sum(), rtol=1e-6)
    np.testing.assert_allclose(nll, -logp[3], rtol=1e-6)
    assert acc == 1.0


def test_held_out_numbers_are_disjoint_from_training():
    pairs = aiayn.load_pairs(TINY)
    train = {bytes(r) for r in pairs.src}
    assert not any(bytes(r) in train for r in pairs.val_src)
    assert len({bytes(r) for r in pairs.val_src}) == TINY.num_val
    assert pairs.tgt[:, 0].tolist() == [aiayn.BOS] * len(pairs.tgt)
    assert pairs.vocab[:3] == ("<pad>", "<bos>", "<eos>") and "ü" in pairs.vocab


# the one run of the CLI, purity and short behaviour tests: a 1+1-layer d = 32 model trained
# 120 updates (batch 32, numbers < 1000), chunks of 40, through the command line with
# 2 x PAIRS seeds in ONE compiled program: seeds PAIRS.. are the broken variant cut off from
# the source (State.cross = 0, traced), each on the key of its twin
RUN = aiayn.Config(max_number=1000, num_pairs=2000, num_val=50, d_model=32, num_heads=4,
                   d_ff=64, num_encoder_layers=1, num_decoder_layers=1, dropout=0.0,
                   batch_size=32, warmup_steps=50, total_updates=120)
CHUNK = 40
PAIRS = 2


def _half_cut_off(real_init):
    """`init` for 2 x PAIRS seeds: seed i >= PAIRS is seed i - PAIRS's initial state with
    the encoder-decoder attention term scaled by 0 (its key is recognised among the
    runner's seed keys of --seed 0)."""
    keys = jax.random.split(jax.random.PRNGKey(0), 2 * PAIRS)  # run.seed_keys(0, 2 * PAIRS)

    def init(key, cfg):
        i = jnp.argmax(jnp.all(key == keys, -1))
        return real_init(keys[i % PAIRS], cfg).replace(cross=jnp.where(i < PAIRS, 1.0, 0.0))

    return init


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """RUN through the command line, in-process, once."""
    with pytest.MonkeyPatch.context() as mp, tiny_run_module.lowest_level_compiles():
        mp.setattr(aiayn, "init", _half_cut_off(aiayn.init))
        return tiny_run_module.run_cli(aiayn, RUN, tmp_path_factory.mktemp("run"), CHUNK,
                                       seeds=2 * PAIRS)


def test_translation_needs_encoder_decoder_attention_short(tiny_run):
    """Short behaviour test: the CLI run of RUN (1+1 layers, d = 32, 120 updates of 32,
    numbers < 1000; evaluate() on 50 held-out numbers) against the same model cut off from
    the source (encoder-decoder attention term x 0: the decoder never sees the source), in
    the same compiled run, 2 seeds each. Measured (seeds averaged): greedy char accuracy
    0.649 vs 0.151, exact match 0.14 vs 0.00, teacher-forced 0.395 vs 0.679 nats/char."""
    np.testing.assert_array_equal(tiny_run.state.cross, [1.0] * PAIRS + [0.0] * PAIRS)
    f = {k: np.asarray(v) for k, v in tiny_run.final.items()}
    good = {k: float(v[:PAIRS].mean()) for k, v in f.items()}
    bad = {k: float(v[PAIRS:].mean()) for k, v in f.items()}
    print("correct", good, "broken", bad)
    assert good["val/greedy_char_accuracy"] > bad["val/greedy_char_accuracy"] + 0.25
    assert good["val/loss"] < 0.8 * bad["val/loss"], (good, bad)
    assert good["val/exact_match"] > 0.04 and bad["val/exact_match"] == 0.0, (good, bad)


@pytest.mark.slow
def test_translation_needs_encoder_decoder_attention():
    """Behaviour: a 1+1-layer model (d 64) trained 150 updates (batch 32, numbers < 1000)
    translates held-out numbers; the same model without encoder-decoder attention (broken
    variant: the decoder never sees the source) can only learn the German prior.
    Measured on a shared 2-core CPU (200 held-out numbers): correct exact match 0.55, greedy
    char accuracy 0.88, teacher-forced 0.21 nats/char; broken exact match 0.00, greedy char
    accuracy 0.32, 0.53 nats/char."""
    cfg = aiayn.Config(max_number=1000, num_pairs=4000, num_val=200, d_model=64, num_heads=4,
                       d_ff=128, num_encoder_layers=1, num_decoder_layers=1, dropout=0.0,
                       batch_size=32, warmup_steps=100, total_updates=150)

    def trained(c):
        state, _ = jax.jit(run.make_train(aiayn.init, aiayn.update, c))(jax.random.PRNGKey(0))
        return {k: float(v) for k, v in jax.jit(lambda s: aiayn.evaluate(s, c))(state).items()}

    good = trained(cfg)
    bad = trained(dataclasses.replace(cfg, cross_attention=False))
    print("correct", good, "broken", bad)
    assert good["val/exact_match"] > 0.25 and bad["val/exact_match"] < 0.05, (good, bad)
    assert good["val/greedy_char_accuracy"] > bad["val/greedy_char_accuracy"] + 0.3
    assert good["val/loss"] < 0.7 * bad["val/loss"]


def test_evaluate_scores_exact_match_and_char_accuracy_by_hand(monkeypatch):
    """evaluate's greedy scores on decodes set by hand (greedy_decode replaced): the targets
    themselves with one character wrong in 10 of the 50 held-out words (exact match 0.8,
    char accuracy 1 - 10 / #chars incl. EOS), and with every word wrong (0.0)."""
    state = compiled(lambda k_: aiayn.init(k_, TINY), jax.random.PRNGKey(0))
    pairs = aiayn.load_pairs(TINY)
    targets = np.asarray(pairs.val_tgt[:, 1:], np.int32)
    real = targets != aiayn.PAD
    decoded = {}

    def fake_greedy(model, params, src, src_mask, length, cached=True):
        out = decoded["out"]  # the traced argument of `evaluate` below
        return out, jax.nn.one_hot(out, model.vocab_size)

    def evaluate(s, out):  # one program for both decodes: the decode is an argument
        decoded["out"] = out
        return aiayn.evaluate(s, TINY)

    monkeypatch.setattr(aiayn, "greedy_decode", fake_greedy)
    evaluate = tiny_run_module.jit0(evaluate)
    wrong = targets.copy()
    wrong[:, 0] = np.where(targets[:, 0] == 3, 4, 3)  # first character wrong in every word
    for rows, exact in ((slice(0, 10), 0.8), (slice(0, 50), 0.0)):
        out = targets.copy()
        out[rows] = wrong[rows]
        ev = evaluate(state, out)
        np.testing.assert_allclose(ev["val/exact_match"], exact, atol=1e-7)
        n_wrong = len(range(50)[rows])
        np.testing.assert_allclose(ev["val/greedy_char_accuracy"], 1 - n_wrong / real.sum(),
                                   rtol=1e-6)


def test_train_is_pure_and_seeded(tiny_run, monkeypatch):
    """The runner's first chunk, rerun on the same initial states, gives the same metrics;
    the seeds differ."""
    monkeypatch.setattr(aiayn, "init", _half_cut_off(aiayn.init))
    with tiny_run_module.lowest_level_compiles():
        tiny_run_module.assert_pure(aiayn, RUN, tiny_run, CHUNK, seeds=2 * PAIRS)
    assert tiny_run.history["losses/loss"].shape == (2 * PAIRS, RUN.num_updates)


def test_cli_runs_and_documents_every_field(tiny_run, capsys):
    with pytest.raises(SystemExit):
        aiayn.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(aiayn.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out
    assert (tiny_run.run_dir / "metrics.jsonl").exists()
    summary = json.loads((tiny_run.run_dir / "summary.json").read_text())
    for k in ("val/exact_match", "val/greedy_char_accuracy", "val/loss"):
        assert len(summary[k]) == 2 * PAIRS and np.isfinite(summary[k]).all(), k


def test_bad_values_fail_with_named_field(tmp_path):
    with pytest.raises(ValueError, match="d_model=30 must be divisible by num_heads=4"):
        aiayn.main(["--d-model", "30", "--num-heads", "4", "--run-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="positional='rope'"):
        aiayn.main(["--positional", "rope", "--run-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="dropout must be in"):
        aiayn.main(["--dropout", "1.5", "--run-dir", str(tmp_path)])


PEER = textwrap.dedent("""
    import numpy as np, torch
    d = np.load("inputs.npz")
    torch.manual_seed(0)
    m = torch.nn.Transformer(d_model=16, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
                             dim_feedforward=32, dropout=0.0, activation="relu",
                             batch_first=True, norm_first=False)
    m.encoder.norm = None  # torch adds a final LayerNorm to each stack; the paper has none
    m.decoder.norm = None
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    m.train()  # dropout is 0; training mode keeps torch off its fused inference path
    src, tgt = torch.tensor(d["src"]), torch.tensor(d["tgt"])
    pad = torch.tensor(d["src_pad"])
    causal = torch.triu(torch.ones(tgt.shape[1], tgt.shape[1], dtype=torch.bool), 1)
    with torch.no_grad():
        memory = m.encoder(src, src_key_padding_mask=pad)
        out = m(src, tgt, tgt_mask=causal, src_key_padding_mask=pad,
                memory_key_padding_mask=pad)
    np.savez("peer.npz", memory=memory.numpy(), out=out.numpy(),
             **{k: v.numpy() for k, v in m.state_dict().items()})
""")


def port_torch(sd, params):
    """Copy torch.nn.Transformer weights (Linear stores (out, in)) into our param tree."""
    p = jax.tree.map(np.asarray, params)["params"]

    def mha(ours, prefix):
        w, b = sd[prefix + "in_proj_weight"], sd[prefix + "in_proj_bias"]
        for i, name in enumerate(("query", "key", "value")):
            d = w.shape[1]
            ours[name] = {"kernel": w[i * d:(i + 1) * d].T, "bias": b[i * d:(i + 1) * d]}
        ours["out"] = {"kernel": sd[prefix + "out_proj.weight"].T,
                       "bias": sd[prefix + "out_proj.bias"]}

    def rest(ours, prefix, norms):
        ours["ffn"] = {f"w_{i}": {"kernel": sd[f"{prefix}linear{i}.weight"].T,
                                  "bias": sd[f"{prefix}linear{i}.bias"]} for i in (1, 2)}
        for ours_name, theirs in norms:
            ours[ours_name] = {"scale": sd[prefix + theirs + ".weight"],
                               "bias": sd[prefix + theirs + ".bias"]}

    for i in range(2):
        enc, pre = p[f"encoder_{i}"], f"encoder.layers.{i}."
        mha(enc["self_attn"], pre + "self_attn.")
        rest(enc, pre, [("norm1", "norm1"), ("norm2", "norm2")])
        dec, pre = p[f"decoder_{i}"], f"decoder.layers.{i}."
        mha(dec["self_attn"], pre + "self_attn.")
        mha(dec["cross_attn"], pre + "multihead_attn.")
        rest(dec, pre, [("norm1", "norm1"), ("norm2", "norm2"), ("norm3", "norm3")])
    return {"params": p}


@pytest.mark.peer
def test_matches_torch_nn_transformer(tmp_path):
    """Port a random-init (std 0.3) post-LN torch.nn.Transformer (ReLU, dropout 0, final
    stack norms removed) into our encoder/decoder stacks: same outputs to float32 precision
    (measured 3e-7), with source padding and the causal target mask."""
    rng = np.random.default_rng(0)
    src = rng.normal(size=(3, 7, 16)).astype(np.float32)
    tgt = rng.normal(size=(3, 5, 16)).astype(np.float32)
    src_pad = np.zeros((3, 7), bool)
    src_pad[1, 5:], src_pad[2, 3:] = True, True
    np.savez(tmp_path / "inputs.npz", src=src, tgt=tgt, src_pad=src_pad)
    peer.run_peer(PEER, tmp_path)  # skips if torch cannot be installed, fails if PEER raises
    sd = dict(np.load(tmp_path / "peer.npz"))
    cfg = dataclasses.replace(TINY, d_model=16, num_heads=4, d_ff=32)
    model = aiayn.make_model(cfg, dropout=0.0)
    x = jnp.zeros((1, 7), jnp.int32)
    params = port_torch(sd, compiled(lambda k_: model.init(k_, x, x == 0, x[:, :5]),
                                     jax.random.PRNGKey(0)))
    mask = jnp.asarray(~src_pad)
    memory = model.apply(params, jnp.asarray(src), mask, method=aiayn.Transformer.encode_embedded)
    out = model.apply(params, jnp.asarray(tgt), memory, mask,
                      method=aiayn.Transformer.decode_embedded)
    err = max(np.abs(memory - sd["memory"]).max(), np.abs(out - sd["out"]).max())
    print("max |ours - torch|:", err)  # measured 3.0e-7
    np.testing.assert_allclose(memory, sd["memory"], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(out, sd["out"], atol=2e-5, rtol=1e-5)
    # broken variants are far off: no causal mask, or cross-attention that sees the padding
    bad = aiayn.make_model(cfg, dropout=0.0, causal=False).apply(
        params, jnp.asarray(tgt), memory, mask, method=aiayn.Transformer.decode_embedded)
    assert np.abs(np.asarray(bad) - sd["out"]).max() > 1e-3  # measured 9.6e-3
    bad = model.apply(params, jnp.asarray(tgt), memory, jnp.ones_like(mask),
                      method=aiayn.Transformer.decode_embedded)
    assert np.abs(np.asarray(bad) - sd["out"]).max() > 1e-3  # measured 3.2e-3


def test_every_config_field_is_read():
    assert unread_fields(aiayn) == []


def test_paper_preset_traces():
    """jax.eval_shape of init and one update under the paper preset (nothing runs), with
    num_pairs 2000 instead of 200_000: spelling out 200k numbers takes ~1 min on the host,
    and no shape depends on it (the vocabulary is the same characters)."""
    cfg, state, after = preset.trace_paper(aiayn, num_pairs=2000)
    assert cfg.batch_size == 256
    assert jax.tree.structure(after[0]) == jax.tree.structure(state)
