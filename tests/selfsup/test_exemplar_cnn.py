"""Tests of selfsup/exemplar_cnn.py: each transformation by hand (translation, scaling,
rotation by 90 degrees = rot90, the PCA contrast, HSV), the gradient-proportional seed
sampler's frequencies, the K fixed transformations per seed, the optimiser schedule,
the quadrant pooling of the features, dropout, behaviour against a broken variant (labels
independent of the seeds) and random init, purity, CLI and the paper preset."""

import dataclasses

import jax
import jax.numpy as jnp
import matplotlib.colors
import numpy as np
import pytest

from common import run
from selfsup import exemplar_cnn as ex
from tests.common.cli import cli_args
from tests.common.compiled import compiled, main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# One tiny configuration for every test of the module: 16x16 digits, 12-px patches from
# 10-12 px windows, 32 surrogate classes x 8 transformations, an 8c5-16c5-32f net, batch 32,
# 50 epochs of 8 steps.
TINY = ex.Config(image_size=16, patch_size=12, seed_sizes=(10, 12), num_classes=32,
                 samples_per_class=8, conv_channels=(8, 16), fc_units=32, batch_size=32,
                 num_epochs=50, lr=0.03, shift_conv=True)
SEEDS = 2
ALPHA0 = ex.identity_transform(1)
# the functions under test, jitted (eager, each of their ops compiles on its own: ~4x slower)
WARP = jax.jit(ex.warp, static_argnums=3)
PCA = jax.jit(ex.pca_contrast)
RGB2HSV, HSV2RGB = jax.jit(ex.rgb_to_hsv), jax.jit(ex.hsv_to_rgb)
HSV_OPS = jax.jit(ex.hsv_contrast_color)
WINDOWS = jax.jit(ex.window_logits, static_argnums=1)


def _warp(img, **kw):
    """warp of a whole P x P image (the window is the image), with alpha = identity + kw."""
    p = img.shape[0]
    window = jnp.array([(p - 1) / 2, (p - 1) / 2, p], jnp.float32)
    alpha = ALPHA0.replace(**{k: jnp.asarray(v, jnp.float32) for k, v in kw.items()})
    return np.asarray(WARP(jnp.asarray(img), window, alpha, p))


def test_warp_translation_scaling_and_rot90_by_hand():
    """Identity: the window itself. A shift of (2, 0) moves the content 2 rows down and
    (0, -3) 3 columns left (the border repeats). Rotation by 90 degrees is jnp.rot90
    (counter-clockwise as displayed). Scaling by 2 on the ramp img[y, x] = x gives
    c + (x - c) / 2, c = 5.5, inside the image. Shrinking by 2 is antialiased (stripes of
    period 2 average out, a ramp keeps its slope 2). Mutations tried: dropping the shift,
    the sign of sin, or the 1 / scale each fails one of these; no antialiasing (taps width
    0: stripes read 1.0) fails; taps not centred (arange(m) / m) fails the ramp."""
    img = np.random.default_rng(0).uniform(size=(12, 12, 1)).astype(np.float32)
    np.testing.assert_allclose(_warp(img), img, atol=1e-6)
    np.testing.assert_allclose(_warp(img, shift=[2, 0])[2:], img[:-2], atol=1e-6)
    np.testing.assert_allclose(_warp(img, shift=[2, 0])[:2], np.repeat(img[:1], 2, 0),
                               atol=1e-6)
    np.testing.assert_allclose(_warp(img, shift=[0, -3])[:, :-3], img[:, 3:], atol=1e-6)
    np.testing.assert_allclose(_warp(img, angle=np.pi / 2), np.rot90(img, 1, (0, 1)),
                               atol=1e-5)
    np.testing.assert_allclose(_warp(img, angle=-np.pi / 2), np.rot90(img, -1, (0, 1)),
                               atol=1e-5)
    ramp = np.tile(np.arange(12, dtype=np.float32), (12, 1))[..., None]
    np.testing.assert_allclose(_warp(ramp, scale=2.0)[..., 0],
                               np.tile(5.5 + (np.arange(12) - 5.5) / 2, (12, 1)), atol=1e-5)
    # antialiasing: shrunk by 2 about the centre (6, 6), the patch's points fall on the odd
    # columns; plain bilinear would read the stripes x % 2 as all 1, the supersampled warp
    # gives 0.39 (a square of sqrt(6) source pixels); a ramp stays a ramp (centred taps)
    shrink = lambda x: np.asarray(WARP(jnp.asarray(x), jnp.array([6.0, 6.0, 12.0]),
                                       ALPHA0.replace(scale=jnp.array(0.5)), 12))[..., 0]
    stripes = np.tile(np.arange(12, dtype=np.float32) % 2, (12, 1))[..., None]
    assert np.abs(shrink(stripes)[:, 4:8] - 0.5).max() < 0.15
    np.testing.assert_allclose(shrink(ramp)[:, 4:8], np.tile(6 + 2 * (np.arange(4, 8) - 5.5),
                                                             (12, 1)), atol=1e-5)


