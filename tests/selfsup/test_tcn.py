"""Tests of selfsup/tcn.py: the triplet loss and the semi-hard mining by hand, the sampler's
positive and negative windows, the renderer, behaviour against the network at init and a
broken variant (positives at random times) in one run, purity, CLI and the paper preset."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import run
from selfsup import tcn
from tests.common.cli import cli_args
from tests.common.compiled import compiled, main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# One tiny configuration for every test of the module: 32x32 frames, 64-frame sequences,
# 4 sequences x 8 pairs per batch, the quick preset's network, few held-out sequences.
TINY = tcn.Config(**{**tcn.PRESETS["quick"], "total_updates": 200, "eval_sequences": 4,
                     "eval_length": 32})
SEEDS = 2


def test_triplet_loss_by_hand():
    """[1] Eq. 2 with alpha = 0.2 on three triplets in 2-d: a = 0 for all, p = (0.3, 0),
    (0, 0.1), (1, 0); n = (0, 0.5), (0.2, 0), (0, 0.2): ||a-p||^2 = .09, .01, 1 and
    ||a-n||^2 = .25, .04, .04, so the hinges are max(0, .09 - .25 + .2) = .04,
    .01 - .04 + .2 = .17 and 1 - .04 + .2 = 1.16: mean 1.37 / 3; with the third triplet's
    weight 0 (no valid negative): (.04 + .17) / 2. Mutations tried: unsquared distances
    (optax's triplet_margin_loss form) fail the values; the weight ignored fails the
    second."""
    a = jnp.zeros((3, 2))
    p = jnp.array([[0.3, 0.0], [0.0, 0.1], [1.0, 0.0]])
    n = jnp.array([[0.0, 0.5], [0.2, 0.0], [0.0, 0.2]])
    out = compiled(lambda a, p, n: (tcn.triplet_loss(a, p, n, 0.2),
                                    tcn.triplet_loss(a, p, n, 0.2, jnp.array([1.0, 1, 0]))),
                   a, p, n)
    np.testing.assert_allclose(out, [1.37 / 3, 0.21 / 2], rtol=1e-5)


def test_semihard_mining_and_the_loss_update_runs_by_hand():
    """FaceNet's semi-hard negative (tcn.mine_negatives, as tcn_loss uses it) on four
    anchors on a line, x = 0, 1, 3, 6 (one view, times 0, 10, 20, 30) with positives at
    x + 0.5, except anchor 3 whose positive is at x + 5. Multiview: every other time is a
    candidate. Anchor 0 (d_ap = .25): candidates at squared distance 1, 9, 36; the closest
    farther than .25 is anchor 1. Anchor 3 (d_ap = 25): 9, 25, 36 -> anchor 0 (36 > 25,
    25 is not farther). Single view with neg_radius = 15: anchor 0's candidates are times
    20, 30 -> anchor 2; anchor 1's (time 10) are only time 30 -> 3; anchor 3's 0 and 10
    (36, 25) -> 0. With every candidate nearer than the positive, the farthest is used.
    tcn_loss (alpha = 1) then gives the hinge mean by hand: negatives 1, 0, 1, 0 at 1, 1,
    4, 36: (.25 + .25 + 0 + 0) / 4. Random mining only ever picks candidates. Mutations
    tried: argmin over all candidates (hardest, not semi-hard) fails anchor 3 (picks 2 in
    multiview, 1 in single view); the mask ignored fails the single-view picks; no fallback to
    the farthest fails the last case."""
    x = jnp.array([0.0, 1.0, 3.0, 6.0])
    a = jnp.stack([x, jnp.zeros(4)], -1)
    p = a + jnp.array([[0.5, 0], [0.5, 0], [0.5, 0], [5.0, 0]])
    t = jnp.array([0, 10, 20, 30])
    mv = dataclasses.replace(TINY, variant="multiview", mining="semihard", margin=1.0)
    sv = dataclasses.replace(mv, variant="singleview", neg_radius=15, pos_radius=2)
    key = jax.random.PRNGKey(0)

    def everything(a, p, t):
        mine = lambda c, pp: tcn.mine_negatives(key, a, pp, tcn.negative_mask(t, c), c.mining)
        rnd = jax.vmap(lambda k: tcn.mine_negatives(
            k, a, p, tcn.negative_mask(t, sv), "random"))(jax.random.split(key, 200))
        return (mine(mv, p), mine(sv, p), mine(mv, a + 10.0), tcn.tcn_loss(key, a, p, t, mv),
                rnd)

    (i_mv, v_mv), (i_sv, v_sv), (i_far, _), (loss, valid), (i_rnd, _) = compiled(
        everything, a, p, t)
    np.testing.assert_array_equal(i_mv, [1, 0, 1, 0])
    assert v_mv.all() and float(valid) == 1.0
    np.testing.assert_array_equal(i_sv, [2, 3, 0, 0])
    np.testing.assert_array_equal(v_sv, [True, True, True, True])
    np.testing.assert_array_equal(i_far, [3, 3, 0, 0])  # positives 10 away: the farthest
    d_ap = np.array([0.25, 0.25, 0.25, 25.0])
    d_an = np.array([1.0, 1.0, 4.0, 36.0])  # to anchors 1, 0, 1, 0
    np.testing.assert_allclose(loss, np.maximum(d_ap - d_an + 1.0, 0).mean(),
                               rtol=1e-6)
    allowed = np.abs(np.asarray(t)[:, None] - np.asarray(t)[None]) > 15
    assert all(allowed[i, j] for row in np.asarray(i_rnd) for i, j in enumerate(row))
    assert len({tuple(r) for r in np.asarray(i_rnd)}) > 1


def test_sampler_positive_and_negative_windows():
    """Over 500 draws: multiview anchors are distinct times inside one window of `window`
    frames, positives the same times, from the other view; singleview positives lie
    1..pos_radius frames away (both signs, inside the video), from the anchor's view;
    broken (the shuffle flag) positives are anywhere. negative_mask admits every other time
    (multiview) or only gaps above neg_radius (singleview). Mutations tried: a positive
    allowed at delta 0 fails "never 0"; no reflection at the ends fails "inside"; the
    window ignored (anchors anywhere in the video) fails the span."""
    mv = dataclasses.replace(TINY, window=20, frames_per_sequence=6)
    sv = dataclasses.replace(mv, variant="singleview")
    keys = jax.random.split(jax.random.PRNGKey(1), 500)

    def draws(keys):
        f = lambda c, b: jax.vmap(lambda k: tcn.sample_times(k, c, b))(keys)
        views = lambda c: jax.vmap(lambda k: jnp.stack(tcn.sample_views(k, c)))(keys)
        t = jnp.array([0, 3, 4, 9])
        return (f(mv, False), f(sv, False), f(mv, True), views(mv), views(sv),
                tcn.negative_mask(t, mv), tcn.negative_mask(t, sv))

    (ma, mp), (sa, sp), (_, bp), vm, vs, nm, ns = jax.device_get(compiled(draws, keys))
    T = TINY.video_length
    assert (ma.max(1) - ma.min(1) < 20).all() and (ma.max(1) - ma.min(1)).max() == 19
    assert all(len(set(r)) == 6 for r in ma) and ma.min() >= 0 and ma.max() < T
    np.testing.assert_array_equal(mp, ma)
    d = sp - sa
    assert (np.abs(d) >= 1).all() and (np.abs(d) <= TINY.pos_radius).all()
    assert (d > 0).any() and (d < 0).any() and sp.min() >= 0 and sp.max() < T
    assert set(np.abs(d).ravel()) == set(range(1, TINY.pos_radius + 1))
    assert (np.abs(bp - ma) > TINY.pos_radius).mean() > 0.5
    assert (vm[:, 0] != vm[:, 1]).all() and (vs[:, 0] == vs[:, 1]).all()
    assert set(vm[:, 0]) == {0, 1}
    np.testing.assert_array_equal(nm, ~np.eye(4, dtype=bool))
    gap = np.abs(np.array([0, 3, 4, 9])[:, None] - np.array([0, 3, 4, 9])[None])
    np.testing.assert_array_equal(ns, gap > TINY.neg_radius)


def test_arm_and_renderer():
    """The arm's joints lie at the link lengths (post 0.5 up, then 1.0 and 0.8 along the
    pitches); yaw 0, shoulder 0, elbow 90 degrees puts the gripper at (1, 0, 1.3). Frames
    are in [0, 1], a function of (sequence, t, view, key); views and times differ."""
    pts, ids = tcn.arm_points(jnp.array([0.0, 0.0, jnp.pi / 2]))
    np.testing.assert_allclose(pts[-1], [1.0, 0.0, 1.3], atol=1e-6)
    np.testing.assert_allclose(pts[tcn.POINTS_PER_LINK - 1], [0, 0, 0.5], atol=1e-6)
    assert ids.tolist().count(3) == 1

    def frames(key):
        seq = tcn.sample_sequence(key, 2)
        r = lambda t, v, k: tcn.render(seq, t, v, k, TINY)
        return r(5, 0, key), r(5, 0, key), r(5, 1, key), r(40, 0, key)

    f0, again, other_view, later = jax.device_get(compiled(frames, jax.random.PRNGKey(3)))
    assert f0.shape == (32, 32, 3) and 0 <= f0.min() and f0.max() <= 1
    np.testing.assert_array_equal(f0, again)
    assert np.abs(f0 - other_view).mean() > 0.05 and np.abs(f0 - later).mean() > 0.005


# Seeds 0 and 1 train TCN, seed BROKEN (State.shuffle set) the broken variant, all in the
# run's one vmapped program, in chunks of CHUNK updates.
CHUNK = 50
BROKEN = 2
RUN_ARGS = cli_args(TINY, tcn.Config(**tcn.PRESETS["quick"]), "quick") + [
    "--num-seeds", str(SEEDS + 1), "--log-every", str(CHUNK), "--no-progress"]


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """TINY through the CLI entry point, once: SEEDS + 1 seeds (the last one the broken
    variant: the runner's initial states with shuffle set) in chunks of CHUNK updates, then
    evaluate() (which also scores every seed's network at init)."""
    real_initial_states = run.initial_states

    def initial_states(*args):
        states = real_initial_states(*args)
        return states.replace(shuffle=jnp.arange(SEEDS + 1) == BROKEN)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run, "initial_states", initial_states)
        return main_recording_chunks(tcn.main, RUN_ARGS + [
            "--run-dir", str(tmp_path_factory.mktemp("tcn"))])


def test_tcn_aligns_the_two_views(recorded_run):
    """Behaviour ([1] Sec. 4, alignment): TINY (200 updates), 2 seeds; the nearest-neighbour
    alignment error between the two views of 4 held-out sequences (32 frames each; random
    embeddings score about 1/3), against the same network at init and the broken variant
    (a third seed of the same run: positives at random times), and the triplet loss of the
    last 50 updates (a collapsed embedding sits at alpha = 0.2). Calibration run (2 seeds,
    the second one broken; loaded 2-core CPU, jax 0.10.2): alignment error trained 0.250,
    broken 0.273, init 0.338 0.350; within 2 frames 0.30 / 0.27 / 0.13; loss of the last 25
    updates 0.148 (trained) vs 0.201 (broken). With the spatial softmax's temperature at 1,
    the background spread over [0, 0.6] and smaller blobs, training collapsed (every
    embedding equal, loss 0.200, alignment 0.32-0.35 = init): the first mutation this test
    catches."""
    res, chunks = recorded_run
    np.testing.assert_array_equal(chunks[0][1].shuffle, np.arange(SEEDS + 1) == BROKEN)
    err = res.final["alignment_error"]
    init = res.final["init_alignment_error"]
    trained, broken = err[:SEEDS], err[SEEDS:]
    loss = res.history["losses/triplet"][:, -50:].mean(1)
    print("trained", trained, "broken", broken, "init", init, "loss", loss,
          "within_2", res.final["within_2"], "init_within_2", res.final["init_within_2"],
          "pose_r2", res.final["pose_r2"], "init_pose_r2", res.final["init_pose_r2"])
    assert (trained <= init[:SEEDS] - 0.05).all(), (trained, init)
    assert (trained <= broken - 0.01).all(), (trained, broken)
    assert (loss[:SEEDS] <= 0.19).all() and loss[SEEDS] >= 0.19, loss


def test_train_is_pure_and_cli_writes_its_files(recorded_run, capsys):
    """Same keys: the runner's initial states again, and the first chunk rerun from them,
    are bit-identical to the run's; the two unbroken seeds differ; the run wrote its
    files; --help documents every field."""
    res, chunks = recorded_run
    with pytest.raises(SystemExit):
        tcn.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(tcn.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out
    assert (res.run_dir / "metrics.jsonl").exists()
    h = res.history["losses/triplet"]
    assert h.shape == (SEEDS + 1, TINY.num_updates) and np.isfinite(h).all()
    assert not np.array_equal(h[0], h[1])
    first_chunk, first_input = chunks[0]
    again = run.initial_states(tcn.init, TINY, 0, SEEDS + 1)
    assert not np.asarray(again.shuffle).any()
    jax.tree.map(np.testing.assert_array_equal, first_input,
                 again.replace(shuffle=jnp.arange(SEEDS + 1) == BROKEN))
    state, metrics = first_chunk(jax.tree.map(jnp.copy, first_input))  # the chunk donates
    jax.tree.map(np.testing.assert_array_equal, state.params, chunks[1][1].params)
    np.testing.assert_array_equal(h[:, :CHUNK], metrics["losses/triplet"])


def test_bad_values_fail_with_named_field(tmp_path):
    for flags, msg in ((["--variant", "mfview"], "variant='mfview'"),
                       (["--mining", "hard"], "mining='hard'"),
                       (["--window", "700"], "window=700 must be in"),
                       (["--pos-radius", "12"], "pos_radius=12, neg_radius=12"),
                       (["--num-views", "1"], "num_views=1 must be >= 2"),
                       (["--lr", "0"], "--lr must be > 0")):
        with pytest.raises(ValueError, match=msg):
            tcn.main(flags + ["--run-dir", str(tmp_path)])


def test_every_config_field_is_read():
    assert unread_fields(tcn) == []


def test_paper_preset_traces():
    """eval_shape of init and one update under `paper`: 299x299 frames, two 512 convs, a
    spatial softmax (1024 keypoint coordinates), FC 2048, 32-d embedding, 36 pairs."""
    cfg, state, (after, metrics) = trace_paper(tcn)
    assert cfg.margin == 0.2 and cfg.embedding_size == 32 and cfg.batch_pairs == 36
    assert cfg.window == 580 and cfg.pos_radius == 6 and cfg.neg_radius == 12
    assert state.params["Dense_0"]["kernel"].shape == (1024, 2048)
    assert state.params["embedding"]["kernel"].shape == (2048, 32)
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
