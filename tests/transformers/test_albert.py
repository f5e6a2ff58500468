"""Tests of transformers/albert.py: the parameter counts of the factorised and shared models
against the paper's formula (and [1]'s Tables 1, 3, 4), the n-gram length distribution and
the n-gram masking, the SOP and NSP instances, LAMB's first step and the schedule; one tiny
CLI run of two seeds (seed 0 trained with SOP, seed 1 its NSP twin) reused by the behaviour
(the n-gram MLM beats the unigram guess), purity and CLI tests; a slow gate (pytest -m slow):
half of [1] Table 5, the NSP-trained model solves NSP by topic and is at chance on SOP."""

import dataclasses
import json
import math
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import parallel, run
from tests.common import preset
from tests.common.config_fields import unread_fields
from tests.common.hlo import big_constants
from tests.transformers import tiny_run as tiny_run_module
from tests.transformers.tiny_run import jit0
from transformers import albert

# one tiny config for every test: the synthetic "ordered" documents (topic letter, counting
# sentences), 1 layer of H 32, E 16, context 24, 300 LAMB updates of 16, in chunks of CHUNK
TINY = albert.Config(
    corpus="ordered",
    vocab_size=None,
    seq_len=24,
    max_positions=24,
    embedding_size=16,
    d_model=32,
    num_layers=1,
    num_heads=2,
    d_ff=32,
    max_predictions_per_seq=4,
    dupe_factor=1,
    batch_size=16,
    train_steps=300,
    lr=2e-2,
    warmup_steps=10,
    eval_instances=128,
    finetune_steps=0,
    num_labelled=64,
    num_eval=64,
)
CHUNK = 50
KEYS = jax.random.split(jax.random.PRNGKey(0), 2)  # the runner's keys (--seed 0)
_INIT = albert.init  # the file's own (the fixture patches albert.init)


def _count(cfg):
    params = jax.eval_shape(lambda k: albert.init_params(k, cfg), jax.random.PRNGKey(0))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params)), params["params"]


def _formula(cfg, rows):
    """[1] Sec. 3.1 by hand: embeddings V E + P E + 2 E (+ LN 2E), the E x H projection
    E H + H, one attention block 4 (H^2 + H) + 2H, one FFN 2 H F + F + H + 2H, each counted
    once when shared and L times when not; pooler H^2 + H; MLM head H E + E + 2E + V; the
    2-way sentence head and the 2-way fine-tuning classifier, 2H + 2 each."""
    V, E, H, F, L, P = (
        rows,
        cfg.embedding_size,
        cfg.d_model,
        cfg.d_ff,
        cfg.num_layers,
        cfg.max_positions,
    )
    one_attn, one_ffn = albert.SHARE[cfg.share]
    attn, ffn = 4 * (H * H + H) + 2 * H, 2 * H * F + F + H + 2 * H
    return (
        V * E
        + P * E
        + 2 * E
        + 2 * E
        + E * H
        + H
        + (1 if one_attn else L) * attn
        + (1 if one_ffn else L) * ffn
        + H * H
        + H
        + H * E
        + E
        + 2 * E
        + V
        + 2 * (2 * H + 2)
    )