def test_pca_contrast_keeps_the_mean_and_scales_each_component():
    """Contrast 1: x' = mu + V diag(f) V^T (x - mu). By hand with V = I, mu = (.5, .4, .3),
    f = (2, .5, 1): (.7, .4, .3) -> (.9, .4, .3). With the PCA of a pixel set: its mean
    pixel is a fixed point, the mean of the transformed set stays mu, and each principal
    coordinate is multiplied by its own factor."""
    mu = jnp.array([0.5, 0.4, 0.3])
    out = PCA(jnp.array([0.7, 0.4, 0.3]), jnp.array([2.0, 0.5, 1.0]), mu, jnp.eye(3))
    np.testing.assert_allclose(out, [0.9, 0.4, 0.3], atol=1e-6)
    rng = np.random.default_rng(1)
    px = rng.uniform(size=(50, 4, 3)).astype(np.float32) @ rng.normal(size=(3, 3)).astype(
        np.float32)
    mean, comps = ex.pixel_pca(px)
    np.testing.assert_allclose(comps.T @ comps, np.eye(3), atol=1e-5)
    f = jnp.array([2.0, 0.5, 1.5])
    new = PCA(jnp.asarray(px), f, mean, comps)
    np.testing.assert_allclose(PCA(jnp.asarray(mean), f, mean, comps), mean,
                               atol=1e-5)
    np.testing.assert_allclose(new.reshape(-1, 3).mean(0), mean, atol=1e-4)
    np.testing.assert_allclose((new - mean) @ comps, ((px - mean) @ comps) * f, atol=1e-4)


def test_hsv_round_trip_matplotlib_and_the_colour_transforms_by_hand():
    """rgb_to_hsv matches matplotlib's and hsv_to_rgb inverts it. By hand: red (1, 0, 0) is
    (0, 1, 1) and grey .5 is (0, 0, .5); the hue shift +1/3 turns red into green; contrast 2
    on a grey pixel .5 with power 2, factor 1.2, shift .05 gives .25 x 1.2 + .05 = .35, and
    on a colour pixel acts on S and V alone (the hue is kept)."""
    x = np.random.default_rng(2).uniform(size=(200, 3)).astype(np.float32)
    hsv = RGB2HSV(jnp.asarray(x))
    np.testing.assert_allclose(hsv, matplotlib.colors.rgb_to_hsv(x), atol=1e-5)
    np.testing.assert_allclose(HSV2RGB(hsv), x, atol=1e-5)
    np.testing.assert_allclose(RGB2HSV(jnp.array([[1.0, 0, 0], [0.5, 0.5, 0.5]])),
                               [[0, 1, 1], [0, 0, 0.5]], atol=1e-6)
    a3 = ex.identity_transform(3)
    green = HSV_OPS(jnp.array([1.0, 0.0, 0.0]), a3.replace(hue=jnp.array(1 / 3)))
    np.testing.assert_allclose(green, [0, 1, 0], atol=1e-5)
    a = ALPHA0.replace(power=jnp.array([3.0, 2.0]), factor=jnp.array([1.0, 1.2]),
                       add=jnp.array([0.0, 0.05]))
    np.testing.assert_allclose(HSV_OPS(jnp.array([0.5]), a), [0.35], atol=1e-6)
    c = jnp.array([0.8, 0.4, 0.2])  # h = 1/18, s = .75, v = .8
    out = RGB2HSV(HSV_OPS(c, a.replace(pca=jnp.ones(3))))
    np.testing.assert_allclose(out, [1 / 18, 0.75 ** 3, 0.8 ** 2 * 1.2 + 0.05], atol=1e-5)


