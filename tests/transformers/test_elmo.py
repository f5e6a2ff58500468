"""Tests of transformers/elmo.py: the backward LM conditions only on the future and the
forward one only on the past (exact), the loss targets of both directions, one token layer
and one softmax shared by the directions, the LSTM-with-projection cell and the char CNN +
highway token layer by hand, the scalar mix on hand-made layers; one tiny CLI run (2
seeds) reused by the behaviour, purity and CLI tests; the paper preset traced; and a slow
gate (pytest -m slow) with the broken variant (the mix on the token layer only)."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import run
from tests.common import preset
from tests.common.compiled import main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.transformers import tiny_run as tiny_run_module
from tests.transformers.tiny_run import jit0
from transformers import elmo

# one tiny config for every test: characters, 2 layers of 64 cells projected to 16,
# windows of 16; 200 biLM updates of 16 windows, then 150 task updates of 16 windows
TINY = elmo.Config(tokens="char", token_encoder="embed", vocab_size=None, proj_dim=16,
                   lstm_dim=64, seq_len=16, batch_size=16, pretrain_steps=200, pretrain_lr=1.0,
                   finetune_steps=150, num_labelled=256, num_eval=128, finetune_batch=16,
                   task_lr=3e-3, eval_windows=64)
CHUNK = 25  # TINY.num_updates = 350: 14 chunks of one program (the purity test reruns one)
SEEDS = tiny_run_module.SEEDS


def _bilm(params, ids, cfg):
    bilm, _ = elmo.models(cfg)
    return bilm.apply(params, ids, jax.random.PRNGKey(0), jnp.asarray(False))


def _init_bilm(key, cfg):
    return elmo.init(key, cfg).params["bilm"]


@functools.cache
def _tiny_bilm_params():
    """TINY's biLM parameters at init (one compile, shared by the tests that need them)."""
    return jit0(_init_bilm, 1)(jax.random.PRNGKey(0), TINY)


def test_directions_condition_only_on_their_side_and_the_loss_targets():
    """Changing token t: the forward logits and states at positions < t and the backward
    ones at positions > t are bit-identical; at t they change (both directions read x_t).
    So the backward LM at k, which bilm_loss scores on window[k] (the previous token),
    conditions only on x_{>=k}: the future of its target. Layer 0 is [x_k; x_k]. Fails when
    the backward stack reads the forward order (tried: the backward asserts fail)."""
    params = _tiny_bilm_params()
    T, t, p = TINY.seq_len, 7, TINY.proj_dim
    ids = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (2, T), 0, 50))
    ids2 = ids.copy()
    ids2[:, t] = (ids2[:, t] + 11) % 50
    f, b, h = (np.asarray(a) for a in jit0(_bilm, 2)(params, np.concatenate([ids, ids2]), TINY))
    np.testing.assert_array_equal(f[:2, :t], f[2:, :t])
    np.testing.assert_array_equal(b[:2, t + 1:], b[2:, t + 1:])
    np.testing.assert_array_equal(h[1:, :2, :t, :p], h[1:, 2:, :t, :p])  # ->h_kj, k < t
    np.testing.assert_array_equal(h[1:, :2, t + 1:, p:], h[1:, 2:, t + 1:, p:])  # <-h_kj, k > t
    for x in (f, b, h[1, ..., :p], h[1, ..., p:]):
        assert np.abs(x[:2, t] - x[2:, t]).max() > 1e-4
    assert np.abs(f[:2, t + 1:] - f[2:, t + 1:]).max() > 1e-4  # the future reaches forward
    assert np.abs(b[:2, :t] - b[2:, :t]).max() > 1e-4  # the past reaches backward
    np.testing.assert_array_equal(h[0, ..., :p], h[0, ..., p:])
    # bilm-tf's loss: 0.5 (NLL_fwd + NLL_bwd); forward target window[k + 2], backward window[k]
    rng = np.random.default_rng(0)
    fl, bl = rng.normal(size=(2, 3, 4, 6)).astype(np.float32)
    window = rng.integers(0, 6, size=(3, 6))
    rows = np.array([1.0, 1.0, 0.0], np.float32)
    lp = lambda z: z - np.log(np.exp(z).sum(-1, keepdims=True))
    pick = lambda z, y: -np.take_along_axis(lp(z), y[..., None], -1)[..., 0][:2].mean()
    got = jit0(elmo.bilm_loss)(fl, bl, window, rows)
    want_f, want_b = pick(fl, window[:, 2:]), pick(bl, window[:, :-2])
    np.testing.assert_allclose(got, [0.5 * (want_f + want_b), want_f, want_b], rtol=1e-5)


