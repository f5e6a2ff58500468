"""Tests of selfsup/colorization.py: Lab conversion on known colours, the ab bins, the
soft-encoding, the prior smoothing and rebalancing weights (Eq. 4), the weighted loss
(Eq. 2), the annealed mean (Eq. 5), the AuC; the behaviour against L2 regression (the
paper's desaturation claim); purity, CLI and the paper preset."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import run
from selfsup import colorization as col
from tests.common.cli import cli_args
from tests.common.compiled import main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# One tiny configuration for every test of the module: 32x32 crops of the photos at
# 128 px, a narrow net with one conv per block, 8 crops per step, 2 chunks of 20 steps.
TINY = col.Config(**{**col.PRESETS["quick"], "batch_size": 8, "num_steps": 40,
                     "lr_decay_steps": (30,), "channels": (8, 8, 16, 16, 16, 16, 16, 8),
                     "num_eval_crops": 16, "probe_size": 16})
SEEDS = 2
LOG_EVERY = 20


def test_lab_of_known_colours_and_round_trip():
    """sRGB (D65) -> Lab against skimage.color.rgb2lab's values (quoted, skimage is not a
    dependency): white (100, 0, 0), red (53.2408, 80.0925, 67.2032), grey 128 (53.585,
    0, 0); the traced (jnp) and numpy paths agree; Lab -> RGB inverts it. Mutation tried:
    sRGB gamma 2.2 for 2.4 fails."""
    rgb = np.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [128 / 255] * 3])
    want = np.array([[100.0, 0.0, 0.0], [53.2408, 80.0925, 67.2032], [53.585, 0.0, 0.0]])
    np.testing.assert_allclose(col.rgb_to_lab(rgb, np), want, atol=2e-3 * 5)
    r = np.random.default_rng(0).uniform(size=(500, 3))
    lab, back = jax.jit(lambda x: (col.rgb_to_lab(x), col.lab_to_rgb(col.rgb_to_lab(x))))(
        jnp.asarray(np.concatenate([rgb, r]), jnp.float32))  # one program: eager is slow
    np.testing.assert_allclose(lab[:3], want, atol=0.02)
    np.testing.assert_allclose(back[3:], r, atol=1e-4)
    np.testing.assert_allclose(col.lab_to_rgb(col.rgb_to_lab(r, np), np), r, atol=1e-9)


def test_gamut_bins():
    """The in-gamut grid-10 bins found from 64^3 sRGB colours: 261 of them (the released
    pts_in_hull.npy has 313, a superset with one more ring outside), on multiples of 10,
    inside +-110, holding grey (0, 0) and the bins of the sRGB primaries and secondaries
    (red (80, 70), green (-90, 80), blue (80, -110), yellow (-20, 90), cyan (-50, -10),
    magenta (100, -60)); clearly out-of-gamut bins of the released ring, (100, 0) and (-90,
    50), are absent. Mutation tried: floor instead of round in the quantisation gives 265
    bins (fails)."""
    bins = col.ab_bins(10.0, 64)
    assert bins.shape == (261, 2), bins.shape
    np.testing.assert_array_equal(bins % 10, 0)
    assert np.abs(bins).max() <= 110
    have = {tuple(b) for b in bins.astype(int).tolist()}
    for b in ((0, 0), (80, 70), (-90, 80), (80, -110), (-20, 90), (-50, -10), (100, -60)):
        assert b in have, b
    assert (100, 0) not in have and (-90, 50) not in have


def test_upsampling_is_aligned_with_the_targets():
    """The training targets are ab[::4, ::4], so the logits at j are trained for pixel 4j;
    the evaluation's bilinear upsampling gives pixel 4j exactly input j, pixel 4j + 2 the
    midpoint, and holds the edge past the last sample. Mutation tried: jax.image.resize
    (half-pixel centres, a 1.5 px shift) fails."""
    x = np.arange(8.0, dtype=np.float32).reshape(1, 2, 2, 2)
    u = np.asarray(jax.jit(col.upsample, static_argnums=1)(x, 8))
    np.testing.assert_allclose(u[0, ::4, ::4], x[0], atol=1e-6)
    np.testing.assert_allclose(u[0, 2, 0], (x[0, 0, 0] + x[0, 1, 0]) / 2, atol=1e-6)
    np.testing.assert_allclose(u[0, 7, 7], x[0, 1, 1], atol=1e-6)


def test_rebalanced_auc_weights_classes_equally():
    """The evaluation's class rebalancing: pixels weighted by 1 / p~_eval of their nearest
    bin, p~_eval the evaluated pixels' own bin frequencies smoothed by sigma 5. Two colours
    far apart (3 pixels of (0, 0), 1 of (60, 60)): weights 1/3 vs 1 relative, so each colour
    carries half the weight; an error on the rare pixel alone costs half the AuC range.
    Mutation tried: all weights 1 (the raw AuC) fails."""
    bins = jnp.asarray(col.ab_bins(10.0, 64))
    ab = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [60.0, 60.0]], np.float32)
    w = np.asarray(jax.jit(col.class_weights, static_argnums=2)(ab, bins, 5.0))
    np.testing.assert_allclose(w[:3].sum(), w[3], rtol=1e-5)
    pred = ab.copy()
    pred[3] = [60.0, 60.0 + 200.0]  # the rare pixel off by > 150
    np.testing.assert_allclose(jax.jit(col.auc)(pred, ab, w), 50.0, rtol=1e-5)


def test_soft_encoding_by_hand():
    """[1] Sec. 2.1: ab = (0, 0) sits on a bin; its 5 nearest bins are itself and the 4 at
    distance 10, weighted exp(-d^2 / 50): 1 / (1 + 4 e^-2) = 0.64889 on (0, 0) and
    e^-2 / (1 + 4 e^-2) = 0.08778 on each neighbour; the weights sum to 1 and the most
    goes to the nearest bin (also for an off-grid point). Mutation tried: exp(-d^2 /
    sigma^2) fails."""
    bins = jnp.asarray(col.ab_bins(10.0, 64))
    z = jax.jit(col.soft_encode, static_argnums=(2, 3))(
        jnp.array([[0.0, 0.0], [13.0, -4.0]]), bins, 5, 5.0)
    np.testing.assert_allclose(z.sum(-1), 1.0, rtol=1e-6)
    assert int((z[0] > 0).sum()) == 5
    centre = int(np.flatnonzero((np.asarray(bins) == 0).all(1))[0])
    np.testing.assert_allclose(z[0, centre], 1 / (1 + 4 * np.exp(-2)), rtol=1e-5)
    np.testing.assert_allclose(np.sort(z[0])[-5:-1], np.exp(-2) / (1 + 4 * np.exp(-2)),
                               rtol=1e-5)
    nearest = int(np.argmin(((np.asarray(bins) - [13.0, -4.0]) ** 2).sum(-1)))
    assert int(np.argmax(z[1])) == nearest and tuple(bins[nearest]) == (10.0, 0.0)


def test_rebalancing_weights_by_hand_and_on_the_prior():
    """[1] Eq. 4 on p~ = (1/2, 1/4, 1/4), lambda = 1/2, Q = 3: mixture (5/12, 7/24, 7/24),
    inverse (2.4, 3.4286, 3.4286), E_p~ = 2.9143, so w = (0.8235, 1.1765, 1.1765); on the
    smoothed prior of the training pixels E_p~[w] = 1 for lambda 0, 0.5, 1, and lambda = 1
    gives all ones. Smoothing (sigma 5) of a point mass spreads e^-2 of the centre's mass
    onto each neighbour at distance 10, and keeps the total at 1. Mutations tried: w
    normalised to mean 1 (not E_p~[w] = 1) fails here and in the loss test; smoothing with
    exp(-d^2 / (2 sigma)) fails."""
    bins = jnp.asarray(col.ab_bins(TINY.grid, TINY.gamut_levels))
    centre = int(np.flatnonzero((np.asarray(bins) == 0).all(1))[0])

    @jax.jit  # one program: eager ops compile one by one
    def compute(prior):
        p = col.smooth_prior(prior, bins, 5.0)
        ws = [col.rebalance_weights(p, lam) for lam in (0.0, 0.5, 1.0)]
        hand = col.rebalance_weights(jnp.array([0.5, 0.25, 0.25]), 0.5)
        delta = col.smooth_prior(jnp.zeros(len(bins)).at[centre].set(1.0), bins, 5.0)
        return p, ws, hand, delta

    p, ws, hand, s = jax.tree.map(np.asarray, compute(jnp.asarray(col.empirical_prior(TINY))))
    np.testing.assert_allclose(hand, [0.82353, 1.17647, 1.17647], rtol=1e-4)
    np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-5)
    for w in ws:
        np.testing.assert_allclose(np.sum(p * w), 1.0, rtol=1e-4)
    np.testing.assert_allclose(ws[2], 1.0, rtol=1e-5)
    w = ws[1]
    assert w[np.argmax(p)] < 0.5 < 2.0 < w.max()  # common colours down, rare ones up
    right = int(np.flatnonzero((np.asarray(bins) == [10, 0]).all(1))[0])
    np.testing.assert_allclose(s[right] / s[centre], np.exp(-2), rtol=1e-5)


def test_weighted_loss_through_losses():
    """[1] Eq. 2-3 through `losses` (what update runs): uniform logits give -sum_q Z_q log
    (1/Q) = log Q per pixel, times v = w of the pixel's nearest bin; mode 1 (no
    rebalancing) gives log Q; mode 2 gives Eq. 1, 1/2 ||ab - ab^||^2, here 1/2 (3^2 + 4^2)
    = 12.5. A crop with no |a|, |b| above 5 has zero classification loss. Mutation tried:
    v = 1 in mode 0 (no rebalancing) fails."""
    q = len(col.ab_bins(TINY.grid, TINY.gamut_levels))
    losses = jax.jit(col.losses, static_argnums=4)
    ab = np.full((1, 2, 2, 2), 30.0, np.float32)
    ab[0, 0, 0] = [-60.0, 20.0]
    logits = np.zeros((1, 2, 2, q), np.float32)
    ab_pred = ab + np.array([3.0, 4.0], np.float32)
    bins = jnp.asarray(col.ab_bins(TINY.grid, TINY.gamut_levels))

    @jax.jit
    def v_mean(prior):  # mean over the pixels of w of their nearest bin
        p = col.smooth_prior(prior, bins, TINY.prior_sigma)
        w = col.rebalance_weights(p, TINY.rebalance_lambda)
        return w[jnp.argmin(((ab[..., None, :] - bins) ** 2).sum(-1), -1)].mean()

    v = float(v_mean(jnp.asarray(col.empirical_prior(TINY))))
    assert v > 1.5  # the pixels' colours are rarer than average
    for mode, want in ((0, np.log(q) * v), (1, np.log(q)), (2, 12.5)):
        loss, _, _ = losses(logits, ab_pred, ab, np.int32(mode), TINY)
        np.testing.assert_allclose(loss, want, rtol=1e-5)
    grey = np.full((1, 2, 2, 2), 4.0, np.float32)
    assert float(losses(logits, grey, grey, np.int32(1), TINY)[0]) == 0.0


def test_annealed_mean_from_mean_to_mode():
    """[1] Eq. 5: T = 1 is the mean of the bins under softmax(logits); T -> 0 (0.01) is
    the mode's bin; T = 0.38 lies between them. Mutation tried: log z * T fails."""
    bins = np.array([[0.0, 0.0], [40.0, 0.0], [0.0, -60.0]], np.float32)
    logits = np.log(np.array([0.5, 0.3, 0.2], np.float32))
    mean, mode, mid = jax.jit(jax.vmap(col.annealed_mean, (None, None, 0)))(
        logits, bins, np.array([1.0, 0.01, 0.38], np.float32))
    np.testing.assert_allclose(mean, [12.0, -12.0], atol=1e-4)
    np.testing.assert_allclose(mode, [0.0, 0.0], atol=1e-4)
    assert 0 < float(mid[0]) < 12 and -12 < float(mid[1]) < 0