def test_seed_sampler_draws_windows_in_proportion_to_their_gradient_energy():
    """[1] Sec. 2 on a 4x4 image whose columns are 0 0 1 1: np.gradient along x gives
    squared magnitudes 0 .25 .25 0 in every row, so the 2x2 windows at x0 = 0, 1, 2 have
    mean energy .125, .25, .125: x0 is drawn with probability 1/4, 1/2, 1/4 and y0 uniformly.
    The same image times sqrt(3) has 3 times the energy in every window: over all windows
    of both images, the second is drawn 3 times as often (0.25 / 0.75). 30,000 draws match
    within 0.015. The window energies of a random image match a numpy loop over
    np.gradient. Mutations tried: a uniform position draw fails the frequencies; a uniform
    image draw (the earlier sampler: 0.5 / 0.5) fails the image frequencies."""
    img = jnp.tile(jnp.array([0.0, 0.0, 1.0, 1.0]), (4, 1))[None, :, :, None]
    np.testing.assert_allclose(np.exp(np.asarray(WINDOWS(img, 2)))[0],
                               np.tile([0.125, 0.25, 0.125], (3, 1)), atol=1e-6)
    cfg = dataclasses.replace(TINY, num_classes=30000, seed_sizes=(2,))
    idx, box = jax.device_get(jax.jit(ex.sample_seeds, static_argnums=2)(
        jax.random.PRNGKey(0), jnp.concatenate([img, 3 ** 0.5 * img]), cfg))
    np.testing.assert_allclose(np.bincount(idx, minlength=2) / 30000, [0.25, 0.75],
                               atol=0.015)
    assert (box[:, 2] == 2).all()
    x0, y0 = box[:, 1] - 0.5, box[:, 0] - 0.5
    np.testing.assert_allclose(np.bincount(x0.astype(int), minlength=3) / 30000,
                               [0.25, 0.5, 0.25], atol=0.015)
    np.testing.assert_allclose(np.bincount(y0.astype(int), minlength=3) / 30000,
                               [1 / 3] * 3, atol=0.015)
    r = np.random.default_rng(3).uniform(size=(5, 6, 2)).astype(np.float32)
    gy, gx = np.gradient(r, axis=(0, 1))
    g = (gy ** 2 + gx ** 2).sum(-1)
    hand = [[g[y:y + 3, x:x + 3].mean() for x in range(4)] for y in range(3)]
    np.testing.assert_allclose(np.exp(np.asarray(WINDOWS(jnp.asarray(r[None]), 3)))[0], hand,
                               rtol=1e-5)