def test_parameter_counts_factorised_and_shared():
    """The counts of init equal the formula for every sharing mode; with share=all the count
    does not grow with depth; the factorised model saves (V + P + 7 + 2H)(H - E) against the
    same model at E = H (V x E + E x H instead of V x H, [1] Sec. 3.1). One (V, E) table (the
    MLM output is tied to it). ALBERT-base: all-shared 11.8M, shared-attention 63.8M,
    shared-FFN 37.8M, not-shared 89.8M: [1] Tables 3/4 give 12M, 64M, 38M, 89M (each within
    1M of ours; 89.8M is not 89M by rounding). E = H = 768
    not-shared: 110.3M ([1] Table 3: 108M; ours keeps the 768 x 768 projection); xxlarge
    223.2M ([1] Table 1 says 235M, which the released sizes do not give)."""
    rows = albert.specials(TINY)["rows"]
    for share, L in (("all", 2), ("all", 5), ("attention", 3), ("ffn", 3), ("none", 2)):
        cfg = dataclasses.replace(TINY, share=share, num_layers=L)
        assert _count(cfg)[0] == _formula(cfg, rows), (share, L)
    n, p = _count(TINY)
    assert _count(dataclasses.replace(TINY, num_layers=5))[0] == n
    tables = sorted(a.shape for a in jax.tree.leaves(p) if a.shape[0] == rows)
    assert tables == [(rows,), (rows, TINY.embedding_size)]
    assert p["embedding_hidden_mapping_in"]["kernel"].shape == (16, 32)
    V, E, H, P = rows, TINY.embedding_size, TINY.d_model, TINY.max_positions
    wide = _formula(dataclasses.replace(TINY, embedding_size=H), rows)
    assert wide - n == (V + P + 7 + 2 * H) * (H - E)
    base = albert.Config()  # ALBERT-base; the formula checked against init once at this size
    assert _count(base)[0] == _formula(base, 30000)
    millions = {s: _formula(dataclasses.replace(base, share=s), 30000) / 1e6 for s in albert.SHARE}
    bert_like = _formula(dataclasses.replace(base, share="none", embedding_size=768), 30000)
    xxl = _formula(albert.Config(**albert.PRESETS["xxlarge"]), 30000)
    print(millions, bert_like, xxl)
    paper = {"all": 12, "attention": 64, "ffn": 38, "none": 89}  # [1] Tables 3/4, millions
    assert all(abs(millions[s] - paper[s]) < 1 for s in paper), millions
    assert 110e6 < bert_like < 111e6 and 223e6 < xxl < 224e6


def test_ngram_lengths_follow_one_over_n():
    """[1] Sec. 4.1: p(n) = (1/n) / sum_{m <= 3} 1/m = 6/11, 3/11, 2/11 (+-0.01 over 40,000
    draws); near the end the draw is cut as the released create_masked_lm_predictions
    slices cand_indexes[idx:idx + n]: with 2 candidates left 6/11, 5/11 (not renormalised
    to 2/3, 1/3); with 1 left always 1."""
    keys = jax.random.split(jax.random.PRNGKey(1), 40_000)
    draw = jit0(lambda k, a: jax.vmap(lambda k: albert.ngram_length(k, a, 3))(k))
    for avail, want in ((7, [6 / 11, 3 / 11, 2 / 11]), (2, [6 / 11, 5 / 11, 0]), (1, [1, 0, 0])):
        n = np.asarray(draw(keys, avail))
        np.testing.assert_allclose(np.bincount(n, minlength=4)[1:] / n.size, want, atol=0.01)


def test_ngram_masking():
    """mask_tokens (as update calls it) on 2048 rows of 24 tokens, k = min(4, round(0.15 n)):
    never [CLS], [SEP] or [PAD]; at most k tokens predicted (k in 99% of rows); the masked
    n-grams are runs of consecutive candidates whose lengths sum to the predicted count, and
    a third or more of the predicted tokens sit in 2- and 3-grams (1/n sampling; the n = 1
    masking of BERT gives only adjacent singles by chance); each row's covered candidates
    form at most as many runs (of consecutive candidates) as it has accepted n-grams;
    80/10/10 [MASK]/random/same."""
    s = albert.specials(TINY)
    x = albert.instances(TINY, "train", "sop")[0][:2048]
    inputs, pos, labels, w, spans = (
        np.asarray(a)
        for a in jit0(lambda k, t: albert.mask_tokens(k, t, TINY))(jax.random.PRNGKey(0), x)
    )
    n_tok = (x != s["pad"]).sum(1)
    k = np.minimum(TINY.max_predictions_per_seq, np.maximum(1, np.round(0.15 * n_tok)))
    assert (w.sum(1) <= k).all() and (w.sum(1) == k).mean() > 0.99
    np.testing.assert_array_equal((spans * np.arange(1, 4)).sum(1), w.sum(1))
    rows = np.repeat(np.arange(len(x))[:, None], pos.shape[1], 1)
    chosen = np.zeros(x.shape, bool)
    chosen[rows[w > 0], pos[w > 0]] = True
    assert chosen.sum() == w.sum()
    assert not (chosen & np.isin(x, [s["cls"], s["sep"], s["pad"]])).any()
    np.testing.assert_array_equal(labels[w > 0], x[rows[w > 0], pos[w > 0]])
    np.testing.assert_array_equal(inputs[~chosen], x[~chosen])
    cand = ~np.isin(x, [s["cls"], s["sep"], s["pad"]])
    runs = np.array(
        [
            (np.diff(np.r_[0, c[m].astype(int)]) == 1).sum()
            for c, m in zip(chosen, cand, strict=True)
        ]
    )
    assert (runs <= spans.sum(1)).all(), (runs, spans.sum(1))
    in_long = (spans[:, 1:] * np.arange(2, 4)).sum() / w.sum()
    print("spans", spans.sum(0) / spans.sum(), "tokens in 2/3-grams", in_long)
    assert in_long > 0.33, in_long
    got, t = inputs[chosen], x[chosen]
    np.testing.assert_allclose((got == s["mask"]).mean(), 0.8, atol=0.02)
    np.testing.assert_allclose(((got != t) & (got != s["mask"])).mean(), 0.1, atol=0.02)


