"""Tests of selfsup/context_encoder.py: the masks and the overlap weights, the masked input
(F cannot see the hole), Eq. 1 with the overlap band, the adversarial terms (Eq. 3-4), the
channel-wise FC; the behaviour (held-out hole L2 against the mean-fill baselines and the
untrained net); purity, CLI, bad values, Config fields and the paper preset."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import run
from selfsup import context_encoder as ce
from tests.common.cli import cli_args
from tests.common.compiled import compiled, main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# One tiny configuration for every test of the module: 16x16 digits, the central 8x8
# predicted (6x6 dropped, 1 px overlap), a 2-layer encoder to 4x4x16, 2 chunks of 100 steps.
TINY = ce.Config(**{**ce.PRESETS["quick"], "image_size": 16, "channels": (8, 16),
                    "batch_size": 32, "num_steps": 200, "num_eval_images": 128,
                    "probe_size": 16})
SEEDS = 2
LOG_EVERY = 100


def masks(cfg, n=8):
    return np.asarray(compiled(lambda k: jax.vmap(lambda a: ce.make_mask(a, cfg))(
        jax.random.split(k, n)), jax.random.PRNGKey(1)))


def test_center_mask_and_overlap_weights():
    """Center, 32 px, overlap 2: F predicts the central 16x16 (from 8); the dropped square
    is that region shrunk by 2 px (10..21); the loss weights on the region are 1 in the
    dropped square and overlap_weight = 10 on the 2-px band of visible context around it
    (the released wtl2Matrix). Mutation tried: the band weighted 1 and the hole 10 fails."""
    cfg = dataclasses.replace(TINY, image_size=32, overlap=2)
    m = masks(cfg, 1)
    assert ce.region(cfg) == (8, 16)
    want = np.zeros((32, 32))
    want[10:22, 10:22] = 1
    np.testing.assert_array_equal(m[0], want)
    w = np.asarray(compiled(lambda a: ce.loss_weights(a, cfg), m))
    band = np.full((16, 16), 10.0)
    band[2:14, 2:14] = 1.0
    np.testing.assert_array_equal(w[0], band)


def test_random_masks():
    """random_block: the union of 4 squares of 8 px in 32 (each 1/16 of the image, so at
    most 1/4 together), every image different; its weights: 1 in the hole, 10 on the
    1-px ring around it, 0 elsewhere (F predicts the whole image). random_region: exactly
    region_fraction of the pixels dropped, different shapes per image, and blobby (most
    dropped pixels have a dropped right neighbour). Mutation tried: thresholding at the
    (1 - fraction) quantile fails (0.75 dropped)."""
    cfg = dataclasses.replace(TINY, image_size=32, mask="random_block")
    m = masks(cfg)
    area = m.mean((1, 2))
    assert (area <= 0.25 + 1e-6).all() and (area >= 1 / 16).all(), area
    assert len({a.tobytes() for a in m}) == len(m)
    w = np.asarray(compiled(lambda a: ce.loss_weights(a, cfg), m))
    assert w.shape == m.shape and set(np.unique(w)) <= {0.0, 1.0, 10.0}
    np.testing.assert_array_equal(w == 1.0, m == 1)
    ring = np.asarray(compiled(lambda a: jax.vmap(lambda b: ce.dilate(b, 1))(a), m)) - m
    np.testing.assert_array_equal(w == 10.0, ring == 1)
    cfg = dataclasses.replace(cfg, mask="random_region")
    m = masks(cfg)
    np.testing.assert_allclose(m.sum((1, 2)), round(0.25 * 32 * 32))
    assert len({a.tobytes() for a in m}) == len(m)
    right = m[:, :, 1:] * m[:, :, :-1]
    assert right.sum() / m.sum() > 0.6  # 0.75 measured; white noise: 0.25


def test_generator_never_sees_the_hole():
    """(1 - M^) (.) x: the masked input holds the fill colour in the dropped pixels and x
    elsewhere, so F's prediction is the same whatever the hole held (random values put in
    the 6x6 dropped square change nothing), while a change in the visible overlap band
    changes it. Mutation tried: mask_input returning x unmasked fails."""
    g, _ = ce.networks(TINY)
    x = np.asarray(ce.image_sets(TINY)[1][:4])
    m = masks(TINY, 4)
    fill = jnp.asarray(ce.fill_value(TINY))
    noisy = x + np.random.default_rng(0).normal(size=x.shape).astype(np.float32) * m[..., None]
    band = x.copy()
    band[:, 4, 4] += 1.0  # the overlap band (dropped: 5..10)

    def run_all(key, x, noisy, band):
        gv = g.init(key, x, train=False)
        out = [g.apply(gv, ce.mask_input(a, m, fill), train=False)[0] for a in (x, noisy, band)]
        return ce.mask_input(x, m, fill), out

    masked, (p, p_noisy, p_band) = compiled(run_all, jax.random.PRNGKey(0), x, noisy, band)
    np.testing.assert_array_equal(np.asarray(masked)[m == 1], np.broadcast_to(
        ce.fill_value(TINY), (int(m.sum()), 1)))
    np.testing.assert_array_equal(np.asarray(masked)[m == 0], x[m == 0])
    np.testing.assert_array_equal(p, p_noisy)
    assert np.abs(np.asarray(p) - np.asarray(p_band)).max() > 1e-6


def test_reconstruction_loss_by_hand_and_only_in_the_hole():
    """Eq. 1 with the overlap weights as `update` computes it (weights of the mask, the
    region cut, the weighted mean): a prediction off by 0.5 everywhere on the central 8x8
    costs mean(w) * 0.25 = (36 * 1 + 28 * 10) / 64 * 0.25 = 1.234375; pixels outside the
    region (here: the whole border) do not change it; one hole pixel off by 1 more adds
    ((1.5^2 - 0.5^2) * 1) / 64. Mutation tried: weights 1 - M^ (the context) fails."""
    m = masks(TINY, 1)
    x = np.zeros((1, 16, 16, 1), np.float32)

    def loss(x, pred):
        return ce.reconstruction_loss(pred, ce.crop_region(x, TINY), ce.loss_weights(m, TINY))

    pred = np.full((1, 8, 8, 1), 0.5, np.float32)
    other = x.copy()
    other[:, :4] = 7.0  # outside the predicted region
    off = pred.copy()
    off[0, 3, 3, 0] = 1.5  # (7, 7) of the image: dropped
    got = [float(v) for v in compiled(lambda: [loss(x, pred), loss(other, pred),
                                               loss(x, off)])]
    np.testing.assert_allclose(got[0], (36 + 280) / 64 * 0.25, rtol=1e-6)
    assert got[1] == got[0]
    np.testing.assert_allclose(got[2] - got[0], (1.5**2 - 0.5**2) / 64, rtol=1e-5)


def test_adversarial_terms():
    """Eq. 3-4: at logits 0 (D outputs 1/2) D's loss is 2 log 2 and F's total is
    0.999 L_rec + 0.001 log 2; a confident D (logit +10 on real, -10 on fake) has loss
    ~2 e^-10 while F's adversarial term is ~10 (non-saturating -log D(F)). Mutation tried:
    lambda_rec and lambda_adv swapped in generator_loss fails."""
    z, big = np.zeros(4, np.float32), np.full(4, 10.0, np.float32)
    d0, (g0, a0), d1, (_, a1) = compiled(lambda: (
        ce.discriminator_loss(z, z), ce.generator_loss(0.5, z, TINY),
        ce.discriminator_loss(big, -big), ce.generator_loss(0.5, -big, TINY)))
    np.testing.assert_allclose(d0, 2 * np.log(2), rtol=1e-6)
    np.testing.assert_allclose(a0, np.log(2), rtol=1e-6)
    np.testing.assert_allclose(g0, 0.999 * 0.5 + 0.001 * np.log(2), rtol=1e-6)
    np.testing.assert_allclose(d1, 2 * np.log1p(np.exp(-10)), rtol=1e-4)
    np.testing.assert_allclose(a1, 10.0, rtol=1e-3)


def test_channelwise_fc():
    """[1] Sec. 3.1: m = 3 maps of 2x2 -> m n^4 = 48 weights (a full FC would have m^2 n^4
    = 144); the output equals one n^2 x n^2 matmul per map; perturbing one input of map 1
    changes all 4 outputs of map 1 and nothing of maps 0 and 2. Mutation tried: an einsum
    that mixes channels ("bpc,dqp->bqd", summed over maps) fails."""
    x = np.random.default_rng(0).normal(size=(2, 2, 2, 3)).astype(np.float32)
    layer = ce.ChannelwiseFC()
    dx = np.zeros_like(x)
    dx[0, 1, 0, 1] = 1.0

    def go(key, x):
        v = layer.init(key, x)
        return v["params"]["kernel"], layer.apply(v, x), layer.apply(v, x + dx)

    k, y, y2 = map(np.asarray, compiled(go, jax.random.PRNGKey(0), x))
    assert k.shape == (3, 4, 4) and k.size == 48
    want = np.einsum("cqp,bpc->bqc", k, x.reshape(2, 4, 3)).reshape(2, 2, 2, 3)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    d = np.abs(y2 - y)[0]
    assert (d[..., 1] > 0).all() and (d[..., [0, 2]] == 0).all() and (np.abs(y2 - y)[1] == 0
                                                                      ).all()


def test_one_update_steps_d_and_f_against_each_other():
    """One `update` from init with lambda_rec = 0, so F's step is its adversarial gradient
    alone, on update's own batch (its keys redrawn here): F's step raises the old D's
    logit on F's output (-log D(F) falls), D's step lowers Eq. 3's loss on the same real
    and fake regions, and Adam's first step (about lr per weight) is 10x larger for F
    (gen_lr_multiplier) than for D: max |step| = 2e-3 and 2e-4. Measured: mean fake logit
    -0.0005 -> 0.0051, D's loss 1.38795 -> 1.38742. Mutation tried: discriminator_loss(lf,
    lr_) (labels swapped) in update fails (D's loss rises to 1.38849)."""
    cfg = dataclasses.replace(TINY, lambda_rec=0.0, lambda_adv=1.0)
    g, d = ce.networks(cfg)

    def go(key):
        s0 = ce.init(key, cfg)
        s1, _ = ce.update(s0, cfg)
        _, k_x, k_m = jax.random.split(s0.key, 3)
        x = ce.sample_images(k_x, jnp.asarray(ce.image_sets(cfg)[0]), cfg.batch_size, cfg)
        m = jax.vmap(lambda k: ce.make_mask(k, cfg))(jax.random.split(k_m, cfg.batch_size))
        x_in = ce.mask_input(x, m, jnp.asarray(ce.fill_value(cfg)))

        def f(s):
            return g.apply({"params": s.g_params, "batch_stats": s0.g_stats}, x_in,
                           train=True, mutable=["batch_stats"])[0][0]

        def dl(s, a):
            return d.apply({"params": s.d_params, "batch_stats": s0.d_stats}, a, train=True,
                           mutable=["batch_stats"])[0]

        real, fake = ce.crop_region(x, cfg), f(s0)
        step = [jnp.max(jnp.stack(jax.tree.leaves(jax.tree.map(
                    lambda a, b: jnp.abs(a - b).max(), p0, p1))))
                for p0, p1 in ((s0.g_params, s1.g_params), (s0.d_params, s1.d_params))]
        return (dl(s0, fake).mean(), dl(s0, f(s1)).mean(),
                ce.discriminator_loss(dl(s0, real), dl(s0, fake)),
                ce.discriminator_loss(dl(s1, real), dl(s1, fake)), *step)

    fake0, fake1, d0, d1, step_f, step_d = map(float, compiled(go, jax.random.PRNGKey(0)))
    print(dict(fake0=fake0, fake1=fake1, d0=d0, d1=d1, step_f=step_f, step_d=step_d))
    assert fake1 > fake0
    assert d1 < d0
    np.testing.assert_allclose([step_f, step_d], [2e-3, 2e-4], rtol=0.02)


RUN_ARGS = cli_args(TINY, ce.Config()) + [
    "--num-seeds", str(SEEDS), "--log-every", str(LOG_EVERY), "--no-progress"]


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """TINY through the CLI entry point, once: SEEDS seeds in 2 chunks of 100 steps (one
    compiled program), then evaluate() (compiled at XLA's lowest level: it runs once);
    with the compiled chunks and their inputs."""
    real = run.evaluate_seeds
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run, "evaluate_seeds", lambda *a, **k: real(
            *a, **{**k, "compiler_options": run.INIT_COMPILER_OPTIONS}))
        return main_recording_chunks(ce.main, RUN_ARGS + [
            "--run-dir", str(tmp_path_factory.mktemp("ce"))])