def test_k_transformations_per_seed_are_fixed_and_in_range():
    """Each sample's transformation is a function of (seed i, draw k): a seed meets at most
    K distinct transformations, and two seeds share none of them; K = 0 draws fresh ones.
    Every drawn parameter lies in [1]'s ranges; with no transformations in the family the
    sample is the seed patch itself (up to the PCA round trip's rounding). Mutation tried:
    the seed index dropped from the key (fold_in(data_key, k)) fails the disjointness."""
    cls = jnp.array([0] * 32 + [1] * 32, jnp.int32)
    key, dk = jax.random.PRNGKey(0), jax.random.PRNGKey(1)
    keys = jax.jit(ex.sample_keys, static_argnums=3)(key, dk, cls, TINY)
    k0, k1 = ({tuple(k) for k in half} for half in np.split(np.asarray(keys), 2))
    assert len(k0) <= TINY.samples_per_class and len(k1) <= TINY.samples_per_class
    assert not k0 & k1
    fresh = jax.jit(ex.sample_keys, static_argnums=3)(
        key, dk, cls, dataclasses.replace(TINY, samples_per_class=0))
    assert len({tuple(k) for k in np.asarray(fresh)}) == 64
    a = jax.device_get(jax.jit(jax.vmap(  # numpy: no eager reductions to compile below
        lambda k: ex.draw_transform(k, ex.Config(), 3, ex.TRANSFORMS)))(
            jax.random.split(key, 2000)))
    assert np.abs(a.shift).max() <= 0.2 * 32 and np.abs(a.shift).max() > 5
    assert 0.7 <= a.scale.min() and a.scale.max() <= 1.4
    assert np.abs(a.angle).max() <= np.radians(20) + 1e-6
    assert 0.5 <= a.pca.min() and a.pca.max() <= 2 and 0.25 <= a.power.min() <= 0.3
    assert a.power.max() <= 4 and np.abs(a.add).max() <= 0.1 and np.abs(a.hue).max() <= 0.1
    x = np.asarray(ex.images(TINY)[0])
    stats = ex.pixel_pca(x)
    box = jnp.array([[7.5, 7.5, 12.0]])
    none = dataclasses.replace(TINY, transforms=())
    out = jax.jit(ex.make_batch, static_argnums=6)(keys[:1], jnp.zeros(1, jnp.int32),
                                                   jnp.array([3]), box, jnp.asarray(x),
                                                   stats, none)
    np.testing.assert_allclose(out[0], x[3, 2:14, 2:14], atol=1e-4)


def test_lr_is_divided_by_three_at_the_drops():
    """[1] App. B: momentum 0.9 from lr 0.01, divided by 3 (here at fixed fractions)."""
    cfg = ex.Config(num_classes=100, samples_per_class=10, batch_size=10, num_epochs=1)
    _, sched = ex.make_optimizer(cfg)
    np.testing.assert_allclose([sched(0), sched(49), sched(50), sched(75)],
                               [0.01, 0.01, 0.01 / 3, 0.01 / 9], rtol=1e-6)


def test_quadrant_max_features_and_dropout_by_hand():
    """[1] Sec. 4: quadrant_max of arange(16) as a 4x4 map is the max of each quadrant,
    5 7 13 15; on a 5x5 map the middle row and column belong to both halves (arange(25):
    12 14 22 24), channels interleaved per quadrant. features subtracts the pixel mean
    (shifting images and mean together changes nothing), joins every layer's 4 quadrant
    maxima (4 x (8 + 16 + 32) at TINY), and in_chunks gives f's result over a padded
    last chunk. The network's dropout acts in training alone (two keys differ, eval is
    deterministic). Mutations tried: a global max in place of the quadrants fails the hand
    values; halves without the middle row/column (h // 2) fails the 5x5 values; no mean
    subtraction in features fails the shift; a dropout layer that is never applied
    (deterministic=True) fails the train/eval check."""
    qm = jax.jit(ex.quadrant_max)
    np.testing.assert_array_equal(qm(jnp.arange(16.0).reshape(1, 4, 4, 1)),
                                  [[5.0, 7.0, 13.0, 15.0]])
    m = jnp.arange(25.0).reshape(1, 5, 5, 1)
    np.testing.assert_array_equal(qm(jnp.concatenate([m, -m], -1)),
                                  [[12, 0, 14, -2, 22, -10, 24, -12]])
    x = jnp.asarray(np.random.default_rng(4).uniform(size=(2, 16, 16, 1)), jnp.float32)
    patches = x[:, :12, :12]

    def run_all(key):  # one program at XLA's lowest level (flax's init: 9.9 CPU-s at -O2)
        params = ex.network(TINY).init(key, patches)["params"]
        f = jax.vmap(lambda img, mean: ex.features(params, img, TINY, mean))
        out = lambda train, k: ex.network(TINY).apply({"params": params}, patches,
                                                      train=train, rngs={"dropout": k})
        return (f(jnp.stack([x, x + 0.3, x]), jnp.array([0.2, 0.5, 0.5])),
                ex.in_chunks(lambda a: 2 * a, jnp.arange(300.0)),
                jax.vmap(out, (None, 0))(True, jax.random.split(key)), out(False, key))

    (base, shifted, other), doubled, (t1, t2), e1 = compiled(run_all, jax.random.PRNGKey(0))
    assert base.shape == (2, 4 * (8 + 16 + 32))
    np.testing.assert_allclose(shifted, base, atol=1e-5)
    assert not np.allclose(other, base, atol=1e-3)
    np.testing.assert_array_equal(doubled, 2 * np.arange(300.0))
    assert not np.allclose(t1, t2) and not np.allclose(t1, e1)


