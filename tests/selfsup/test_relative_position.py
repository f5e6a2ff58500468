"""Tests of selfsup/relative_position.py: the 8 offsets, gap and jitter of the pair sampler,
patches equal to cuts of the upsampled digits, the green-magenta projection, colour dropping,
pixelation and the planted colour on hand cases; behaviour against shuffled labels and the
planted chromatic shortcut; purity, CLI and the paper preset."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import data, run
from selfsup import relative_position as rp
from tests.common.cli import cli_args
from tests.common.compiled import jit0, main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# One tiny configuration for every test of the module: 32x32 digits, 8-px patches 3 px
# apart with jitter 1 (the grid just fits), colour dropping, a planted colour gradient of
# amplitude 1, a 2-conv tower, 32 pairs per step, 200 steps (80 were too few for the pair
# task once the first patch's place varies).
TINY = rp.Config(image_size=32, patch_size=8, gap=3, jitter=1, pixelate_min_pixels=4,
                 planted_gradient=1.0, batch_size=32, num_steps=200, lr=0.05, momentum=0.9,
                 conv_channels=(16, 32), conv_kernels=(3, 3), conv_strides=(1, 2),
                 pool_after=(), lrn=False, fc6_units=64, fc7_units=64, fc8_units=64,
                 shift_conv=True)
SEEDS = 2


def test_offsets_gap_and_jitter():
    """Labels are the released pos2lbl's slots in reading order (0 1 2 / 3 . 4 / 5 6 7). With
    patch 8, gap 3, jitter 1 on 32 px (stride 11): the label is drawn first, then the first
    patch's corner before its jitter is uniform in [1 + 11 max(0, -d), 23 - 11 max(0, d)]
    per axis (d the slot's offset), so after the jitter it spans [11, 24] when the neighbour
    is above/left, [0, 13] below/right and [0, 24] on the same row/column; second - first =
    11 * OFFSETS[y] + (j2 - j1) with |j2 - j1| <= 2 (both extremes drawn); every patch lies
    inside the image; neighbours are at least gap - 2 jitter = 1 px apart. The same checks
    on a roomier 48-px config with jitter 2. Mutations tried: OFFSETS with (0, 1) and
    (0, -1) swapped fails the hand list; jitter drawn in [-jitter, jitter) fails the
    extremes; the old sampler (first patch's whole 3x3 grid inside: one position at 32 px)
    fails the [0, 24] spans."""
    assert rp.OFFSETS.tolist() == [[-1, -1], [-1, 0], [-1, 1], [0, -1], [0, 1], [1, -1],
                                   [1, 0], [1, 1]]
    sample = jit0(rp.sample_positions, static_argnums=(1, 2))  # XLA's lowest level
    for cfg in (TINY, dataclasses.replace(TINY, image_size=48, gap=4, jitter=2)):
        c, y = map(np.asarray, sample(jax.random.PRNGKey(0), 4000, cfg))
        p, j, g, s = cfg.patch_size, cfg.jitter, cfg.gap, cfg.image_size
        assert sorted(set(y.tolist())) == list(range(8))
        rel = c[:, 1] - c[:, 0] - (p + g) * rp.OFFSETS[y]
        assert np.abs(rel).max() == 2 * j
        assert c.min() == 0 and c.max() == s - p
        for d, lo, hi in ((-1, p + g, s - p), (1, 0, s - 2 * p - g), (0, 0, s - p)):
            first = c[:, 0][rp.OFFSETS[y] == d]  # the first patch's y or x on those axes
            assert (first.min(), first.max()) == (lo, hi), (d, first.min(), first.max())
        apart = np.abs(c[:, 1] - c[:, 0]).max(1) - p  # the larger of the two axis gaps
        assert apart.min() == g - 2 * j
    assert (TINY.stride, TINY.image_size - TINY.patch_size) == (11, 24)


def test_patches_are_cuts_of_the_upsampled_digits():
    """cut_patches (crop-and-resize from the 8x8 source) equals slicing the digits upsampled
    to 32x32 by common.data.digit_images, at any corner; with the digit removed the patch
    holds only the planted colour: at pixel (y, x) g ((x + 1/2) / S - 1/2) [-1, 2, -1] / sqrt 6
    + g ((y + 1/2) / S - 1/2) [1, 0, -1] / sqrt 2 (hand values at (13, 20): x-term 0.1406,
    y-term -0.0781)."""
    src = jnp.asarray(rp.train_images(TINY)[0][:3])
    big = data.digit_images(32, TINY.num_train)[0][:3]
    corners = jnp.array([[0, 0], [13, 20], [24, 5]])
    cut = jit0(rp.cut_patches, static_argnums=2)
    plain = dataclasses.replace(TINY, planted_gradient=0.0)
    got = np.asarray(cut(src, corners, plain))
    for i, (y, x) in enumerate(corners.tolist()):
        np.testing.assert_allclose(got[i], np.repeat(big[i, y:y + 8, x:x + 8], 3, -1),
                                   atol=1e-5)
    colour = np.asarray(cut(src * 0, corners, TINY))[1, 0, 0]  # pixel (13, 20)
    u_x, u_y = (20.5 / 32 - 0.5), (13.5 / 32 - 0.5)
    assert abs(u_x - 0.140625) < 1e-9 and abs(u_y + 0.078125) < 1e-9
    want = u_x * np.array([-1, 2, -1]) / np.sqrt(6) + u_y * np.array([1, 0, -1]) / np.sqrt(2)
    np.testing.assert_allclose(colour, want, atol=1e-6)


def test_chroma_projection_dropping_and_pixelation_by_hand():
    """Projection: [0.2, 0.9, 0.1] has (a.x)/(a.a) = 1.5 / 6 = 0.25 along a = [-1, 2, -1],
    so B x = [0.45, 0.4, 0.35]; no green-magenta component is left, grey passes unchanged and
    B B = B; preprocess('project') is B (x - 0.5). Dropping: every patch keeps exactly one
    channel, minus its patch mean (the two other channels are noise of std 0.01 x the kept
    std, 0.0100 measured on 64 patches of 8x8). Pixelation: side P is the identity, side 1
    the patch's bilinear centre value everywhere (the mean of a ramp), side 4 of 8 a 2x2-block
    image of a 4x4 bilinear downsample (rank <= 4); pixelate 0 leaves patches alone and 1
    changes each. Mutations tried: B = I - a a^T (no division) fails [0.45, 0.4, 0.35];
    dropping without the mean subtraction fails the zero mean; the upsample clamped to P - 1
    instead of side - 1 fails the side-1 constant."""
    a = np.array([-1.0, 2.0, -1.0])
    x = np.array([[0.2, 0.9, 0.1], [0.3, 0.3, 0.3]], np.float32)
    project = jit0(rp.project_out)  # one program per shape, not op by op
    bx = np.asarray(project(x))
    np.testing.assert_allclose(bx[0], [0.45, 0.4, 0.35], atol=1e-6)
    np.testing.assert_allclose(bx[1], [0.3, 0.3, 0.3], atol=1e-6)
    np.testing.assert_allclose(bx @ a, 0, atol=1e-6)
    np.testing.assert_allclose(project(bx), bx, atol=1e-6)
    patches = jax.random.uniform(jax.random.PRNGKey(0), (64, 8, 8, 3))
    cfg = dataclasses.replace(TINY, chroma="project", pixelate=0.0)
    prep = jit0(rp.preprocess, static_argnums=2)
    np.testing.assert_allclose(prep(jax.random.PRNGKey(1), patches, cfg),
                               project(np.asarray(patches) - 0.5), atol=1e-6)
    d = np.asarray(prep(jax.random.PRNGKey(1), patches,
                        dataclasses.replace(cfg, chroma="drop")))
    p = np.asarray(patches)
    for i in range(64):
        kept = [c for c in range(3) if np.allclose(d[i, ..., c], p[i, ..., c]
                                                    - p[i, ..., c].mean(), atol=1e-6)]
        assert len(kept) == 1, i
        others = np.delete(d[i], kept[0], -1)
        assert 0.004 < others.std() / d[i, ..., kept[0]].std() < 0.02
    ramp = np.broadcast_to(np.arange(8.0, dtype=np.float32)[:, None, None], (8, 8, 1)) + \
        np.arange(8.0, dtype=np.float32)[None, :, None]
    pix, pixelate = jit0(rp.pixelate_one), jit0(rp.pixelate, static_argnums=2)
    np.testing.assert_allclose(pix(ramp, 8.0), ramp, atol=1e-5)
    np.testing.assert_allclose(pix(ramp, 1.0), np.full_like(ramp, 7.0), atol=1e-5)
    half = np.asarray(pix(ramp, 4.0))[..., 0]
    assert np.linalg.matrix_rank(half, tol=1e-4) <= 4 and not np.allclose(half, ramp[..., 0])
    for prob, changed in ((0.0, False), (1.0, True)):
        out = pixelate(
            jax.random.PRNGKey(3), patches, dataclasses.replace(TINY, pixelate=prob))
        diff = np.abs(np.asarray(out) - p).max((1, 2, 3)) > 1e-4
        assert diff.all() if changed else not diff.any()


CHUNK = 5
"""updates per compiled chunk (one program whatever its length): the purity test reruns 5"""
RUN_ARGS = cli_args(TINY, rp.Config()) + ["--num-seeds", str(SEEDS), "--log-every",
                                          str(CHUNK), "--no-progress", "--fast-compile"]
"""--fast-compile: XLA's lowest optimisation level; TINY's training compiled in 8.9 CPU-s
instead of 23 and ran 80 steps in 2.1 s instead of 1.0 (2-core CPU, loaded)."""


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """TINY through the CLI entry point, once, with --plot and --fast-compile: SEEDS seeds in
    chunks of CHUNK updates, then evaluate(); with the compiled chunks and their inputs."""
    run_dir = tmp_path_factory.mktemp("relpos")
    return main_recording_chunks(rp.main, RUN_ARGS + [
        "--run-dir", str(run_dir), "--plot", str(run_dir / "p.png")])


def _train_arms(cfg, broken, arms=(False, True)):
    """cfg, 2 seeds x arms (False: as is, True: the `broken(key, first, second, labels)`
    variant of every pair, in training and evaluation), one jitted vmapped program (XLA's
    fast-compile level); returns the held-out 8-way accuracies (2 x len(arms),) on the
    digits and with the digits removed."""
    real = rp.make_pairs

    def train(key, flag):
        def pairs(k, src, c, content=1.0):
            a, b, y = real(k, src, c, content)
            a2, b2, y2 = broken(jax.random.fold_in(k, 7), a, b, y)
            return tuple(jnp.where(flag, u, v) for u, v in ((a2, a), (b2, b), (y2, y)))

        te_x = jnp.asarray(rp.train_images(cfg)[2])
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(rp, "make_pairs", pairs)
            state, _ = run.make_train(rp.init, rp.update, cfg)(key)
            acc = lambda st, content: rp.position_loss(*rp.predict(st, te_x, cfg, content))[1]
            return acc(state, 1.0), acc(state, 0.0), acc(rp.init(key, cfg), 1.0)

    keys = jnp.concatenate([run.seed_keys(0, SEEDS)] * len(arms))
    flags = jnp.array([f for f in arms for _ in range(SEEDS)])
    fn = jax.jit(jax.vmap(train)).lower(keys, flags).compile(run.INIT_COMPILER_OPTIONS)
    return tuple(map(np.asarray, fn(keys, flags)))


def _blank_first(k, a, b, y):
    return jnp.zeros_like(a), b, y


def _shuffle_labels(k, a, b, y):
    return a, b, jax.random.permutation(k, y)


def test_position_is_learned_from_both_patches_and_drop_ignores_the_colour(recorded_run):
    """Behaviour ([1] Sec. 3 and 3.1), TINY (colour dropping, the planted colour gradient
    on), 2 seeds: held-out 8-way accuracy well above chance (1/8), where the same network at
    random init is at chance; with the digits removed (only the colour left) ~chance:
    dropping leaves the shortcut nothing to read. Broken variant, trained and evaluated in
    one program: the first patch blanked (zeros), so only the second patch's own content and
    position are left: it must score clearly below the method (the pair is what is learned).
    The shortcut's positive control ('none' reads it) and the shuffled-label variant are the
    slow test below. Measured (TINY, 200 steps, --fast-compile, 2-core CPU, loaded): drop
    0.262 0.295, colour only 0.137 0.119; first blanked 0.187 0.203 (what the second
    patch's place alone gives); at init (first patch blanked) 0.134 0.137. Asserted: each
    seed of the method above each seed of the blanked, and the mean 0.05 above. Mutations
    tried: the old sampler (the first patch's whole 3x3 grid inside, one place at 32 px):
    drop 0.448 0.322, first blanked 0.479 0.449, fails; 'drop' without the patch-mean
    subtraction (the kept channel keeps the planted offset): colour only 0.189 0.178, fails
    the colour bound 0.165. The probes are printed, not asserted: linear 0.77 0.79, 10/class
    0.64 0.65, k-NN 0.60 0.64, 10/class 0.38 0.38 (below the random tower's in the quick
    run, as in test_jigsaw.py). With an empty compilation cache the same code gives, every
    time, drop 0.248 0.277, first blanked 0.187 0.182 (the numbers above came from a warm
    cache): the absolute bar is 0.22 (chance 0.125); the pair-vs-blanked margins carry the
    test."""
    trained = recorded_run[0].final
    blank, _, init = _train_arms(TINY, _blank_first, (True,))
    msg = (f"drop {trained['pos_acc_test']} colour {trained['pos_acc_colour_only']}; init "
           f"(first blanked) {init}; first blanked {blank}")
    print(msg, "\nprobes trained", trained)
    assert (trained["pos_acc_test"] >= 0.22).all(), msg
    assert (init <= 0.2).all(), msg
    assert (trained["pos_acc_colour_only"] <= 0.165).all(), msg
    assert trained["pos_acc_test"].min() > blank.max(), msg
    assert trained["pos_acc_test"].mean() >= blank.mean() + 0.05, msg


@pytest.mark.slow
def test_none_reads_the_colour_and_shuffled_labels_learn_nothing(recorded_run):
    """The broken variants of the behaviour test, one jitted program (2 seeds x 2 arms) with
    chroma 'none' and the planted gradient: with the true labels the colour alone gives the
    position (colour-only accuracy high, the shortcut that 'drop' closes); with the labels
    shuffled within each batch the 8-way accuracy is at chance, below the method's.
    Measured (TINY, 200 steps, the current sampler, --fast-compile, 2-core CPU, loaded;
    182 s for this test): 'none' 0.967 0.994, colour only 0.995 0.999; shuffled 0.129
    0.109; the method 0.262 0.295, colour only 0.137 0.119 (warm cache). With an empty
    compilation cache, every time: 'none' 0.967 1.000, colour only 0.992 1.000; shuffled
    0.128 0.114; the method 0.248 0.277: the method's bar is 0.22, as in the default test."""
    trained = recorded_run[0].final
    acc, colour, _ = _train_arms(dataclasses.replace(TINY, chroma="none"), _shuffle_labels)
    none_colour, shuffled = colour[:SEEDS], acc[SEEDS:]
    msg = f"none {acc[:SEEDS]} colour {none_colour}; shuffled {shuffled}; drop {trained}"
    print(msg)
    assert (none_colour >= 0.5).all(), msg
    assert (shuffled <= 0.2).all() and (trained["pos_acc_test"] >= 0.22).all(), msg
    assert (trained["pos_acc_colour_only"] <= 0.165).all(), msg


def test_train_is_pure_and_cli_writes_its_files(recorded_run, capsys):
    """Same keys: the runner's initial states, and its first chunk rerun from them, are
    bit-identical to the run's (mutation tried: host-side noise on the loss fails here);
    the two seeds differ; the run wrote its files and the plot; --help documents every
    field."""
    res, chunks = recorded_run
    with pytest.raises(SystemExit):
        rp.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(rp.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out
    assert (res.run_dir / "metrics.jsonl").exists()
    h = res.history["losses/position"]
    assert h.shape == (SEEDS, TINY.num_updates) and np.isfinite(h).all()
    assert h[:, -10:].mean() < h[:, :10].mean()
    assert not np.array_equal(h[0], h[1])
    assert (res.run_dir / "p.png").stat().st_size > 1000
    first_chunk, first_input = chunks[0]
    assert len(chunks) == TINY.num_updates // CHUNK
    jax.tree.map(np.testing.assert_array_equal, first_input,
                 run.initial_states(rp.init, TINY, 0, SEEDS))
    state, metrics = first_chunk(first_input)
    jax.tree.map(np.testing.assert_array_equal, state.params, chunks[1][1].params)
    np.testing.assert_array_equal(h[:, :CHUNK], metrics["losses/position"])


def test_bad_values_fail_with_named_field(tmp_path):
    for flags, msg in ((["--image-size", "20"], "image_size=20 must be >= 2 patch_size"),
                       (["--lr", "0"], "--lr must be > 0"),
                       (["--chroma", "grey"], "chroma='grey'"),
                       (["--pixelate", "1.5"], "pixelate=1.5 must be in"),
                       (["--pixelate-min-pixels", "9100"], "pixelate_min_pixels=9100"),
                       (["--jitter", "-1"], "jitter=-1 must be >= 0"),
                       (["--drop-noise", "-1"], "drop_noise=-1.0 must be >= 0"),
                       (["--planted-gradient", "-1"], "planted_gradient=-1.0 must be >= 0"),
                       (["--momentum", "1.5"], "--momentum must be in [0, 1]"),
                       (["--pool-after", "7"], "pool_after=(7,)"),
                       (["--knn-k", "0"], "knn_k=0"),
                       (["--knn-k", "1001"], "knn_k=1001 exceeds num_train=1000"),
                       (["--num-train", "1797"], "num_train=1797 must be in [1, 1796]"),
                       (["--probe-per-class", "101"], "probe_per_class=101 x 10 classes"),
                       (["--batch-size", "2000"], "batch_size=2000 exceeds"),
                       (["--dtype", "float16"], "dtype='float16'")):
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")
                           .replace("[", r"\[").replace("]", r"\]")):
            rp.main(flags + ["--run-dir", str(tmp_path)])


def test_every_config_field_is_read():
    assert unread_fields(rp) == []


def test_paper_preset_traces():
    """eval_shape of init and one update under `paper`: 96-px patches 48 px apart in 400-px
    images, the AlexNet tower (pool5 3x3x256 with caffe's rounding), fc6 4096 per patch,
    fc7 over the 8192 concatenated, fc8 4096, fc9 8, batch norm statistics, 256 pairs."""
    cfg, state, (after, metrics) = trace_paper(rp)
    p = state.params
    assert cfg.stride == 144 and cfg.num_updates == 1_000_000
    assert p["tower"]["Conv_0"]["kernel"].shape == (11, 11, 3, 96)
    assert p["tower"]["Dense_0"]["kernel"].shape == (3 * 3 * 256, 4096)
    assert p["Dense_0"]["kernel"].shape == (2 * 4096, 4096)
    assert p["Dense_2"]["kernel"].shape == (4096, 8)
    assert "BatchNorm_0" in state.batch_stats["tower"]
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