def test_inpainting_beats_the_baselines(recorded_run):
    """Behaviour on 128 held-out digits (the central 6x6 of 16x16 dropped) after 200
    steps, both seeds: F's hole L2 beats each image's visible-pixel mean in the hole by far
    and the mean training image in the hole, and the same network at its random init is
    worse than both. Measured (loaded 2-core CPU; seeds 0, 1): trained 0.0534, 0.0519; mean
    fill 0.648; mean image 0.335; untrained 0.346 (its output is near 0, grey). Asserted:
    trained < 0.5 x the mean image's, < 0.2 x the mean fill's; untrained > 2 x trained.
    Mutation tried: the L2 on the visible context instead of the hole (w = 1 - dilate(M^)):
    hole L2 1.21, 1.10, fails. D's held-out accuracy is not gated here: after 200 tiny
    steps it is still at chance (0.531, 0.500; with D's labels swapped in update 0.477,
    0.469; the quick run's 0.85 is at 600 steps of a wider net); the adversarial half is
    gated by test_one_update_steps_d_and_f_against_each_other."""
    res, _ = recorded_run
    f = {k: np.asarray(v) for k, v in res.final.items()}
    print({k: f[k] for k in ("hole_mse", "meanfill_hole_mse", "meanimage_hole_mse",
                             "init_hole_mse", "d_accuracy")})
    assert (f["hole_mse"] < 0.5 * f["meanimage_hole_mse"]).all()
    assert (f["hole_mse"] < 0.2 * f["meanfill_hole_mse"]).all()
    assert (f["init_hole_mse"] > 2 * f["hole_mse"]).all()