# chunks of 10 updates (one compiled program whatever its length; the same trained numbers
# as with 50): the purity test reruns 10 updates (2.2 -> 1.1 CPU-s). Seeds 0
# and 1 train Exemplar-CNN, seed BROKEN (State.shuffle set) the broken variant, all in the
# run's one vmapped program.
CHUNK = 10
BROKEN = 2
RUN_ARGS = cli_args(TINY, ex.Config()) + [
    "--num-seeds", str(SEEDS + 1), "--log-every", str(CHUNK), "--no-progress"]


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """TINY through the CLI entry point, once: SEEDS + 1 seeds (the last one the broken
    variant: the runner's initial states with shuffle set) in chunks of CHUNK updates, then
    evaluate(); with the compiled chunks and their inputs, and the compiled evaluate (at
    XLA's lowest optimisation level, the runner's --fast-compile one for evaluate: it
    compiles in half the CPU time, 7 vs 15 CPU-s on the loaded 2-core machine, and runs
    once per arm; the chunks keep the default level, which runs them 3x faster)."""
    evaluates = []
    real_initial_states = run.initial_states

    def initial_states(*args):
        states = real_initial_states(*args)
        return states.replace(shuffle=jnp.arange(SEEDS + 1) == BROKEN)

    def evaluate_seeds(evaluate, state, cfg, num_seeds, compiler_options=None):
        """run.evaluate_seeds (a jitted evaluate) compiled at the lowest level, kept."""
        fn = jax.jit(run.seed_map(lambda s: evaluate(s, cfg), num_seeds))
        evaluates.append(fn.lower(state).compile(run.INIT_COMPILER_OPTIONS))
        return jax.device_get(evaluates[-1](state))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run, "initial_states", initial_states)
        mp.setattr(run, "evaluate_seeds", evaluate_seeds)
        res, chunks = main_recording_chunks(ex.main, RUN_ARGS + [
            "--run-dir", str(tmp_path_factory.mktemp("exemplar"))])
    return res, chunks, evaluates[0]


def test_exemplar_cnn_recognises_fresh_transformations_of_its_seeds(recorded_run):
    """Behaviour ([1] Sec. 2-3): TINY (400 steps), 2 seeds; the surrogate accuracy on 8
    fresh transformations (full family, never trained on) of each of the 32 seeds (256
    samples: binomial spread ~0.03), against the same training with labels independent of
    the seeds (broken, a third seed of the same run: State.shuffle, each sample cut from the
    seed of the next sample in the batch) and the network at init (the run's compiled
    evaluate). Measured on a loaded 2-core CPU (jax 0.10.2), chance 1/32 = 0.031:
        trained 0.320 0.324   labels independent of the seeds 0.023   init 0.031 0.047 0.031
    Measured before the antialiased warp, the energy-weighted image draw and the 8 fresh
    samples per seed (1 per seed, 32 samples): trained 0.250 0.219, broken 0.063, init
    0.031 0.031 0.000. The broken arm is the mutation "labels not tied to the seeds": it
    fails the 5 x chance the real run passes (put into update for every seed, measured with
    1 sample per seed: trained 0.031 0.063, fails); the flag ignored (seed 2 trains
    normally: broken 0.219 then) fails the 3 x chance bound. Transformations disabled (a
    weaker broken variant, not asserted, 1 sample per seed): 0.219 0.219 at 400 steps and
    0.188 0.219 (trained 0.125 0.094) at 160: at this size the seeds alone generalise as
    well, the invariance pays off only with more training. Probes at TINY do not separate
    from init (k-NN 10/class 0.80 0.83 vs 0.79 0.85 at 160 steps), so they are not
    asserted."""
    quick_run, chunks, evaluate = recorded_run
    initial = chunks[0][1]
    np.testing.assert_array_equal(initial.shuffle, np.arange(SEEDS + 1) == BROKEN)
    out = quick_run.final["surrogate_acc_fresh"]
    trained, broken = out[:SEEDS], out[SEEDS:]
    init = jax.device_get(evaluate(initial))["surrogate_acc_fresh"]
    print("trained", trained, "broken", broken, "init", init)
    chance = 1 / TINY.num_classes
    assert (trained >= 5 * chance).all(), trained
    assert (init <= 2.5 * chance).all(), init
    assert (broken <= 3 * chance).all(), broken