def _grads_by_direction(params, ids, window):
    def loss(p, d):
        f, b, _ = _bilm(p, ids, TINY)
        return elmo.bilm_loss(f, b, window, jnp.ones(ids.shape[0]))[1 + d]
    return [jax.grad(loss)(params, d) for d in (0, 1)]


def test_token_layer_and_softmax_are_one_parameter_shared_by_the_directions():
    """The biLM's parameters are one token layer, one softmax and two LSTM stacks; the
    forward loss alone and the backward loss alone both have gradients on the same softmax
    and token-layer arrays, and none on the other direction's LSTMs. Fails with a softmax
    per direction (tried: the key set differs)."""
    params = _tiny_bilm_params()
    names = set(params["params"])
    assert names == {"tokens", "softmax", "lstm_f0", "lstm_f1", "lstm_b0", "lstm_b1"}, names
    window = np.asarray(jax.random.randint(jax.random.PRNGKey(2), (2, TINY.seq_len + 2), 0, 50))
    gf, gb = jit0(_grads_by_direction)(params, window[:, 1:-1], window)
    norm = lambda g: float(sum(np.abs(x).sum() for x in jax.tree.leaves(g)))
    for g, own, other in ((gf, "f", "b"), (gb, "b", "f")):
        g = g["params"]
        assert norm(g["softmax"]) > 0 and norm(g["tokens"]) > 0
        assert norm(g[f"lstm_{own}0"]) > 0 and norm(g[f"lstm_{other}0"]) == 0


def test_scalar_mix_on_hand_made_layers():
    """ELMo = gamma sum_j softmax(w)_j h_j: w = log(0.2, 0.3, 0.5), gamma 2; a one-hot-like w
    picks gamma h_j; with layer norm each layer's vectors are standardised first."""
    h = np.arange(3 * 2 * 4, dtype=np.float32).reshape(3, 2, 4) ** 1.5
    w = np.log(np.array([0.2, 0.3, 0.5], np.float32))
    mix = jit0(elmo.scalar_mix, 3)
    np.testing.assert_allclose(mix(h, w, 2.0, False), 2 * (0.2 * h[0] + 0.3 * h[1] + 0.5 * h[2]),
                               rtol=1e-5)
    np.testing.assert_allclose(mix(h, np.array([0.0, 40.0, 0.0]), 3.0, False), 3 * h[1],
                               rtol=1e-5)
    z = (h - h.mean(-1, keepdims=True)) / h.std(-1, keepdims=True)
    np.testing.assert_allclose(mix(h, w, 2.0, True), 2 * (0.2 * z[0] + 0.3 * z[1] + 0.5 * z[2]),
                               rtol=1e-4, atol=1e-5)


CNN = dataclasses.replace(TINY, tokens="word", token_encoder="char_cnn", max_chars=6,
                          char_dim=3, filter_widths=(1, 2), filter_counts=(2, 3), num_highway=1,
                          proj_dim=4, lstm_dim=5, vocab_size=None)


def _cells(enc_params, ids, lstm_params, x):
    enc = elmo.TokenEncoder(CNN, elmo.corpus_data(CNN.corpus, CNN.val_fraction, CNN.tokens,
                                                  CNN.max_chars)[3])
    return enc.apply(enc_params, ids), elmo.LSTMP(CNN).apply(lstm_params, x)


