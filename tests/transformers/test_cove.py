"""Tests of transformers/cove.py: the number phrases against num2words; the attention
weights, h~_t and the decoder step by hand (numpy) through the functions update runs, and
teacher forcing equal to a step-by-step loop of decoder_step; the biLSTM's concatenation
order [->h; <-h] (each half conditions only on its own side); pads masked (a padded phrase
encodes as the phrase alone, attention weight 0 on pads, CoVe 0 there); one tiny CLI run (2
seeds) reused by the behaviour, purity and CLI tests; the paper preset traced; every Config
field read."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import parallel, run
from tests.common import preset
from tests.common.config_fields import unread_fields
from tests.transformers import tiny_run as tiny_run_module
from tests.transformers.tiny_run import jit0
from transformers import cove

# one tiny config for every test: 16-d GloVe stand-in, 16 per encoder direction, decoder 32;
# 300 translation updates of 32 pairs, then 150 task updates of 32 labelled phrases. SGD lr
# 0.25: the loss sums ~8 target tokens per sentence (train.py); at lr 1.0 these 300 updates
# gave CoVe no gain (cove 0.668 / 0.691 vs glove 0.688 / 0.684, measured).
TINY = cove.Config(glove_dim=16, hidden_size=32, tgt_embed_dim=16, dropout=0.0, num_pairs=4000,
                   batch_size=32, mt_steps=300, mt_lr=0.25, num_labelled=256, task_batch=32,
                   task_steps=150, task_hidden=32, num_eval=256)
CHUNK = 50  # TINY.num_updates = 450: nine chunks of one program
SEEDS = tiny_run_module.SEEDS
# hand-checked sizes: glove 5, 2 per direction, decoder 4, target embeddings 3
SMALL = dataclasses.replace(TINY, glove_dim=5, hidden_size=4, tgt_embed_dim=3, init_scale=0.5)


def test_phrases_are_num2words_and_morphemes_round_trip():
    """spell(n) is num2words's English and German for every sampled n (composed from the
    spellings of 0..999); the German morphemes join back to the German word; encode puts
    BOS, the morphemes, EOS and pads. Mutation tried: "eins" in place of "ein" before
    "tausend" for n = 1xxx fails (num2words: eintausend)."""
    from num2words import num2words

    ns = np.concatenate([cove.numbers(200, 7), [0, 1, 1000, 1001, 101000, 999999, 345672]])
    src, tgt = cove.encode(ns)
    en, de = cove.vocabs()
    for i, n in enumerate(ns):
        e, d = cove.spell(n)
        assert (e, d) == (num2words(int(n)), num2words(int(n), lang="de")), n
        assert "".join(cove.de_tokens(d)) == d
        assert [en[j] for j in src[i] if j] == cove.en_tokens(e), n
        assert [de[j] for j in tgt[i] if j] == ["<s>", *cove.de_tokens(d), "</s>"], n
    src, tgt = cove.encode([345672])
    assert [en[i] for i in src[0] if i] == cove.en_tokens(num2words(345672))
    assert [de[i] for i in tgt[0] if i] == ["<s>", "drei", "hundert", "fünf", "und", "vierzig",
                                             "tausend", "sechs", "hundert", "zwei", "und",
                                             "siebzig", "</s>"]


def test_held_out_numbers_are_unseen_in_training():
    """The held-out numbers are none of the translation pairs' nor the labelled phrases'
    (redrawn). Mutation tried: no redraw (the plain draw of seed + 2) fails (about half of
    TINY's held-out numbers were among the pairs)."""
    pair_n, lab_n, ev_n = cove.split_numbers(TINY)
    assert len(ev_n) == TINY.num_eval and len(set(ev_n.tolist())) > TINY.num_eval // 2
    assert not set(ev_n.tolist()) & (set(pair_n.tolist()) | set(lab_n.tolist()))
    src, _, _, _, ev_src, _, ev_y, _ = cove.device_data(TINY)
    np.testing.assert_array_equal(ev_src, cove.encode(ev_n)[0])
    np.testing.assert_array_equal(ev_y, ev_n % 2)


def _nll_and_pools(logits, targets, p, v):
    """masked_nll, and per pooling (the other blocks of W_c zeroed) task_logits of the first
    2 words of v padded to 4 and to 12."""
    k = p["W_c"].shape[0] // 4
    out = []
    for pool in range(4):
        q = dict(p, W_c=p["W_c"] * (jnp.arange(4 * k) // k == pool)[:, None])
        out.append([cove.task_logits(q, v[:, :T], jnp.arange(T)[None] < 2) for T in (4, 12)])
    return cove.masked_nll(logits, targets), out


def test_masked_nll_sums_tokens_per_sentence_and_task_pooling_ignores_pads():
    """masked_nll = (sum of -log p over the real target tokens) / number of sentences, as the
    released train.py (NLLLoss(size_average=False), div(batch_size)); PAD targets weigh 0.
    task_logits of a phrase padded to 4 equals it padded to 12 (junk at the pads): max, min,
    mean and self-attentive pooling skip the pads. Mutations tried: per-token mean fails;
    no PAD weight fails; each pooling unmasked fails."""
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(2, 3, 6)).astype(np.float32)
    targets = np.array([[3, 4, 2], [5, 2, 0]], np.int32)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    tok = [-logp[b, t, targets[b, t]] for b in range(2) for t in range(3) if targets[b, t]]
    p = cove.init_task(jax.random.PRNGKey(0), 5, TINY)
    v = rng.normal(size=(1, 12, 5)).astype(np.float32)
    (loss, (tok_nll, _)), pooled = jit0(_nll_and_pools)(logits, targets, p, v)
    np.testing.assert_allclose(loss, sum(tok) / 2, rtol=1e-5)
    np.testing.assert_allclose(tok_nll, np.mean(tok), rtol=1e-5)
    for pool, (a, b) in enumerate(pooled):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=str(pool))


def _np_cell(p, x, h, c):
    sig = lambda z: 1 / (1 + np.exp(-z))
    i, f, g, o = np.split(x @ p["w_ih"] + h @ p["w_hh"] + p["b"], 4, -1)
    c = sig(f) * c + sig(i) * np.tanh(g)
    return sig(o) * np.tanh(c), c


def _step_and_forced(p, glove, src, tgt_in, cfg):
    """One decoder_step from a hand-made carry, and teacher forcing against a loop of it."""
    H = jnp.asarray(
        np.random.default_rng(3).normal(size=(2, src.shape[1], cfg.hidden_size)), jnp.float32
    )
    carry = tuple(
        jnp.asarray(np.random.default_rng(4).normal(size=s), jnp.float32)
        for s in ((cfg.num_layers, 2, 4), (cfg.num_layers, 2, 4), (2, 4))
    )
    key, off = jax.random.PRNGKey(0), jnp.asarray(False)
    one = cove.decoder_step(p, carry, tgt_in[:, 0], H, src > 0, key, off, cfg)
    forced, alpha = cove.translate_logits(p, glove, src, tgt_in, key, off, cfg)
    H0, finals = cove.mt_lstm(p["enc"], glove[src], src > 0, key, off, cfg)
    c = (
        jnp.stack([f[0] for f in finals]),
        jnp.stack([f[1] for f in finals]),
        jnp.zeros((2, cfg.hidden_size)),
    )
    loop = []
    for t in range(tgt_in.shape[1]):
        c, (lg, _) = cove.decoder_step(p, c, tgt_in[:, t], H0, src > 0, key, off, cfg)
        loop.append(lg)
    return H, carry, one, forced, alpha, jnp.stack(loop, 1)


def test_attention_and_decoder_step_by_hand_and_teacher_forcing_is_the_step_loop():
    """decoder_step (what update scans) against numpy: s_t = 2 LSTM layers on [z_{t-1};
    h~_{t-1}]; a_t = softmax(H (W_1 s_t + b_1)) with weight exactly 0 on the pads and sum
    1; h~_t = tanh(W_2 [H^T a_t; s_t] + b_2); logits W_out h~_t + b_out. translate_logits
    (teacher forcing) equals a Python loop of decoder_step started from the encoder's final
    states. Mutations tried: attention unmasked (pads get weight) fails; [s_t; H^T a_t]
    (order swapped) fails; no input feeding (h~_{t-1} zeroed) fails."""
    p = jit0(cove.init_mt, 1)(jax.random.PRNGKey(0), SMALL)
    glove = np.random.default_rng(1).normal(0, 0.4, (len(cove.vocabs()[0]), 5)).astype(np.float32)
    src = np.array([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]], np.int32)
    tgt_in = np.array([[1, 4, 5, 6], [1, 7, 8, 0]], np.int32)
    H, carry, one, forced, alpha, loop = jit0(_step_and_forced, 4)(p, glove, src, tgt_in, SMALL)
    q = jax.tree.map(np.asarray, p)
    H, (hs, cs, ht) = np.asarray(H), jax.tree.map(np.asarray, carry)
    (new_h, new_c, h_tilde), (logits, a) = jax.tree.map(np.asarray, one)
    x = np.concatenate([q["embed"][tgt_in[:, 0]], ht], -1)  # input feeding
    for l in range(2):
        h, c = _np_cell(q["dec"][l], x, hs[l], cs[l])
        np.testing.assert_allclose(new_h[l], h, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new_c[l], c, rtol=1e-5, atol=1e-6)
        x = h
    scores = np.einsum("btd,bd->bt", H, x @ q["W_1"] + q["b_1"])
    scores[0, 3:] = -np.inf
    want_a = np.exp(scores - scores.max(-1, keepdims=True))
    want_a /= want_a.sum(-1, keepdims=True)
    np.testing.assert_allclose(a, want_a, rtol=1e-5, atol=1e-7)
    assert (a[0, 3:] == 0).all()
    np.testing.assert_allclose(a.sum(-1), 1, rtol=1e-6)
    want_h = np.tanh(
        np.concatenate([np.einsum("bt,btd->bd", want_a, H), x], -1) @ q["W_2"] + q["b_2"]
    )
    np.testing.assert_allclose(h_tilde, want_h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits, want_h @ q["W_out"] + q["b_out"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(forced, loop, rtol=1e-6, atol=1e-6)
    assert (np.asarray(alpha)[0, :, 3:] == 0).all()


def _greedy_and_forced(p, glove, src, cfg):
    ys = cove.greedy_translate(p, glove, src, cfg)
    tgt_in = jnp.concatenate([jnp.full((src.shape[0], 1), cove.BOS), ys[:, :-1]], 1)
    off = jnp.asarray(False)
    return ys, cove.translate_logits(p, glove, src, tgt_in, jax.random.PRNGKey(0), off, cfg)[0]


def test_greedy_translate_feeds_back_its_argmax():
    """greedy_translate's tokens are the argmax of teacher forcing on [BOS, its own tokens
    shifted]: the previous argmax is fed back at each step. Mutation tried: y kept at BOS
    (never fed back) fails. (Parameters scaled by 8, so the tokens vary.)"""
    p = jax.tree.map(lambda a: 8 * a, jit0(cove.init_mt, 1)(jax.random.PRNGKey(1), SMALL))
    glove = np.random.default_rng(1).normal(0, 0.4, (len(cove.vocabs()[0]), 5)).astype(np.float32)
    src = np.array([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]], np.int32)
    ys, forced = jit0(_greedy_and_forced, 3)(p, glove, src, SMALL)
    assert len(set(np.asarray(ys).ravel().tolist())) > 1
    np.testing.assert_array_equal(np.asarray(forced).argmax(-1), ys)


def _encode(enc, x, mask, cfg):
    return cove.mt_lstm(enc, x, mask, jax.random.PRNGKey(0), jnp.asarray(False), cfg)


def test_bilstm_concatenates_forward_then_backward_and_masks_pads():
    """One biLSTM layer: changing word t leaves the first half (->h) at positions < t and
    the second half (<-h) at positions > t bit-identical, and changes both at t: h_t =
    [->h_t; <-h_t]; the first half equals lstm_scan forward, the second lstm_scan reversed.
    The two-layer MT-LSTM on a phrase padded to SRC_LEN equals it on the phrase alone
    (the backward direction starts at the last word, not at a pad), with H = 0 and the
    final states unchanged at pads; CoVe is 0 at pads; the final state handed to the decoder
    is [->h at the last word; <-h at the first]. Mutations tried: [<-h; ->h] fails; no mask
    in lstm_scan fails the padded == alone check; finals [hb; hf] fails."""
    p = jit0(cove.init_mt, 1)(jax.random.PRNGKey(0), SMALL)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 6, 5)).astype(np.float32)
    x2 = x.copy()
    x2[:, 3] += 1.0
    ones = np.ones((2, 6), bool)
    H1, f1 = jit0(_encode, 3)(p["enc"][:1], np.concatenate([x, x2]), ones, SMALL)
    H1 = np.asarray(H1)
    np.testing.assert_array_equal(H1[0, :3, :2], H1[1, :3, :2])
    np.testing.assert_array_equal(H1[0, 4:, 2:], H1[1, 4:, 2:])
    assert np.abs(H1[0, 3] - H1[1, 3]).min() > 0
    fw, _ = cove.lstm_scan(p["enc"][0]["fwd"], x, ones[:1], False, jnp.float32)
    bw, _ = cove.lstm_scan(p["enc"][0]["bwd"], x, ones[:1], True, jnp.float32)
    np.testing.assert_allclose(H1[:1], np.concatenate([fw, bw], -1), rtol=1e-6, atol=1e-7)
    h_final = np.asarray(f1[0][0])[:1]  # the decoder's initial h: [->h_last; <-h_first]
    np.testing.assert_allclose(h_final[:, :2], fw[:, -1], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(h_final[:, 2:], bw[:, 0], rtol=1e-6, atol=1e-7)
    # padding: the phrase of 4 words alone vs padded to 7
    xp = np.concatenate([x[:, :4], rng.normal(size=(1, 3, 5)).astype(np.float32)], 1)
    mask = np.array([[1, 1, 1, 1, 0, 0, 0]], bool)
    Hp, fp = jit0(_encode, 3)(p["enc"], xp, mask, SMALL)
    Ha, fa = jit0(_encode, 3)(p["enc"], x[:, :4], mask[:, :4], SMALL)
    np.testing.assert_allclose(np.asarray(Hp)[:, :4], Ha, rtol=1e-6, atol=1e-7)
    assert (np.asarray(Hp)[:, 4:] == 0).all()
    np.testing.assert_allclose(np.asarray(fp), np.asarray(fa), rtol=1e-6, atol=1e-7)
    glove = rng.normal(size=(len(cove.vocabs()[0]), 5)).astype(np.float32)
    c = jit0(cove.cove, 3)(p["enc"], glove, np.array([[5, 6, 0, 0]]), SMALL)
    assert (np.asarray(c)[0, 2:] == 0).all() and np.abs(np.asarray(c)[0, :2]).min() > 0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """TINY through the command line, in-process, once, with SEEDS seeds."""
    with tiny_run_module.lowest_level_compiles():
        return tiny_run_module.run_cli(cove, TINY, tmp_path_factory.mktemp("run"), CHUNK)


def test_cove_beats_glove_alone_on_parity_short(tiny_run):
    """CoVe's transfer in small (not [1] Table 2's comparison: the glove arm here is a bag of
    vectors with no context): after 300 translation updates, the task model on [GloVe; CoVe]
    beats the same task model on GloVe alone (trained side by side on the same batches) in
    held-out parity accuracy. A bag of word vectors cannot tell which unit word is last.
    Measured (loaded 2-core CPU; held-out numbers unseen in training): cove 0.848 / 0.863,
    glove 0.688 / 0.684, random_cove (CoVe from the untrained MT-LSTM, same task model)
    0.652 / 0.676; translation token accuracy 0.236 / 0.173 (the most frequent token's
    share: 0.140). Mutation tried (before the loss and held-out fixes): the cove arm fed
    CoVe from the untrained MT-LSTM (the broken variant: no translation pre-training)
    scores 0.723 / 0.746 and fails the gate; so it is the translation training, not the
    extra inputs, that helps.
    """
    fin = {k: np.asarray(v) for k, v in tiny_run.final.items()}
    print({k: v.round(3).tolist() for k, v in fin.items()})
    assert (fin["val_acc_cove"] > fin["val_acc_glove"] + 0.05).all()
    assert (fin["val_acc_cove"] > fin["val_acc_random_cove"] + 0.05).all()  # untrained CoVe
    _, _, _, _, _, ev_tgt, _, _ = cove.device_data(TINY)
    counts = np.bincount(ev_tgt[:, 1:][ev_tgt[:, 1:] > 0])  # the most frequent token's share
    assert (fin["val_token_acc"] > counts.max() / counts.sum()).all()  # (0.140) MT learned


def test_train_is_pure_and_seeded_and_logs_the_stages(tiny_run):
    """The runner's first chunk, rerun on the same initial states, gives the run's first
    rows bit for bit; the seeds differ; the stages switch at mt_steps (the translation
    metrics defined before, the task ones after); the translation loss falls; each stage is
    frozen during the other (the rerun's chunk, all stage 1, leaves the task models and the
    Adam count as initialised; the MT parameter norm is constant in stage 2). Mutations
    tried: no freezing of the MT model in stage 2 fails; of the task models in stage 1
    fails."""
    with tiny_run_module.lowest_level_compiles():
        step = run.make_chunk(cove.update, TINY, CHUNK, parallel.seed_sharding(SEEDS), SEEDS)
        init = tiny_run_module.initial_states(cove, TINY)
        task0 = jax.device_get(init.params["task"])
        state, metrics = jax.device_get(step(init))
    metrics = run.mark_undefined(dict(metrics), cove.NAN_UNLESS)
    h, P = tiny_run.history, TINY.mt_steps
    for k in h:
        np.testing.assert_array_equal(h[k][:, :CHUNK], metrics[k], err_msg=k)
    emb = state.params["mt"]["embed"]
    assert emb.shape[0] == SEEDS and not np.array_equal(emb[0], emb[1])
    assert not np.array_equal(h["losses/mt"][0], h["losses/mt"][1])
    np.testing.assert_array_equal(h["charts/task_stage"][0], [0] * P + [1] * TINY.task_steps)
    assert np.isnan(h["losses/task_cove"][:, :P]).all()
    assert np.isfinite(h["losses/task_cove"][:, P:]).all()
    assert np.isnan(h["losses/mt"][:, P:]).all() and np.isfinite(h["losses/mt"][:, :P]).all()
    assert (h["losses/mt"][:, P - 10 : P].mean(1) < h["losses/mt"][:, :10].mean(1) - 0.5).all()
    # stage 1 leaves the task models and their Adam state as initialised ...
    for a, b in zip(jax.tree.leaves(state.params["task"]), jax.tree.leaves(task0), strict=True):
        np.testing.assert_array_equal(a, b)
    counts = [c for c in jax.tree.leaves(state.opt_task) if np.asarray(c).dtype == np.int32]
    assert counts and all((np.asarray(c) == 0).all() for c in counts)
    # ... and stage 2 leaves the translation model as it was
    norm = h["charts/mt_param_norm"]
    assert (norm[:, P:] == norm[:, P:P + 1]).all() and (np.diff(norm[:, :P]) != 0).all()


def test_cli_runs_and_documents_every_field(tiny_run, capsys):
    with pytest.raises(SystemExit):
        cove.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(cove.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out
    summary = json.loads((tiny_run.run_dir / "summary.json").read_text())
    for k in ("val_exact_match", *[f"val_acc_{a}" for a in cove.ARMS]):
        assert len(summary[k]) == SEEDS and np.isfinite(summary[k]).all(), k


def test_bad_values_fail_with_named_field(tmp_path):
    bad = (
        ("--mt-lr", "0", "mt-lr must be > 0"),
        ("--task", "sign", "task='sign'"),
        ("--hidden-size", "33", "hidden_size=33 must be even"),
        ("--dropout", "1.0", "dropout=1.0"),
        ("--dtype", "float16", "dtype='float16'"),
    )
    for flag, value, msg in bad:
        with pytest.raises(ValueError, match=msg):
            cove.main(["--preset", "quick", flag, value, "--run-dir", str(tmp_path)])


def test_every_config_field_is_read():
    assert unread_fields(cove) == []


def test_paper_preset_traces():
    """jax.eval_shape of init and one update under the paper preset: 300-d word vectors,
    2 biLSTM layers of 300 per direction, a 2-layer decoder of 600 with input feeding
    (300 + 600 inputs), the attention's W_1 (600, 600) and W_2 (1200, 600)."""
    cfg, state, after = preset.trace_paper(cove)
    assert jax.tree.structure(after[0]) == jax.tree.structure(state)
    p = state.params["mt"]
    assert p["enc"][0]["fwd"]["w_ih"].shape == (300, 1200)
    assert p["enc"][1]["bwd"]["w_ih"].shape == (600, 1200)
    assert p["dec"][0]["w_ih"].shape == (900, 2400)
    assert p["W_1"].shape == (600, 600) and p["W_2"].shape == (1200, 600)
    assert state.params["task"]["cove"]["W_f"].shape == (900, 300)
    assert state.params["task"]["glove"]["W_f"].shape == (300, 300)