def test_sop_and_nsp_instances():
    """4 hand-made documents (sentence j of document d is 3 tokens d*8 + j): SOP label 0:
    A then B, consecutive sentences of one document; label 1: the same two swapped (B's
    sentences come before A's); never another document. NSP label 1: B from another
    document. About half are negatives."""
    s = albert.specials(TINY)
    docs = [[np.full(3, d * 8 + j, np.int32) for j in range(8)] for d in range(4)]
    assert albert.specials(TINY)["chars"] > 32  # the ids are characters, not specials
    for task in ("sop", "nsp"):
        x, y = albert.make_instances(docs, TINY, random.Random(0), 20, task)
        assert len(x) > 80 and 0.35 < y.mean() < 0.7, (task, y.mean())
        for row, label in zip(x, y, strict=True):
            seps = np.flatnonzero(row == s["sep"])
            a, b = row[1 : seps[0]], row[seps[0] + 1 : seps[1]]
            same_doc = len(set(a // 8) | set(b // 8)) == 1
            if label == 0:
                assert same_doc and a.max() < b.min(), (task, a, b)
            elif task == "sop":
                assert same_doc and a.min() > b.max(), (a, b)
            else:
                assert set(a // 8).isdisjoint(set(b // 8)), (a, b)
    a, b = list(range(5)), list(range(10, 13))
    albert.truncate_seq_pair(a, b, 6, random.Random(1))
    assert len(a) == 3 and len(b) == 3


def test_forward_pass_ignores_padding_and_sees_both_sides(tiny_run):
    """The network as update applies it, with the tiny run's trained parameters (seed 0),
    on held-out rows of TINY: the MLM logits at the predicted positions and the sentence
    logits are the same (1e-4) when the padded tail is cut off ([PAD] keys masked, -10000
    in modeling.py; measured: equal bit for bit), and a token change moves the predictions
    on both sides of it (bidirectional: no causal mask; measured: by 0.009 and 0.010 or more
    in every row, the gate 1e-3)."""
    s = albert.specials(TINY)
    x = albert.instances(TINY, "val", "sop")[0]
    n_real = (x != s["pad"]).sum(1)
    x = x[n_real <= 16][:64]
    assert len(x) >= 16
    params = jax.tree.map(lambda a: a[0], jax.device_get(tiny_run.state.params))
    model = albert.model_of(TINY)
    pos = np.tile(np.arange(1, 5), (len(x), 1))
    fwd = jit0(lambda p, t, q: model.apply(p, t, albert.token_types(t, s["sep"], s["pad"]), q))
    full, cut = fwd(params, x, pos), fwd(params, x[:, :16], pos)
    for a, b in zip(full, cut, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
    y = x.copy()
    y[:, 2] = (y[:, 2] + 1) % s["chars"]  # change token 2 of every row
    moved = np.abs(np.asarray(fwd(params, y, pos)[0] - full[0])).max(-1)  # (rows, 4 positions)
    print("moved", moved.min(0))
    assert (moved[:, [0, 2]] > 1e-3).all(), moved  # positions 1 and 3: before and after


def test_mlm_loss_by_hand():
    """L_MLM = sum_j w_j (-log softmax(z_j)[x_j]) / (sum_j w_j + 1e-5) on 3 positions of
    vocab 3 (the third unweighted), by hand in float64; the two halves of a batch, each
    divided by the whole batch's weight, add up to it (update's micro-batches); no
    prediction gives 0, not NaN."""
    z = np.array([[[2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [9.0, -9.0, 0.0]]], np.float32)
    lab, w = np.array([[0, 1, 1]]), np.array([[1.0, 1.0, 0.0]], np.float32)
    lse = np.log(np.exp(z[0].astype(np.float64)).sum(-1))
    want = ((lse[0] - 2.0) + (lse[1] - 0.5)) / (2 + 1e-5)
    loss = jit0(albert.mlm_loss)
    np.testing.assert_allclose(float(loss(z, lab, w)), want, rtol=1e-6)
    halves = [
        jit0(albert.mlm_loss)(z[:, i:j], lab[:, i:j], w[:, i:j], np.float32(2.0))
        for i, j in ((0, 1), (1, 3))
    ]
    np.testing.assert_allclose(float(sum(halves)), want, rtol=1e-6)
    assert float(loss(z, lab, 0 * w)) == 0.0


def test_lamb_first_step_and_schedule():
    """One optimizer(cfg) step from fresh state with no warm-up: gradients clipped to global
    norm 1; Adam's bias-corrected first step u = g / (|g| + eps), plus wd p on a kernel
    (not on a LayerNorm scale); p <- p - lr ||p|| / ||u|| u per parameter (the trust ratio).
    The schedule: lr t / W, then lr (1 - t / T)."""
    cfg = dataclasses.replace(TINY, warmup_steps=0)
    p = {
        "w": {"kernel": np.array([[2.0, -1.0]], np.float32)},
        "LayerNorm": {"scale": np.array([1.0, 1.0, 2.0], np.float32)},
    }
    g = {
        "w": {"kernel": np.array([[3.0, 0.0]], np.float32)},
        "LayerNorm": {"scale": np.array([4.0, 0.0, 0.0], np.float32)},
    }  # |g| = 5
    opt = albert.optimizer(cfg)
    step = jit0(lambda p, g: opt.update(g, opt.init(p), p)[0])
    upd = jax.tree.map(np.asarray, step(p, g))
    eps, lr = 1e-6, cfg.lr
    for name, wd in (("w", 0.01), ("LayerNorm", 0.0)):
        par, gr = next(iter(p[name].values())), next(iter(g[name].values())) / 5
        u = gr / (np.abs(gr) + eps) + wd * par
        want = -lr * np.linalg.norm(par) / np.linalg.norm(u) * u
        np.testing.assert_allclose(next(iter(upd[name].values())), want, rtol=1e-5, atol=1e-9)
    cfg = dataclasses.replace(TINY, lr=1.0, warmup_steps=10, train_steps=100, finetune_lr=2.0,
                              finetune_warmup_steps=4, finetune_steps=20)
    lr = jit0(albert.learning_rate, (1, 2))
    t = np.array([0, 5, 9, 10, 50, 99])
    np.testing.assert_allclose(lr(t, cfg, False), [0, 0.5, 0.9, 0.9, 0.5, 0.01], rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(lr(np.array([0, 2, 4, 10, 19]), cfg, True),
                               [0, 1, 1.6, 1, 0.1], rtol=1e-5, atol=1e-7)


def test_finetuning_switch_keeps_or_resets_the_encoder():
    """Two pre-training updates, then three of fine-tuning, through update itself (one
    compiled program for the pre-trained run and its scratch twin, scratch a traced flag).
    The first fine-tuning update has lr 0 (warm-up), so its result is the switch itself:
    the pre-trained twin keeps every parameter but the classifier, which is back at its
    init; the scratch twin is back at init everywhere. While pre-training AdamW's state is
    untouched; while fine-tuning LAMB's is frozen, the loss is the classifier's
    cross-entropy alone (the MLM and sentence heads' biases, undecayed, do not move) and
    the classifier learns. Mutations: no classifier reset, no scratch reset, LAMB stepping
    on, the MLM loss left in: each fails an assert here."""
    cfg = dataclasses.replace(TINY, train_steps=2, finetune_steps=3, finetune_warmup_steps=1,
                              finetune_lr=1e-2, finetune_batch=8, micro_batches=2)
    step = jit0(albert.update, 1)
    s0 = _INIT(KEYS[0], cfg)
    init_p = jax.device_get(s0.params)["params"]
    for scratch in (0, 1):
        states, logs = [s0.replace(scratch=jnp.asarray(scratch, jnp.int32))], []
        for _ in range(5):
            st, m = step(states[-1], cfg)
            states.append(st), logs.append(jax.device_get(m))
        p = [jax.device_get(x.params)["params"] for x in states]
        eq = lambda a, b: all(np.array_equal(x, y) for x, y in
                              zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
        # (an init inside the compiled update may differ from the eager one by an ulp)
        near = lambda a, b: all(np.allclose(x, y, rtol=1e-6, atol=1e-9) for x, y in
                                zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
        assert [float(m["charts/finetuning"]) for m in logs] == [0, 0, 1, 1, 1]
        assert eq(jax.device_get(states[2].ft_opt), jax.device_get(s0.ft_opt))
        assert eq(jax.device_get(states[5].opt), jax.device_get(states[2].opt))
        assert not eq(jax.device_get(states[2].opt), jax.device_get(s0.opt))
        assert near(p[3]["classifier"], init_p["classifier"])
        assert not near(p[2]["classifier"], init_p["classifier"])  # LAMB's decay moved it
        rest = {k: v for k, v in p[3].items() if k != "classifier"}
        was = init_p if scratch else p[2]
        assert near(rest, {k: v for k, v in was.items() if k != "classifier"}), scratch
        for m in logs[2:]:
            assert float(m["losses/loss"]) == float(m["losses/cls"])
        for k in ("output_bias",):
            assert eq(p[5][k], p[3][k]), k
        assert eq(p[5]["seq_relationship"]["bias"], p[3]["seq_relationship"]["bias"])
        assert not eq(p[5]["classifier"], p[3]["classifier"])


def _twin_init(key, cfg):
    """albert.init, where seed 1 is the NSP twin (sop = 0) of seed 0 (the same key)."""
    i = jnp.argmax(jnp.all(key == KEYS, -1))
    return _INIT(KEYS[0], cfg).replace(sop=jnp.where(i == 1, 0, 1))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """TINY through the command line (--fast-compile), in-process, once, 2 seeds. With
    --fast-compile (XLA's lowest level) the chunk of 100 updates of the old 2-layer config
    compiled in 10.0 CPU s and ran in 5.5 (evaluate 3.7); without it 23.1 and 2.2 (evaluate
    7.4): at 300 tiny updates the compile dominates (2-core CPU, loaded)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(albert, "init", _twin_init)
        return tiny_run_module.run_cli(
            albert, TINY, tmp_path_factory.mktemp("run"), CHUNK, extra=("--fast-compile",)
        )


def test_mlm_beats_the_unigram_guess_short(tiny_run):
    """Short behaviour test, one compiled run of 300 LAMB updates: held out, the n-gram
    masked LM of both seeds (SOP-trained and its NSP twin) predicts the masked characters
    better than the unigram guess on the same positions (+0.01), its loss falls by more than
    a nat. At this length neither sentence head has learned its task yet (both near chance);
    [1] Table 5's SOP-vs-NSP finding is the slow gate's. Measured (2-core CPU, loaded, the
    released n-gram law): MLM loss 3.72 / 3.72 -> 2.55 / 2.56 nats (mean of the last 20
    updates), held-out MLM acc 0.338 / 0.334 vs unigram 0.309 (margins 0.020 / 0.016 over
    the gate); held-out SOP acc 0.50 / 0.50, NSP acc 0.45 / 0.55. Broken variant (the MLM
    loss zeroed in update; measured before the n-gram change): held-out MLM acc 0.013 /
    0.011, MLM loss 3.72 -> 3.73 / 3.72: fails both asserts by far."""
    f = {k: np.asarray(v) for k, v in tiny_run.final.items()}
    h = tiny_run.history
    print(f, h["losses/mlm"][:, 0], h["losses/mlm"][:, -20:].mean(1))
    assert (f["val_mlm_acc"] > f["val_unigram_acc"] + 0.01).all(), f
    assert (h["losses/mlm"][:, -20:].mean(1) < h["losses/mlm"][:, 0] - 1.0).all()


def test_train_is_pure_and_seeded(tiny_run):
    """The runner's first chunk, rerun on the same initial states (the same compiled
    program: its init and chunk of CHUNK updates are persistent-cache hits), gives the
    run's first rows bit for bit (the SOP seed and its NSP twin start from the same
    parameters). The same chunk from the file's own init with two different keys (both
    SOP): the parameters, the instances drawn and the losses differ between the seeds."""
    states = run.initial_states(_twin_init, TINY, 0, 2)
    np.testing.assert_array_equal(states.sop, [1, 0])
    step = run.make_chunk(albert.update, TINY, CHUNK, parallel.seed_sharding(2), 2)
    step = step.lower(states).compile(run.INIT_COMPILER_OPTIONS)  # the run's --fast-compile
    state, metrics = jax.device_get(step(states))
    metrics = run.mark_undefined(metrics, albert.NAN_UNLESS)
    for k in tiny_run.history:
        np.testing.assert_array_equal(tiny_run.history[k][:, :CHUNK], metrics[k], err_msg=k)
    assert np.isfinite(tiny_run.history["losses/loss"]).all()
    seeded = run.initial_states(_INIT, TINY, 0, 2)
    np.testing.assert_array_equal(seeded.sop, [1, 1])
    state, metrics = jax.device_get(step(seeded))
    kernel = next(x for x in jax.tree.leaves(state.params) if x.ndim >= 3)
    assert not np.array_equal(kernel[0], kernel[1])
    for k in ("losses/mlm", "losses/sentence", "charts/predicted_frac"):
        assert not np.array_equal(metrics[k][0], metrics[k][1]), k


def test_micro_batches_give_the_same_update(tiny_run):
    """Gradient accumulation is exact: update with the batch of 16 in 4 micro-batches of 4
    (each micro-batch's MLM loss divided by the whole batch's weight) gives the run's first
    logged losses, accuracies and gradient norm (rtol 1e-5)."""
    state = jax.tree.map(lambda a: a[0], jax.device_get(run.initial_states(_twin_init, TINY, 0, 2)))
    micro = dataclasses.replace(TINY, micro_batches=4)
    _, m = jit0(albert.update, 1)(state, micro)
    for k in ("losses/mlm", "losses/sentence", "charts/mlm_acc", "charts/grad_norm"):
        np.testing.assert_allclose(float(m[k]), tiny_run.history[k][0, 0], rtol=1e-5, err_msg=k)


def test_cli_runs_and_documents_every_field(tiny_run, capsys):
    with pytest.raises(SystemExit):
        albert.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(albert.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, xxlarge, paper" in out
    summary = json.loads((tiny_run.run_dir / "summary.json").read_text())
    for k in ("val_mlm_acc", "val_sop_acc", "val_nsp_acc", "val_task_acc"):
        assert len(summary[k]) == 2 and np.isfinite(summary[k]).all(), k


def test_bad_values_fail_with_named_field(tmp_path):
    with pytest.raises(ValueError, match="d_model=30 is not divisible by num_heads=4"):
        albert.main(["--preset", "quick", "--d-model", "30", "--run-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="share='some'"):
        albert.main(["--share", "some", "--run-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="sentence_task='x'"):
        albert.main(["--sentence-task", "x", "--run-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="max_ngram=0"):
        albert.main(["--max-ngram", "0", "--run-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="micro_batches=3 does not divide batch_size=4096"):
        albert.main(["--micro-batches", "3", "--run-dir", str(tmp_path)])
    for bad in ("1.0", "0"):
        with pytest.raises(ValueError, match=f"val_fraction={float(bad)}"):
            albert.main(["--val-fraction", bad, "--run-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--lr must be > 0"):
        albert.main(["--lr", "0", "--run-dir", str(tmp_path)])


def test_instances_are_uint8_inputs_of_update_and_evaluate_not_constants():
    """The SOP/NSP training instances and the held-out ones live in the State as uint8, so
    the compiled update and evaluate take them as an input: no constant of 1k elements or
    more in their lowered text (the int32 instances were constants of both programs)."""
    state = jax.eval_shape(lambda k: albert.init(k, TINY), jax.random.PRNGKey(0))
    want = albert.device_data(TINY)
    assert [(a.shape, a.dtype) for a in state.data] == [(a.shape, np.uint8) for a in want]
    assert want[0].size > 10_000 and want[4].size > 1000 and want[6].size > 1000
    for fn in (albert.update, albert.evaluate):
        hlo = jax.jit(fn, static_argnums=1).lower(state, TINY).as_text()
        assert not big_constants(hlo, 1000), (fn.__name__, big_constants(hlo, 1000)[:1])


def test_every_config_field_is_read():
    assert unread_fields(albert) == []


def test_paper_preset_traces():
    """jax.eval_shape of init and one update under the paper preset: ALBERT-base (E 128,
    H 768, 12 layers sharing all), batch 4096 of 512 tokens, 30,000 rows."""
    cfg, state, after = preset.trace_paper(albert, dupe_factor=1, eval_instances=64)
    assert jax.tree.structure(after[0]) == jax.tree.structure(state)
    assert state.params["params"]["word_embeddings"]["embedding"].shape == (30000, 128)
    assert after[1]["losses/loss"].shape == ()


# the slow gate: 2 shared layers of H 32, E 16, context 32, 1500 LAMB updates of 32
SLOW = albert.Config(
    corpus="ordered",
    vocab_size=None,
    seq_len=32,
    max_positions=32,
    embedding_size=16,
    d_model=32,
    num_layers=2,
    num_heads=2,
    d_ff=64,
    max_predictions_per_seq=5,
    dupe_factor=1,
    batch_size=32,
    train_steps=1500,
    lr=2e-2,
    warmup_steps=20,
    eval_instances=256,
    finetune_steps=0,
)


@pytest.mark.slow
def test_nsp_solves_topic_but_not_order(tmp_path):
    """[1] Table 5 (NSP-trained: NSP 90.5, SOP 52.0) at tiny scale, with the SOP-trained seed
    beside it: after 1500 updates on the ordered documents, the NSP twin solves held-out NSP
    from the topic letter (> 0.65) and stays at chance on SOP (within 0.08 of 0.5). The SOP
    seed does NOT yet solve SOP at this size (measured 0.52; [1]: 86.5), so that half of
    the finding is not asserted. Measured (2-core CPU, load ~15, 7.3 min wall, 106 CPU s;
    the released n-gram law): NSP twin NSP 0.945, SOP 0.539; SOP seed SOP 0.473, NSP 0.406;
    held-out MLM acc 0.757 (SOP seed) / 0.767 (NSP twin) vs unigram 0.300. Broken variant
    (its arms are the two seeds): the SOP-trained seed is the NSP assert's broken variant
    (NSP 0.406 < 0.65)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(albert, "init", _twin_init)
        res = tiny_run_module.run_cli(albert, SLOW, tmp_path, 300, extra=("--fast-compile",))
    f = {k: np.asarray(v) for k, v in res.final.items()}
    print(f)
    assert f["val_nsp_acc"][1] > 0.65 and abs(f["val_sop_acc"][1] - 0.5) < 0.08, f
    assert (f["val_mlm_acc"] > f["val_unigram_acc"] + 0.1).all(), f


def _scratch_twin_init(key, cfg):
    """albert.init, where seed 1 is the from-scratch twin (scratch = 1) of seed 0."""
    i = jnp.argmax(jnp.all(key == KEYS, -1))
    return _INIT(KEYS[0], cfg).replace(scratch=jnp.where(i == 1, 1, 0))


# the fine-tuning gate: SLOW's pre-training, then 300 AdamW updates of 32 on the labelled
# task (12 replaced characters in a window of 30), lr 1e-3
FINETUNE = dataclasses.replace(SLOW, finetune_steps=300, span_len=12, finetune_lr=1e-3,
                               finetune_warmup_steps=30, num_labelled=2048, num_eval=512)


@pytest.mark.slow
def test_pre_training_helps_fine_tuning(tmp_path):
    """The issue's claim for ALBERT: pre-trained (1500 LAMB updates of n-gram MLM + SOP on
    the ordered documents), then fine-tuned 300 updates on the labelled task, the
    classifier's held-out accuracy beats the twin fine-tuned from scratch on the same
    labelled data, same key and the same compiled program (> scratch + 0.15, > 0.65).
    Measured (2-core CPU, loaded): 0.961 pre-trained vs 0.711 from scratch (held-out MLM
    accuracy after fine-tuning 0.390: the encoder moved). A calibration script fine-tuning
    one pre-trained state of another key: 0.977 vs 0.689; with 3 replaced characters 0.773
    vs 0.500, but on this gate's key 0.623 vs 0.500 (so 3 is too noisy a gate). Broken
    variant: the scratch twin is this gate's (it fails both asserts)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(albert, "init", _scratch_twin_init)
        res = tiny_run_module.run_cli(albert, FINETUNE, tmp_path, 300, extra=("--fast-compile",))
    f = {k: np.asarray(v) for k, v in res.final.items()}
    print(f)
    assert f["val_task_acc"][0] > 0.65 and f["val_task_acc"][0] > f["val_task_acc"][1] + 0.15, f
