"""Tests of curriculum/starting_small.py: the shape renderer by pixel counts, the two shape
sets, the stage schedule, the loss and one SGD epoch of every arm by hand, the convex toy's
cleaner-first behaviour against no curriculum and against a clean set at margin 0, purity,
CLI and the paper preset."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import run
from curriculum import starting_small as ss
from tests.common.cli import cli_args
from tests.common.compiled import main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# One tiny shapes configuration for the CLI and purity tests (8x8 images, 64 per set).
TINY = ss.Config(
    image_size=8,
    num_train=64,
    num_test=64,
    batch_size=16,
    num_epochs=3,
    switch_epochs=(0, 2),
    hidden_sizes=(16, 16, 16),
)
SEEDS = 2


def _one(cls, size, aspect=1.0, angle=0.0, tri=None, n=16):
    """One shape centred at (0.5, 0.5), foreground 1 on background 0, n x n pixels."""
    tri = np.zeros((1, 3, 2)) if tri is None else np.asarray(tri, float)[None]
    img = ss.render(
        np.array([cls]),
        np.array([[0.5, 0.5]]),
        np.array([size]),
        np.array([aspect]),
        np.array([angle]),
        tri,
        np.array([1.0]),
        np.array([0.0]),
        n,
    )
    return img.reshape(n, n)


def test_render_pixel_counts_by_hand():
    """Pixel centres (i + 0.5) / 16. A square of half-side 0.25 covers centres in
    [0.25, 0.75]: i = 4..11, 8 x 8 = 64 pixels; the same rotated by 90 degrees is the same
    square. A rectangle of aspect 0.5 (half-sides 0.25, 0.125): 8 x 4 = 32 pixels, wide along
    x; rotated by 90 degrees, tall along y. A circle of radius 0.25: centres at offsets
    (a, b)/16, a, b in {+-0.5, ..., +-3.5}, with a^2 + b^2 <= 16: per quadrant 4 + 4 + 3 + 2
    (a = 0.5 .. 3.5), 52 pixels. The triangle
    (-1, -1), (1, -1), (-1, 1) scaled by 0.25 keeps u + v <= 0 of the 8 x 8 block: 36 pixels.
    Outside a shape the background level, inside the foreground."""
    sq = _one(0, 0.25)
    assert sq.sum() == 64 and sq[4:12, 4:12].all() and set(np.unique(sq)) == {0.0, 1.0}
    np.testing.assert_array_equal(_one(0, 0.25, angle=np.pi / 2), sq)
    rect = _one(0, 0.25, aspect=0.5)
    assert rect.sum() == 32 and rect[6:10, 4:12].all()  # rows = y, columns = x
    np.testing.assert_array_equal(_one(0, 0.25, aspect=0.5, angle=np.pi / 2), rect.T)
    a = np.arange(-3.5, 4)
    assert _one(1, 0.25).sum() == (a[:, None] ** 2 + a[None] ** 2 <= 16).sum() == 52
    tri = _one(2, 0.25, tri=[[-1, -1], [1, -1], [-1, 1]])
    assert tri.sum() == 36 and tri[4, 4] == 1 and tri[11, 11] == 0


def test_basic_triangles_are_equilateral_and_geom_ones_are_not():
    """BasicShapes' triangles: three equal sides sqrt(3) (unit circumradius); GeomShapes'
    vary (side ratios well away from 1 in most draws) and are never degenerate."""
    rng = np.random.default_rng(0)
    side = lambda t: np.linalg.norm(t - np.roll(t, 1, axis=1), axis=-1)  # noqa: E731
    basic = side(ss.triangle_vertices(rng, 100, basic=True))
    np.testing.assert_allclose(basic, np.sqrt(3), rtol=1e-6)
    geom = ss.triangle_vertices(rng, 500, basic=False)
    ratio = side(geom).max(1) / side(geom).min(1)
    assert np.median(ratio) > 1.2 and ratio.max() < 4
    e1, e2 = geom[:, 1] - geom[:, 0], geom[:, 2] - geom[:, 0]
    assert (np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]) / 2 > 0.2).all()  # area


def test_datasets_two_grey_levels_balanced_classes():
    """Stage 0 BasicShapes, stage 1 GeomShapes, the test set GeomShapes: every image has
    exactly two grey levels at least 0.3 apart; the 3 classes are balanced; the two
    training sets are different draws."""
    cfg = dataclasses.replace(TINY, image_size=16, num_train=300, num_test=300)
    tx, ty, te, tey = ss.datasets(cfg)
    assert tx.shape == (2, 300, 256) and ty.shape == (2, 300) and te.shape == (300, 256)
    for img in np.concatenate([tx[0], tx[1], te]):
        levels = np.unique(img)
        assert len(levels) == 2 and levels[1] - levels[0] >= 0.3 - 1e-6
    for y in (ty[0], ty[1], tey):
        assert np.bincount(y, minlength=3).min() > 70
    assert not np.array_equal(tx[0], tx[1])


def test_stage_schedule_by_hand():
    """D_e: arm s trains on the easy set (0) while e < s, on the target (1) from e = s on;
    s = 0 never sees the easy set."""
    got = np.array([ss.stage(e, (0, 2, 4)) for e in range(6)])
    np.testing.assert_array_equal(
        got, [[1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 1, 1]]
    )


def test_cross_entropy_by_hand():
    """logits [[2, 0, 0], [0, 0, 0]], labels [0, 1]: -log softmax = log(1 + 2 e^-2) and
    log 3, mean 0.79887; error: row 1 right, row 2 a tie read as class 0 (wrong): 0.5."""
    ce, err = ss.cross_entropy(jnp.array([[2.0, 0, 0], [0, 0, 0]]), jnp.array([0, 1]))
    np.testing.assert_allclose(ce, (np.log(1 + 2 * np.exp(-2)) + np.log(3)) / 2, rtol=1e-6)
    assert float(err) == 0.5


def test_one_update_is_minibatch_sgd_per_arm_by_hand():
    """Logistic regression (no hidden layer), 40 examples, 4 minibatches of 10 per epoch in
    the order permutation(split(key)[1]); arm s = 0 steps on the target set, arms s = 1 and
    s = 2 on the easy set, all from the same initial weights, per minibatch
        p = softmax(x W + b),  W' = W - lr x^T (p - onehot(y)) / B,  b' = b - lr mean(p - y)
    (numpy by hand); the arms read the same minibatches, so s = 1 and s = 2 end identical;
    the logged test error is the error of the final W on the test set."""
    cfg = ss.Config(
        task="gaussians",
        hidden_sizes=(),
        gauss_dim=5,
        num_train=40,
        num_test=50,
        batch_size=10,
        num_epochs=3,
        switch_epochs=(0, 1, 2),
        lr=0.5,
    )
    state = ss.init(jax.random.PRNGKey(1), cfg)
    p0 = jax.tree.map(np.asarray, state.params)
    np.testing.assert_array_equal(p0["Dense_0"]["kernel"][0], p0["Dense_0"]["kernel"][1])
    new, metrics = jax.jit(ss.update, static_argnums=1)(state, cfg)
    tx, ty, te, tey = ss.datasets(cfg)
    order = np.asarray(jax.random.permutation(jax.random.split(state.key)[1], 40)).reshape(4, 10)
    for arm, stage in ((0, 1), (1, 0), (2, 0)):
        w, b = p0["Dense_0"]["kernel"][arm], p0["Dense_0"]["bias"][arm]
        for idx in order:
            x, y = tx[stage, idx], ty[stage, idx]
            z = x @ w + b
            p = np.exp(z - z.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            d = p - np.eye(2)[y]
            w, b = w - cfg.lr * x.T @ d / 10, b - cfg.lr * d.mean(0)
        np.testing.assert_allclose(new.params["Dense_0"]["kernel"][arm], w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new.params["Dense_0"]["bias"][arm], b, atol=1e-6)
        err = np.mean(np.argmax(te @ w + b, 1) != tey)
        s = cfg.switch_epochs[arm]
        np.testing.assert_allclose(metrics[f"charts/test_error_s{s}"], err, atol=1e-6)
    jax.tree.map(lambda p: np.testing.assert_array_equal(p[1], p[2]), new.params)
    assert int(new.epoch) == 1


TOY = ss.Config(
    task="gaussians",
    hidden_sizes=(),
    gauss_dim=100,
    num_train=200,
    num_test=2000,
    batch_size=10,
    lr=0.05,
    num_epochs=6,
    switch_epochs=(0, 4),
)


def test_cleaner_examples_first_beat_no_curriculum_on_the_convex_toy():
    """Behaviour ([2] Sec. 4, the post's "cleaner examples may yield better generalisation
    faster"): logistic regression, 100-d Gaussians, 200 examples per set, the target set with
    30% of labels flipped; 4 seeds x (no curriculum, 4 epochs on an easy set first), 6 epochs,
    one compiled program run twice: with the easy set of the Config (noise-free, margin >= 1
    from the Bayes boundary) and with a noise-free easy set at margin 0 (clean labels only,
    not easier examples; the data are an input of update, so no recompilation). Measured
    (loaded 2-core CPU), test error after 6 epochs: no curriculum 0.417 0.417 0.412 0.407,
    clean margin-0 first 0.281 0.285 0.277 0.271, margin >= 1 first 0.258 0.285 0.265 0.259;
    mean over the 6 epochs 0.413 0.405 0.399 0.392, 0.263 0.260 0.269 0.256 and 0.242 0.244
    0.244 0.236 (Bayes error 0.159). The gates: clean first beats no curriculum (so an easy
    set that is never used fails), and margin >= 1 first beats clean margin-0 first over the
    6 epochs (so a margin that is ignored, i.e. clean labels alone, fails)."""
    keys = run.seed_keys(0, 4)
    states = jax.vmap(lambda k: ss.init(k, TOY))(keys)
    train = jax.jit(
        jax.vmap(lambda s: jax.lax.scan(lambda s, _: ss.update(s, TOY), s, None, TOY.num_epochs))
    )
    tx, ty, te, tey = ss.datasets(TOY)
    cx, cy, _, _ = ss.datasets(dataclasses.replace(TOY, gauss_margin=0.0))
    clean = (np.stack([cx[0], tx[1]]), np.stack([cy[0], ty[1]]), te, tey)  # same target set
    clean = jax.tree.map(lambda a: jnp.broadcast_to(a, (4, *a.shape)), clean)
    errs = []
    for st in (states, states.replace(data=clean)):
        m = train(st)[1]
        errs.append(np.array([m[f"charts/test_error_s{s}"] for s in TOY.switch_epochs]))
    (none, margin), (_, clean_first) = errs  # (seed, epoch) each
    print("none", none[:, -1], "clean", clean_first[:, -1], "margin", margin[:, -1])
    print("means", none.mean(-1), clean_first.mean(-1), margin.mean(-1))
    assert (clean_first[:, -1] < none[:, -1] - 0.08).all()
    assert (clean_first.mean(-1) < none.mean(-1) - 0.08).all()
    assert (margin.mean(-1) < clean_first.mean(-1) - TOY_MARGIN_GAIN).all()


TOY_MARGIN_GAIN = 0.01
"""test error gain (mean over the toy's 6 epochs) of the margin >= 1 easy set over a clean
margin-0 one: measured 0.016-0.025 over the 4 seeds"""


# one chunk per epoch, so the purity test reruns one compiled epoch, not the run
RUN_ARGS = cli_args(TINY, ss.Config()) + [
    "--num-seeds",
    str(SEEDS),
    "--log-every",
    "1",
    "--no-progress",
]


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """TINY through the CLI entry point, once, with the figure; the compiled chunks kept."""
    out = tmp_path_factory.mktemp("ss")
    res, chunks = main_recording_chunks(
        ss.main, RUN_ARGS + ["--run-dir", str(out / "run"), "--plot", str(out / "f.png")]
    )
    return res, chunks, out / "f.png"


def test_train_is_pure_and_cli_writes_its_files(recorded_run, capsys):
    """Same keys: the runner's initial states again, and its first chunk (one epoch) rerun
    from them, are bit-identical to the run's; the two seeds differ; every arm starts from
    the same weights; the run wrote its files and the figure; --help documents every
    field; the data sets enter update as an input, not as compiled constants."""
    res, chunks, png = recorded_run
    with pytest.raises(SystemExit):
        ss.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(ss.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert (res.run_dir / "metrics.jsonl").exists() and png.stat().st_size > 1000
    h = res.history["losses/train_ce_s0"]
    assert h.shape == (SEEDS, TINY.num_epochs) and np.isfinite(h).all()
    assert not np.array_equal(h[0], h[1])
    assert set(res.final) == {"test_error_s0", "test_error_s2", "gain_best_switch"}
    first_chunk, first_input = chunks[0]
    assert len(chunks) == TINY.num_epochs
    init = run.initial_states(ss.init, TINY, 0, SEEDS)
    jax.tree.map(np.testing.assert_array_equal, first_input, init)
    k = np.asarray(init.params["Dense_0"]["kernel"])  # (seed, arm, in, out)
    np.testing.assert_array_equal(k[:, 0], k[:, 1])
    assert not np.array_equal(k[0], k[1])
    state, metrics = first_chunk(first_input)
    jax.tree.map(np.testing.assert_array_equal, state.params, chunks[1][1].params)
    np.testing.assert_array_equal(h[:, :1], metrics["losses/train_ce_s0"])
    # the data sets are an input of update, not constants compiled into it
    one = jax.tree.map(lambda a: a[0], init)
    hlo = jax.jit(ss.update, static_argnums=1).lower(one, TINY).as_text()
    big = [ln for ln in hlo.splitlines() if "constant" in ln and "x64xf32" in ln]
    assert one.data[0].shape == (2, 64, 64) and not big, big[:1]


def test_bad_values_fail_with_named_field(tmp_path):
    for flags, msg in (
        (["--switch-epochs", "0", "0"], "must be distinct"),
        (["--switch-epochs", "0", "300"], "must be distinct and in"),
        (["--task", "mnist"], "task='mnist'"),
        (["--lr", "0"], "--lr must be > 0"),
        (["--gauss-noise-prob", "0.6"], "gauss_noise_prob=0.6"),
        (["--batch-size", "20000"], "batch_size=20000 exceeds"),
    ):
        with pytest.raises(ValueError, match=msg):
            # on TINY, so that a check that is missing trains 3 tiny epochs, not the paper
            ss.main(cli_args(TINY, ss.Config()) + flags + ["--run-dir", str(tmp_path)])


def test_every_config_field_is_read():
    assert unread_fields(ss) == []


def test_paper_preset_traces():
    """eval_shape of init and one update under `paper`: 32x32 images, 10,000 per set,
    3 x 500 hidden units, 8 arms (renders the data sets on the host; nothing trains)."""
    cfg, state, (after, metrics) = trace_paper(ss)
    assert state.params["Dense_0"]["kernel"].shape == (8, 1024, 500)
    assert state.params["Dense_3"]["kernel"].shape == (8, 500, 3)
    assert cfg.num_updates == 256 and cfg.steps_per_epoch == 312
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert len(metrics) == 3 * 8 and all(m.shape == () for m in metrics.values())


@pytest.mark.slow
def test_basic_shapes_first_lower_geomshapes_error(monkeypatch):
    """The shape experiment's gate ([2] Sec. 5, Fig. 3's direction): the quick preset with
    switch epochs (0, 30) of 60, 4 seeds; the mean GeomShapes test error over the last 10
    epochs is lower with the curriculum in every seed. The broken variant in the same test,
    a schedule that never shows BasicShapes (stage always 1), trains both arms alike and
    fails the gate. Measured (loaded 2-core CPU, 34 s wall, 37 CPU s): no curriculum
    0.419 0.416 0.423 0.427, switch 30 0.396 0.400 0.402 0.410 (gains 0.017-0.023); broken:
    both arms as no curriculum."""
    cfg = ss.Config(**{**ss.PRESETS["quick"], "switch_epochs": (0, 30)})

    def last10(cfg):
        train = jax.jit(jax.vmap(run.make_train(ss.init, ss.update, cfg)))
        _, m = train(run.seed_keys(0, 4))
        return np.array(
            [np.asarray(m[f"charts/test_error_s{s}"])[:, -10:].mean(-1) for s in cfg.switch_epochs]
        )  # (arm, seed)

    real = last10(cfg)
    monkeypatch.setattr(ss, "stage", lambda epoch, switch: jnp.ones(len(switch), jnp.int32))
    broken = last10(cfg)
    print("curriculum", real, "broken", broken)
    assert (real[1] < real[0] - SHAPES_GAIN).all(), real
    assert not (broken[1] < broken[0] - SHAPES_GAIN).all(), broken


SHAPES_GAIN = 0.008
"""GeomShapes error gain (last 10 epochs) that the switch at 30 reaches and no curriculum
does not"""