def test_train_is_pure_and_cli_writes_its_files(recorded_run, capsys):
    """Same keys: the runner's initial states of seeds 0-2 again (shuffle False from
    init), and its first chunk rerun from them, are bit-identical to the run's; the two
    unbroken seeds differ; the run wrote its files; --help documents every field."""
    quick_run, chunks, _ = recorded_run
    with pytest.raises(SystemExit):
        ex.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(ex.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out
    assert (quick_run.run_dir / "metrics.jsonl").exists()
    h = quick_run.history["losses/surrogate"]
    assert h.shape == (SEEDS + 1, TINY.num_updates) and np.isfinite(h).all()
    assert h[:SEEDS, -10:].mean() < h[:SEEDS, :10].mean()  # the surrogate loss falls
    assert not np.array_equal(h[0], h[1])
    first_chunk, first_input = chunks[0]
    again = run.initial_states(ex.init, TINY, 0, SEEDS + 1)
    assert not np.asarray(again.shuffle).any()
    jax.tree.map(np.testing.assert_array_equal, first_input,
                 again.replace(shuffle=jnp.arange(SEEDS + 1) == BROKEN))
    state, metrics = first_chunk(jax.tree.map(jnp.copy, first_input))  # the chunk donates
    jax.tree.map(np.testing.assert_array_equal, state.params, chunks[1][1].params)
    np.testing.assert_array_equal(h[:, :CHUNK], metrics["losses/surrogate"])


def test_bad_values_fail_with_named_field(tmp_path):
    for flags, msg in ((["--patch-size", "30"], "patch_size=30 must be divisible by 4"),
                       (["--lr", "0"], "--lr must be > 0"),
                       (["--dropout", "1.0"], "dropout=1.0 must be in"),
                       (["--transforms", "blur"], "unknown \\['blur'\\]"),
                       (["--scale-range", "1.4", "0.7"], "scale_range=\\(1.4, 0.7\\)"),
                       (["--seed-sizes", "200"], "seed_sizes=\\(200,\\)")):
        with pytest.raises(ValueError, match=msg):
            ex.main(flags + ["--run-dir", str(tmp_path)])


def test_every_config_field_is_read():
    assert unread_fields(ex) == []


def test_paper_preset_traces():
    """eval_shape of init and one update under `paper`: 64c5-64c5-128f on 32x32 patches of
    96x96 images, N = 16000 surrogate classes, K = 100, batch 128; nothing runs."""
    cfg, state, (after, metrics) = trace_paper(ex)
    assert cfg.num_classes == 16000 and cfg.samples_per_class == 100 and cfg.patch_size == 32
    assert state.params["Conv_0"]["kernel"].shape == (5, 5, 1, 64)
    assert state.params["fc"]["kernel"].shape == (8, 8, 64, 128)
    assert state.params["classifier"]["kernel"].shape == (128, 16000)
    assert state.seed_box.shape == (16000, 3)
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