def test_auc_by_hand():
    """[1] Table 1's AuC: an exact prediction scores 100; an error of 10 on every pixel
    is within t for t = 10..150, 141 of the 151 thresholds: 93.377; weights only matter
    when errors differ (half the pixels exact, weight 3 on them: (3 * 151 + 141) / 4 / 151).
    Mutation tried: err < t (strict) fails."""
    y = np.zeros((2, 4, 4, 2), np.float32)
    auc = jax.jit(col.auc)
    np.testing.assert_allclose(auc(y, y), 100.0)
    np.testing.assert_allclose(auc(y + np.array([6.0, 8.0], np.float32), y), 100 * 141 / 151,
                               rtol=1e-6)
    pred = y.copy()
    pred[:, :2] += np.array([6.0, 8.0], np.float32)
    w = np.ones((2, 4, 4), np.float32)
    w[:, 2:] = 3.0
    np.testing.assert_allclose(auc(pred, y, w), 100 * (3 * 151 + 141) / 4 / 151,
                               rtol=1e-6)


RUN_ARGS = cli_args(TINY, col.Config()) + [
    "--num-seeds", str(SEEDS), "--log-every", str(LOG_EVERY), "--no-progress"]


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """TINY through the CLI entry point, once: SEEDS seeds in 2 chunks of 20 steps (one
    compiled program), then evaluate(); with the compiled chunks and their inputs. evaluate
    is compiled at XLA's lowest level (the runner's --fast-compile options), the chunk
    optimised: evaluate's probes compiled optimised cost 33 CPU-s, and the whole run with
    --fast-compile ran the conv chunks several times slower (2-core CPU, loaded)."""
    real = run.evaluate_seeds
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run, "evaluate_seeds", lambda *a, **k: real(
            *a, **{**k, "compiler_options": run.INIT_COMPILER_OPTIONS}))
        return main_recording_chunks(col.main, RUN_ARGS + [
            "--run-dir", str(tmp_path_factory.mktemp("col"))])