def test_train_is_pure_and_cli_writes_its_files(recorded_run, capsys):
    """Same keys: the runner's initial states again, and its first chunk rerun from them,
    are bit-identical to the run's; the two seeds differ; the run wrote its files and
    evaluated the hole L2 and the probes of the trained and initial nets; --help documents
    every field."""
    res, chunks = recorded_run
    with pytest.raises(SystemExit):
        ce.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(ce.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out
    assert (res.run_dir / "metrics.jsonl").exists()
    h = res.history["losses/reconstruction"]
    assert h.shape == (SEEDS, TINY.num_steps) and np.isfinite(h).all()
    assert h[:, -10:].mean() < 0.5 * h[:, :10].mean()
    assert not np.array_equal(h[0], h[1])
    for k in ("hole_mse", "d_accuracy", "linear", "init_linear", "knn_few", "init_knn_few"):
        assert np.isfinite(res.final[k]).all(), k
    chunk, first = chunks[0]
    assert len(chunks) == TINY.num_steps // LOG_EVERY
    jax.tree.map(np.testing.assert_array_equal, first,
                 run.initial_states(ce.init, TINY, 0, SEEDS))
    state, metrics = chunk(jax.tree.map(jnp.copy, first))  # the chunk donates its input
    jax.tree.map(np.testing.assert_array_equal, state.g_params, chunks[1][1].g_params)
    jax.tree.map(np.testing.assert_array_equal, state.d_params, chunks[1][1].d_params)
    np.testing.assert_array_equal(h[:, :LOG_EVERY], metrics["losses/reconstruction"])


def test_bad_values_fail_with_named_field(tmp_path):
    for flags, msg in ((["--mask", "ring"], "mask='ring' must be one of"),
                       (["--data", "mnist"], "data='mnist' must be one of"),
                       (["--lr", "0"], "--lr must be > 0"),
                       (["--lambda-adv", "-1"], "--lambda-adv must be >= 0"),
                       (["--image-size", "100"], "image_size=100 must be a multiple"),
                       (["--overlap", "32"], r"overlap=32 must be in \[0, image_size / 4\)"),
                       (["--test-fraction", "0.1"], "image_size=128 exceeds"),
                       (["--gen-lr-multiplier", "0"], "gen_lr_multiplier=0.0"),
                       (["--num-blocks", "0"], "-num-blocks must be >= 1, got 0"),
                       (["--block-fraction", "0"], r"block_fraction=0.0 in \(0, 1\]"),
                       (["--region-fraction", "1"], "region_fraction=1.0 in"),
                       (["--region-cells", "0"], "region_cells=0 must be >= 1")):
        with pytest.raises(ValueError, match=msg):
            ce.main(flags + ["--run-dir", str(tmp_path)])


def test_every_config_field_is_read():
    assert unread_fields(ce) == []


def test_paper_preset_traces():
    """eval_shape of init and one update under `paper` (128-px photo crops, encoder 64-64-
    128-256-512 to 4x4x512, the channel-wise FC of 512 x 16 x 16, F's 64x64x3 centre, D on
    64x64 with 4 convs); and random masks (random_region, random_block, each through update):
    F predicts the whole 128x128, D gets 5 convs."""
    cfg, state, (after, metrics) = trace_paper(ce)
    g = state.g_params
    assert g["ChannelwiseFC_0"]["kernel"].shape == (512, 16, 16)
    assert g["encoder"]["Conv_0"]["kernel"].shape == (4, 4, 3, 64)
    assert g["ConvTranspose_3"]["kernel"].shape == (4, 4, 64, 3)
    assert "ConvTranspose_4" not in g and "Conv_5" not in state.d_params
    assert state.d_params["Conv_4"]["kernel"].shape == (4, 4, 512, 1)
    assert state.d_params["Conv_0"]["kernel"].shape == (4, 4, 3, 64)
    pred = jax.eval_shape(lambda s: ce.networks(cfg)[0].apply(
        {"params": s.g_params, "batch_stats": s.g_stats}, jnp.zeros((2, 128, 128, 3)),
        train=False)[0], state)
    assert pred.shape == (2, 64, 64, 3)
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
    _, state, _ = trace_paper(ce, mask="random_region")
    assert state.g_params["ConvTranspose_4"]["kernel"].shape == (4, 4, 64, 3)
    assert state.d_params["Conv_5"]["kernel"].shape == (4, 4, 512, 1)
    _, state, (after, _) = trace_paper(ce, mask="random_block")
    assert state.g_params["ConvTranspose_4"]["kernel"].shape == (4, 4, 64, 3)
    assert jax.tree.structure(after) == jax.tree.structure(state)