def test_char_cnn_highway_and_lstm_projection_cell_by_hand():
    """The token layer of a word: its spelling [BOW, bytes, EOW, PAD...] -> char embeddings ->
    per width, max over positions of the VALID convolution, then ReLU -> highway
    t relu(W_H y) + (1 - t) y with t = sigmoid(W_T y + b_T), b_T = -2 at init -> projection.
    And the LSTM cell: gates W_x x + W_h r, forget bias +1, c clipped to [-3, 3],
    r = clip(W_proj (o tanh c), +-3), over 4 steps."""
    spell = elmo.corpus_data(CNN.corpus, CNN.val_fraction, CNN.tokens, CNN.max_chars)[3]
    vocab = elmo.corpus_data(CNN.corpus, CNN.val_fraction, CNN.tokens, CNN.max_chars)[2]
    word = vocab.index("def") if "def" in vocab else 3
    np.testing.assert_array_equal(spell[word, :5], [elmo.BOW, *b"def", elmo.EOW][:5])
    ids = np.array([[word, 0, 1]])
    x = np.random.default_rng(0).normal(size=(2, 4, 4)).astype(np.float32) * 3
    enc_params, lstm_params = jit0(lambda k0, k1: (  # one compiled init, not eager flax
        elmo.TokenEncoder(CNN, spell).init(k0, ids), elmo.LSTMP(CNN).init(k1, x)))(
        jax.random.PRNGKey(0), jax.random.PRNGKey(1))
    tok, r = (np.asarray(a) for a in jit0(_cells)(enc_params, ids, lstm_params, x))
    p = jax.tree.map(np.asarray, enc_params["params"])
    np.testing.assert_array_equal(p["high_0_carry"]["bias"], -2.0)
    e = p["char_embed"]["embedding"][spell[ids[0]]]  # (3, 6, 3)
    feats = []
    for w in (1, 2):
        k, bias = p[f"cnn_{w}"]["kernel"], p[f"cnn_{w}"]["bias"]  # (w, 3, n)
        conv = np.stack([np.einsum("twc,wcn->tn", e[:, i:i + w], k) for i in range(6 - w + 1)],
                        1) + bias
        feats.append(np.maximum(conv.max(1), 0))
    y = np.concatenate(feats, -1)
    dense = lambda z, q: z @ q["kernel"] + q["bias"]
    t = 1 / (1 + np.exp(-dense(y, p["high_0_carry"])))
    y = t * np.maximum(dense(y, p["high_0_transform"]), 0) + (1 - t) * y
    np.testing.assert_allclose(tok[0], dense(y, p["proj"]), rtol=1e-4, atol=1e-5)
    q = jax.tree.map(np.asarray, lstm_params["params"])
    sig = lambda z: 1 / (1 + np.exp(-z))
    c, h = np.zeros((2, 5)), np.zeros((2, 4))
    for s in range(4):
        g = dense(x[:, s], q["W_x"]) + h @ q["W_h"]
        i, f, gg, o = np.split(g, 4, -1)
        c = np.clip(sig(f + 1) * c + sig(i) * np.tanh(gg), -3, 3)
        h = np.clip((sig(o) * np.tanh(c)) @ q["W_proj"], -3, 3)
        np.testing.assert_allclose(r[:, s], h, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """TINY through the command line, in-process, once, with SEEDS seeds; with its compiled
    chunks and their inputs (the purity test reruns the first: no second trace or compile).
    Not with --fast-compile: XLA's lowest level compiles this LSTM program faster but runs
    its 350 updates far slower (the module took 237 CPU s with it, about 50 without); the
    jitted evaluate, run once, is compiled at that level."""
    run_dir = tmp_path_factory.mktemp("run")
    real = run.evaluate_seeds
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run, "evaluate_seeds", lambda *a, **k: real(
            *a, **{**k, "compiler_options": run.INIT_COMPILER_OPTIONS}))
        return main_recording_chunks(
            lambda _: tiny_run_module.run_cli(elmo, TINY, run_dir, CHUNK), None)


