"""Tests of selfsup/counting.py: the tiles and the downsampling methods by hand, the
counting identity on a hand-built counter, the contrastive loss by hand, behaviour against
the broken variant without L_diff (collapse to phi = 0), purity, CLI and the paper preset."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import run
from selfsup import counting
from tests.common.cli import cli_args
from tests.common.compiled import compiled, main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# One tiny configuration for every test of the module: 16x16 digits (8-px views), a 2-conv
# net of 8-16 channels, fc 32, K = 64 counts, 32 images per step, 40 steps.
TINY = counting.Config(
    image_size=16,
    batch_size=32,
    num_steps=40,
    lr=3e-3,
    conv_channels=(8, 16),
    conv_kernels=(3, 3),
    conv_strides=(1, 2),
    pool_after=(),
    fc_units=(32,),
    count_dim=64,
    shift_conv=True,
)
SEEDS = 2


def test_tiles_and_downsampling_by_hand():
    """x = [[0..3], [4..7], [8..11], [12..15]] (4x4): T_1..T_4 = [[0, 1], [4, 5]],
    [[2, 3], [6, 7]], [[8, 9], [12, 13]], [[10, 11], [14, 15]] (row-major grid); D 'area'
    = the 2x2 means [[2.5, 4.5], [10.5, 12.5]]. The counting identity holds exactly for the
    hand-built counter phi(z) = sum of pixels when D is 2x2 SUM pooling (4 x 'area'), on
    random 16x16 images: L_feat = 0. With several methods, each image of a batch gets the
    output of one of them, drawn by the key, and a batch of 16 uses more than one; every
    method other than 'area' is jax.image.resize with antialiasing. Mutations tried: tiles
    in column-major order fails the hand values; 'area' as a 2x2 max fails them too."""
    x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    imgs = jax.random.uniform(jax.random.PRNGKey(0), (16, 16, 16, 1))
    key = jax.random.PRNGKey(3)
    methods = ("cubic", "linear", "lanczos3", "area")

    def views(x, imgs, key):  # one program (XLA's lowest level)
        one = [counting.downsample(imgs, m) for m in methods]
        ref = [jax.image.resize(imgs, (16, 8, 8, 1), m, antialias=True) for m in methods[:3]]
        return (
            counting.tiles(x),
            counting.downsample(x, "area"),
            counting.tiles(imgs),
            one,
            ref,
            counting.random_downsample(key, imgs, methods),
        )

    t, d, t16, one, ref, mixed = compiled(views, x, imgs, key)
    want = [[[0, 1], [4, 5]], [[2, 3], [6, 7]], [[8, 9], [12, 13]], [[10, 11], [14, 15]]]
    np.testing.assert_array_equal(t[0, ..., 0], want)
    np.testing.assert_allclose(d[0, ..., 0], [[2.5, 4.5], [10.5, 12.5]])
    phi = lambda z: z.sum((-3, -2, -1))[..., None]  # (B, 1): the "count" of pixel mass
    _, l_feat, _, _ = counting.counting_loss(phi(4 * one[3]), phi(t16), 10.0)
    assert float(l_feat) < 1e-8, l_feat
    for a, b in zip(one[:3], ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    pick = np.asarray(jax.random.randint(key, (16,), 0, 4))
    assert len(set(pick.tolist())) > 1
    for i in range(16):
        np.testing.assert_allclose(mixed[i], one[pick[i]][i], rtol=1e-6)


def test_counting_loss_by_hand():
    """Three images (with two, y_b = x_{b-1} and y_b = x_{b+1} coincide, and so do the
    roles of x and y): phi(D o x) = [[1, 0], [0, 2], [3, 0]], sum_i phi(T_i o x) = [[1, 1],
    [0, 0], [2, 1]] (split over 4 tiles), M = 10, y_b = x_{b-1}: L_feat = mean(1, 4, 2) =
    7/3; phi(D o y) = [[3, 0], [1, 0], [0, 2]], distances 5, 1, 5, L_diff = mean(5, 9, 5)
    = 19/3; L = 26/3; without the contrastive term L = 7/3; count_ratio = (7/3) / (11/3);
    0 / 0 -> 1. Mutations tried: rolling by 0 (y = x) fails L_diff; the hinge on the
    unsquared distance fails it too; the roles swapped, ||phi(D o x) - sum_i phi(T_i o
    y)||^2 (distances 2, 2, 9), fails L_diff (it passed the former two-image case);
    y_b = x_{b+1} (roll by -1) fails it too."""
    phi_d = jnp.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    sum_t = jnp.array([[1.0, 1.0], [0.0, 0.0], [2.0, 1.0]])
    phi_t = sum_t[:, None, :] / 4 * jnp.ones((1, 4, 1))  # (3, 4, 2)
    loss, l_feat, l_diff, dist = counting.counting_loss(phi_d, phi_t, 10.0)
    np.testing.assert_allclose(
        [loss, l_feat, l_diff, dist], [26 / 3, 7 / 3, 19 / 3, 11 / 3], rtol=1e-6
    )
    broken = counting.counting_loss(phi_d, phi_t, 10.0, contrastive=False)
    np.testing.assert_allclose(broken[0], 7 / 3, rtol=1e-6)
    np.testing.assert_allclose(counting.count_ratio(l_feat, dist), 7 / 11, rtol=1e-6)
    assert float(counting.count_ratio(jnp.float32(0), jnp.float32(0))) == 1.0


CHUNK = 10
"""updates per chunk: the purity test reruns the first chunk, not the run"""

RUN_ARGS = cli_args(TINY, counting.Config()) + [
    "--num-seeds",
    str(SEEDS),
    "--log-every",
    str(CHUNK),
    "--no-progress",
]


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """TINY through the CLI entry point, once, with --plot: SEEDS seeds in chunks of CHUNK
    updates (one compiled program), then evaluate(); with the compiled chunks and inputs."""
    run_dir = tmp_path_factory.mktemp("count")
    return main_recording_chunks(
        counting.main, RUN_ARGS + ["--run-dir", str(run_dir), "--plot", str(run_dir / "p.png")]
    )


@pytest.fixture(scope="module")
def quick_run(recorded_run):
    return recorded_run[0]


def test_counts_stay_apart_where_the_broken_variant_collapses(recorded_run):
    """Behaviour ([1] Sec. 3): TINY (40 steps of 32 images), 2 seeds, against the broken
    variant of the catalogue, the same training without L_diff, in this test. Measured
    (2-core CPU, loaded), the method / the broken variant at the last update:
        mean ||phi(D o x)||    5.53 5.86 (held out 5.42 5.53)  /  0 0 (collapsed)
        L_diff (M = 10)        2.42 3.41 (held out 2.82 3.09)  /  10 10
        L_feat                 1.76 2.10                       /  2e-7 1e-7
        held-out count_ratio   0.114 0.127 (L_feat / ||phi(D o y) - sum_i phi(T_i o x)||^2)
    and at init (the run's initial networks, held out): ||phi|| 0.38 0.42, L_feat 0.85 1.33,
    L_diff 9.15 8.67, count_ratio 0.998 0.996. The catalogue's gate "held-out L_feat < 10%
    of its value at init" is asserted per squared count, L_feat / ||phi(D o x)||^2: 6.0 7.5
    at init, 0.072 0.062 trained (1.2% and 0.8% of init). L_feat itself grows (2.12 1.90),
    because ||phi|| grows 14-fold from a near-zero init; in the quick run (module
    docstring) it falls to 3% of init (0.316 vs 9.44).
    Without L_diff ||phi|| falls below 1e-3 within about 20 updates (L_feat alone is minimised by
    phi = 0). The probes are printed, not asserted: on digits the counting features do
    not beat the same network at random init (see the quick run in the module docstring).
    Mutations tried: L = L_feat whatever `contrastive` says (the method collapses too:
    ||phi|| 0 0) fails the norm gate; tiles cut from the previous image of the batch
    instead of x's own fails the held-out gates; L = L_diff alone fails the count_ratio
    gate (0.997 0.993), and its values fail the per-squared-count gate too (8.7 8.6
    against 6.0 7.5 at init); apply_views returning the first tile's conv map (conv[b:2b]) for
    the probes fails the conv check against D o x's map."""
    m = TINY.margin
    quick_run, chunks = recorded_run
    held_out = jnp.asarray(counting.train_images(TINY)[2])

    def stats_at_init(p):  # held-out loss terms and pooled conv of an initial network
        stats, _, _, conv = counting.count_stats(p, held_out, TINY)
        dx = counting.downsample(counting.upsample(held_out, TINY), "area")
        ref = counting.Counter(TINY).apply({"params": p}, dx)[1].mean((1, 2))  # D o x alone
        return stats, conv, ref

    init, conv, ref = compiled(jax.vmap(stats_at_init), chunks[0][1].params)
    np.testing.assert_allclose(conv, ref, rtol=1e-5, atol=1e-6)  # probes read D o x's map
    init = {k: np.asarray(v) for k, v in init.items()}
    broken_cfg = dataclasses.replace(TINY, contrastive=False)
    train = jax.vmap(run.make_train(counting.init, counting.update, broken_cfg))
    _, hist = compiled(train, run.seed_keys(0, SEEDS))
    broken = {k: np.asarray(v)[:, -1] for k, v in hist.items()}
    trained = {k: v[:, -1] for k, v in quick_run.history.items()}
    final = quick_run.final
    print("trained", trained, final, "at init", init, "broken", broken)
    np.testing.assert_allclose(hist["losses/counting"], hist["losses/feat"])
    assert (broken["charts/count_norm"] < 1e-3).all(), broken  # collapsed: phi = 0
    assert (broken["losses/diff"] > 0.99 * m).all(), broken
    for norm in (trained["charts/count_norm"], final["test_count_norm"]):
        assert (norm > 1.0).all(), (trained, final)  # not collapsed, held-out too
    assert (trained["losses/diff"] < 0.6 * m).all(), trained
    assert (final["test_diff"] < 0.6 * m).all(), final
    assert (final["test_count_ratio"] < 0.3).all(), final  # the tiles' counts add up
    # the catalogue's gate, held-out L_feat < 10% of its value at init, per squared count
    # (phi grows 14-fold from init, so L_feat itself grows: 0.85 1.33 -> 2.12 1.90)
    rel_init = init["feat"] / init["count_norm"] ** 2
    rel = final["test_feat"] / final["test_count_norm"] ** 2
    assert (rel < 0.1 * rel_init).all(), (rel, rel_init)


def test_train_is_pure_and_cli_writes_its_files(recorded_run, capsys):
    """Same keys: the runner's initial states of seed 0 again, and its first chunk rerun
    from them, are bit-identical to the run's; the two seeds differ; L = L_feat + L_diff
    in every logged update; the run wrote its files and the plot; --help documents every
    field. Mutations tried: D's method drawn from host randomness (a pure_callback, so an
    impure update) fails the chunk rerun; L = L_feat + L_diff / 2 fails the sum check."""
    quick_run, chunks = recorded_run
    with pytest.raises(SystemExit):
        counting.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(counting.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out
    assert (quick_run.run_dir / "metrics.jsonl").exists()
    assert (quick_run.run_dir / "p.png").stat().st_size > 1000
    h = quick_run.history
    assert h["losses/counting"].shape == (SEEDS, TINY.num_updates)
    assert np.isfinite(h["losses/counting"]).all()
    np.testing.assert_allclose(h["losses/counting"], h["losses/feat"] + h["losses/diff"], rtol=1e-5)
    assert not np.array_equal(h["losses/counting"][0], h["losses/counting"][1])
    first_chunk, first_input = chunks[0]
    assert len(chunks) == TINY.num_updates // CHUNK
    jax.tree.map(
        np.testing.assert_array_equal,
        first_input,
        run.initial_states(counting.init, TINY, 0, SEEDS),
    )
    state, metrics = first_chunk(first_input)
    jax.tree.map(np.testing.assert_array_equal, state.params, chunks[1][1].params)
    np.testing.assert_array_equal(h["losses/counting"][:, :CHUNK], metrics["losses/counting"])


def test_bad_values_fail_with_named_field(tmp_path):
    """Each bad value on top of TINY fails before anything compiles, naming the field (on
    TINY, so a missing check runs one tiny update and fails here instead of starting the
    paper-size run). Mutation tried: margin 0 allowed (`< 0`) fails with DID NOT RAISE."""
    for i, (flags, msg) in enumerate(
        (
            (["--image-size", "15"], "image_size=15 must be even"),
            (["--margin", "0"], "margin=0.0 must be > 0"),
            (["--lr", "0"], "--lr must be > 0"),
            (["--batch-size", "1"], "batch_size=1 must be >= 2"),
            (["--downsample-methods", "box"], "downsample_methods=('box',)"),
            (["--pool-after", "7"], "pool_after=(7,)"),
            (["--count-dim", "0"], "count_dim=0 must be >= 1"),
            (["--probe-per-class", "200"], "probe_per_class=200 exceeds the rarest"),
        )
    ):
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            counting.main(
                RUN_ARGS + flags + ["--num-updates", "1", "--run-dir", str(tmp_path / str(i))]
            )


def test_every_config_field_is_read():
    """Mutation tried: update passing contrastive=True instead of cfg.contrastive fails."""
    assert unread_fields(counting) == []


def test_paper_preset_traces():
    """eval_shape of init and one update under `paper`: 228-px images, 114-px views, the
    AlexNet (conv1 11x11 stride 4 -> 29, pool 14, conv2, pool 6, conv3-5, pool5 2x2x256),
    fc6 and fc7 of 4096, fc8 of K = 1000 counts, batch 256: nothing runs. Mutation tried:
    conv4 at stride 2 in the preset fails the fc6 shape."""
    cfg, state, (after, metrics) = trace_paper(counting)
    p = state.params
    assert cfg.view_size == 114 and cfg.num_updates == 300_000 and cfg.margin == 10.0
    assert p["Conv_0"]["kernel"].shape == (11, 11, 1, 96)
    assert p["Dense_0"]["kernel"].shape == (2 * 2 * 256, 4096)
    assert p["Dense_2"]["kernel"].shape == (4096, 1000)
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