def test_classification_learns_and_is_more_colourful_than_regression(recorded_run):
    """Behaviour: from the same initial network (seed 0's), the rebalanced classification
    loss and the L2 regression (Eq. 1) train the same 40 steps (the run's compiled chunk,
    the loss picked by the state's traced mode). Gated against step 0 of the same states
    (one evaluate program for both): the classification net's held-out cross-entropy
    against the soft-encoded targets falls well below its step-0 value (the regression
    arm, whose Q head gets no gradient, moves much less), and its annealed mean is more
    colourful than the regression's. At 40 steps both nets are still near their init (the
    annealed mean sits near the bins' centroid, the regression head near 0): the chroma gap
    is the two decoders at init, not [1]'s effect, which the module docstring's 600-step
    numbers show. Measured (loaded 2-core CPU; step 0 -> step 40): held-out CE 5.568 ->
    5.506 (classification) and 5.568 -> 5.561 (regression arm); chroma 16.87 (the bins'
    centroid at uniform logits is 16.70) vs 0.14, truth 13.35; AuC 82.6 vs 90.8, rebalanced
    75.9 vs 76.8 (neither moves from step 0). Asserted: the CE drop > 0.03 and > 4x the
    regression arm's; chroma gap > 2. Mutation tried: no gradient through the
    classification logits (stop_gradient in classification_loss): CE 5.568 -> 5.565, fails
    (the chroma assert alone still passed: 16.70 vs 0.14). Not tried, and not expected to be
    caught at this length: v = 1 (no rebalancing), bins shuffled against the soft-encoding
    (the CE would still fall); a 600-step slow gate would need the quick preset's 36 min."""
    _, chunks = recorded_run
    chunk, first = chunks[0]
    # on the host: eager stacking compiles one small program per leaf shape
    one = jax.tree.map(lambda a: np.stack([np.asarray(a)[0]] * 2), first)
    start = one.replace(mode=np.array([0, 2], np.int32))
    state = jax.tree.map(jnp.asarray, start)
    for _ in range(TINY.num_steps // LOG_EVERY):
        state, _ = chunk(state)
    # the run's evaluate program (the fixture's options: a persistent-cache hit)
    m0, m = (run.evaluate_seeds(col.evaluate, s, TINY, SEEDS, run.INIT_COMPILER_OPTIONS)
             for s in (start, state))
    keys = ("ce", "chroma", "auc", "auc_rebal")
    print({k: (np.asarray(m0[k]), np.asarray(m[k])) for k in keys})
    ce0, ce = np.asarray(m0["ce"]), np.asarray(m["ce"])
    cls, reg = np.asarray(m["chroma"])
    assert ce0[0] - ce[0] > max(0.03, 4 * abs(ce0[1] - ce[1])), (ce0, ce)
    assert cls > reg + 2.0, (cls, reg)


def test_train_is_pure_and_cli_writes_its_files(recorded_run, capsys):
    """Same keys: the runner's initial states again, and its first chunk rerun from them,
    are bit-identical to the run's; the two seeds differ; the run wrote its files, evaluated
    the held-out AuC and the probes of the trained and initial nets; --help documents every
    field."""
    res, chunks = recorded_run
    with pytest.raises(SystemExit):
        col.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(col.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out
    assert (res.run_dir / "metrics.jsonl").exists()
    h = res.history["losses/loss"]
    assert h.shape == (SEEDS, TINY.num_steps) and np.isfinite(h).all()
    assert h[:, -5:].mean() < h[:, :5].mean()
    assert not np.array_equal(h[0], h[1])
    for k in ("auc", "auc_rebal", "auc_gray", "chroma", "linear", "init_linear", "knn_few",
              "init_knn_few"):
        assert np.isfinite(res.final[k]).all(), k
    assert (res.final["auc"] <= 100).all() and (res.final["init_linear"] > 0.5).all()
    chunk, first = chunks[0]
    assert len(chunks) == TINY.num_steps // LOG_EVERY
    jax.tree.map(np.testing.assert_array_equal, first,
                 run.initial_states(col.init, TINY, 0, SEEDS))
    state, metrics = chunk(jax.tree.map(jnp.copy, first))  # the chunk donates its input
    jax.tree.map(np.testing.assert_array_equal, state.params, chunks[1][1].params)
    np.testing.assert_array_equal(h[:, :LOG_EVERY], metrics["losses/loss"])


def test_bad_values_fail_with_named_field(tmp_path):
    for flags, msg in ((["--loss", "l1"], "loss='l1' must be one of"),
                       (["--lr", "0"], "--lr must be > 0"),
                       (["--rebalance-lambda", "1.5"], "rebalance_lambda=1.5"),
                       (["--test-fraction", "0.1"], "crop_size=176 exceeds"),
                       (["--temperature", "0"], "temperature=0.0 must be > 0"),
                       (["--batch-size", "0"], "--batch-size must be >= 1"),
                       (["--num-neighbours", "400"], "num_neighbours=400 must be in"),
                       (["--lr-decay-steps", "5", "5", "--lr-decay-factors", "0.1", "0.1"],
                        r"lr_decay_steps=\(5, 5\) must be >= 1 and strictly")):
        with pytest.raises(ValueError, match=msg):
            col.main(flags + ["--run-dir", str(tmp_path)])


def test_every_config_field_is_read():
    assert unread_fields(col) == []


def test_paper_preset_traces():
    """eval_shape of init and one update under `paper` ([1]'s net: 8 blocks, 64..512
    channels, batch 40 crops of 176 px, Q logits at 44 x 44)."""
    cfg, state, (after, metrics) = trace_paper(col)
    q = len(col.ab_bins(cfg.grid, cfg.gamut_levels))
    p = state.params
    assert p["Conv_0"]["kernel"].shape == (3, 3, 1, 64)
    assert p["ConvTranspose_0"]["kernel"].shape == (4, 4, 512, 256)
    assert any(v["kernel"].shape == (1, 1, 256, q) for v in p.values())
    out = jax.eval_shape(lambda s: col.network(cfg).apply(
        {"params": s.params, "batch_stats": s.batch_stats},
        jnp.zeros((2, 176, 176, 1)), train=False), state)
    assert out[0].shape == (2, 44, 44, q) and out[1].shape == (2, 44, 44, 2)
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