@pytest.fixture(scope="module")
def tiny_run(recorded_run):
    return recorded_run[0]


def test_bilm_beats_unigram_and_elmo_beats_the_baseline_tagger_short(tiny_run):
    """Short behaviour test, one run of both stages: the biLM's held-out loss in each
    direction is below the unigram entropy of the training text, and the tagger fed
    [x_k; ELMo_k] beats the same tagger on [x_k] alone (trained side by side on the same
    batches) in held-out F1 of the changed tokens. Measured (2-core CPU, loaded): val LM
    fwd 2.65 / 2.52, bwd 2.67 / 2.56 nats vs unigram 3.25; F1 0.124 / 0.227 with ELMo vs
    0.067 / 0.041 baseline (held-out NLL 0.362 / 0.387 vs 0.377 / 0.385: too close to gate).
    The mix that keeps only the token layer h_0 (scalar_mix -> gamma h_0) is NOT caught
    here (tried: F1 0.183 / 0.227 vs 0.067 / 0.041, passes): at this size the biLM's
    pre-trained token layer alone already beats the tagger's own embedding. The slow test
    holds that broken variant and the untrained biLM (written, not yet run)."""
    fin = {k: np.asarray(v) for k, v in tiny_run.final.items()}
    print({k: v.round(3).tolist() for k, v in fin.items()})
    assert (fin["val_lm_fwd"] < fin["unigram_entropy"] - 0.2).all()
    assert (fin["val_lm_bwd"] < fin["unigram_entropy"] - 0.2).all()
    assert (fin["val_f1"] > fin["val_f1_baseline"] + 0.03).all()


def test_train_is_pure_and_seeded_and_logs_the_stages(recorded_run):
    """The run's initial states are the runner's init of the same seeds, and its first
    compiled chunk, rerun on them, gives the run's first rows and the second chunk's input
    bit for bit; seeds differ; the task metrics are NaN exactly during pre-training; the
    layer weights sum to 1 and move only in stage 2. Mutation tried: init ignoring its key
    (the seeds' kernels equal) fails."""
    tiny_run, chunks = recorded_run
    (first_chunk, first_input), n = chunks[0], SEEDS
    assert len(chunks) == TINY.num_updates // CHUNK
    jax.tree.map(np.testing.assert_array_equal, first_input,
                 run.initial_states(elmo.init, TINY, 0, n))
    state, metrics = jax.device_get(first_chunk(first_input))
    jax.tree.map(np.testing.assert_array_equal, state.params, chunks[1][1].params)
    metrics = run.mark_undefined(dict(metrics), elmo.NAN_UNLESS)
    h = tiny_run.history
    for k in h:
        np.testing.assert_array_equal(h[k][:, :CHUNK], metrics[k], err_msg=k)
    kernel = state.params["bilm"]["params"]["softmax"]["kernel"]
    assert not np.array_equal(kernel[0], kernel[1])
    assert not np.array_equal(h["losses/lm"][0], h["losses/lm"][1])
    P = TINY.pretrain_steps
    np.testing.assert_array_equal(h["charts/finetuning"][0], [0] * P + [1] * TINY.finetune_steps)
    assert np.isnan(h["losses/task"][:, :P]).all() and np.isfinite(h["losses/task"][:, P:]).all()
    assert np.isfinite(h["losses/lm"]).all()
    s = np.stack([h[f"charts/s_{j}"] for j in range(TINY.num_layers + 1)])
    np.testing.assert_allclose(s.sum(0), 1, rtol=1e-5)
    assert (s[:, :, :P] == s[:, :, :1]).all() and (s[:, :, -1] != s[:, :, 0]).any()


def test_cli_runs_and_documents_every_field(tiny_run, capsys):
    with pytest.raises(SystemExit):
        elmo.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(elmo.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out
    summary = json.loads((tiny_run.run_dir / "summary.json").read_text())
    for k in ("val_f1", "val_f1_baseline", "val_lm_fwd", "val_lm_bwd"):
        assert len(summary[k]) == SEEDS and np.isfinite(summary[k]).all(), k


def test_bad_values_fail_with_named_field(tmp_path):
    bad = (("--pretrain-lr", "0", "pretrain-lr must be > 0"),
           ("--corrupt-prob", "1.0", "corrupt_prob=1.0"),
           ("--tokens", "bytes", "tokens='bytes'"),
           ("--vocab-size", "10", "vocab_size=10 is below"),
           ("--dropout", "1.0", "dropout=1.0"))
    for flag, value, msg in bad:
        with pytest.raises(ValueError, match=msg):
            elmo.main(["--preset", "quick", flag, value, "--run-dir", str(tmp_path)])


def test_every_config_field_is_read():
    assert unread_fields(elmo) == []


def test_paper_preset_traces():
    """jax.eval_shape of init and one update under the paper preset: words spelled in 261
    characters, char CNN of 2048 filters, 2 highway layers, projection to 512, 2 LSTM layers
    of 4096 cells projected to 512 per direction, a 793,471-row softmax shared by both."""
    cfg, state, after = preset.trace_paper(elmo)
    assert jax.tree.structure(after[0]) == jax.tree.structure(state)
    p = state.params["bilm"]["params"]
    assert p["softmax"]["kernel"].shape == (512, 793471)
    assert p["tokens"]["char_embed"]["embedding"].shape == (261, 16)
    assert sum(p["tokens"][f"cnn_{w}"]["bias"].shape[0] for w in range(1, 8)) == 2048
    assert p["tokens"]["high_1_carry"]["kernel"].shape == (2048, 2048)
    assert p["tokens"]["proj"]["kernel"].shape == (2048, 512)
    for d in "fb":
        for j in range(2):
            q = p[f"lstm_{d}{j}"]
            assert q["W_x"]["kernel"].shape == (512, 4 * 4096)
            assert q["W_h"].shape == (512, 4 * 4096) and q["W_proj"].shape == (4096, 512)
    assert state.params["mix"]["w"].shape == (3,)


# the slow gate's config: TINY with 3x the biLM updates, 2x the labelled set and task updates
SLOW = dataclasses.replace(TINY, pretrain_steps=600, finetune_steps=300, num_labelled=512)


def _token_layer_only(layers, w, gamma, layer_norm):
    return gamma * layers[0]  # the broken mix: ignores every biLSTM layer


@pytest.mark.slow
def test_pretrained_elmo_beats_untrained_and_token_layer_only(tmp_path):
    """[1]'s claim that the biLM's layers help the task (Table 1) and that pre-training is
    what makes them help: ELMo from the pre-trained biLM beats, in held-out F1 of the changed
    tokens, (a) ELMo from the same biLM untrained (--pretrain-steps 0) and (b) the broken mix
    that keeps only the token layer h_0 (scalar_mix patched). Measured: see the print."""
    res = tiny_run_module.run_cli(elmo, SLOW, tmp_path / "elmo", 100)
    untrained = tiny_run_module.run_cli(elmo, dataclasses.replace(SLOW, pretrain_steps=0),
                                        tmp_path / "untrained", 100)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(elmo, "scalar_mix", _token_layer_only)
        broken = tiny_run_module.run_cli(elmo, SLOW, tmp_path / "broken", 100)
    f1 = {n: np.asarray(r.final["val_f1"]) for n, r in
          (("elmo", res), ("untrained", untrained), ("token_layer", broken))}
    print(f1, np.asarray(res.final["val_f1_baseline"]))
    assert (f1["elmo"] > f1["untrained"] + 0.05).all(), f1
    assert (f1["elmo"] > f1["token_layer"] + 0.05).all(), f1
