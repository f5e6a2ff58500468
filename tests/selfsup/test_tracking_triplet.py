"""Tests of selfsup/tracking_triplet.py: the cosine triplet loss (zero past the margin, optax
after mapping distances), the negative selection (hard mining takes the argmax-loss
negative, candidates exclude the own pair and unmined pairs), the motion-patch miner, the
shape label, behaviour against the broken variant (x+ from another track) and the encoder
at init, purity, CLI and the paper preset."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import run
from common import video as vid
from selfsup import tracking_triplet as tt
from tests.common.cli import cli_args
from tests.common.compiled import compiled, main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# One tiny configuration for every test of the module: 24x24 colour frames, 16-frame
# tracks, 12x12 patches, a 2-conv CNN (8, 16 channels) to a 32-d feature, 16 pairs per step,
# hard mining (half of K = 4) from step 20, 60 Adam steps; 32 held-out retrieval pairs.
TINY = tt.Config(frame_size=24, patch_size=12, num_frames=16, radius=(0.1, 0.16),
                 speed=(0.0, 0.06), conv_channels=(8, 16), conv_kernels=(3, 3),
                 conv_strides=(1, 1), pool_after=(1, 2), fc_features=(32, 32), batch_size=16,
                 num_steps=60, hard_after=20, optimizer="adam", lr=2e-3, weight_decay=0.0,
                 num_eval_pairs=32, probe_train=100, probe_test=100, knn_k=10,
                 shift_conv=True)


def test_triplet_loss_zero_past_margin_and_matches_optax_on_mapped_distances():
    """[1] Eq. 1-2 with hand unit features (e_i basis vectors in 3-d): pair 0 has
    cos(x, x+) = 1 (D = 0), pair 1 cos = 0.6 (D = 0.4). Every candidate's loss is
    max(0, D(x, x+) - D(x, x-) + 0.5): zero exactly where D(x, x-) >= D(x, x+) + M. Candidates
    exclude the own pair's x and x+ and the patches of invalid pairs. optax's
    triplet_margin_loss on 1-d "embeddings" anchor 0, positive D(x, x+), negative D(x, x-)
    (its distances are then the cosine distances) gives the same numbers. The batch loss is
    the mean over valid pairs and selected negatives. Mutations tried: the hinge's sign
    flipped; the own pair not excluded from the candidates: both fail."""
    e = jnp.eye(3)
    fa = jnp.stack([e[0], e[0], e[2]])
    fp = jnp.stack([e[0], 0.6 * e[0] + 0.8 * e[1], e[2]])
    valid = jnp.array([True, True, False])
    d_pos = 1 - np.sum(np.asarray(fa) * np.asarray(fp), -1)
    d_neg = 1 - np.asarray(fa) @ np.concatenate([fa, fp]).T
    cfg = dataclasses.replace(TINY, num_negatives=1, hard_fraction=1.0)

    def parts(fa, fp, d_pos, d_neg):
        ref = optax.losses.triplet_margin_loss(
            jnp.zeros((3, 6, 1)), jnp.broadcast_to(d_pos[:, None, None], (3, 6, 1)),
            d_neg[..., None], margin=0.5, eps=0.0)
        return (tt.triplet_losses(fa, fp, valid, 0.5), ref,
                tt.triplet_loss(jax.random.PRNGKey(0), fa, fp, valid, True, cfg))

    (losses, mask), ref, (loss, _) = compiled(parts, fa, fp, d_pos, d_neg)
    want = np.maximum(d_pos[:, None] - d_neg + 0.5, 0)
    np.testing.assert_allclose(losses, want, atol=1e-6)
    assert (np.asarray(losses)[d_neg >= d_pos[:, None] + 0.5] == 0).all()
    np.testing.assert_allclose(losses[0, 4], 0.1, atol=1e-6)  # pair 0, x+ of pair 1: D 0.4
    np.testing.assert_allclose(losses[1, 0], 0.4 - 0.0 + 0.5, atol=1e-6)  # x of pair 0: D 0
    np.testing.assert_allclose(losses[1, 2], 0.0)  # x of pair 2: D = 1 >= 0.4 + 0.5
    np.testing.assert_array_equal(mask, [[0, 1, 0, 0, 1, 0], [1, 0, 0, 1, 0, 0],
                                         [1, 1, 0, 1, 1, 0]])
    np.testing.assert_allclose(losses, ref, atol=1e-6)
    np.testing.assert_allclose(loss, (want[0, 1] + want[1, 0]) / 2, atol=1e-6)

def test_hard_mining_takes_argmax_loss_negatives_random_ones_stay_in_mask():
    """[1] Sec. 3.3: once hard, the first num_hard negatives are the largest losses among
    the candidates (the argmax first), the rest distinct others; before, K distinct random
    candidates, spread over the candidates across keys."""
    key = jax.random.PRNGKey(0)
    losses = jax.random.uniform(key, (8, 14))
    mask = jax.random.uniform(jax.random.PRNGKey(1), (8, 14)) > 0.3
    masked = np.where(mask, losses, -np.inf)

    def parts(k):
        hard = tt.select_negatives(k, losses, mask, True, 4, 2)
        rand = jax.vmap(lambda kk: tt.select_negatives(kk, losses, mask, False, 4, 2))(
            jax.random.split(k, 200))
        return hard, rand

    hard, rand = (np.asarray(a) for a in compiled(parts, key))
    np.testing.assert_array_equal(hard[:, 0], masked.argmax(1))
    np.testing.assert_array_equal(hard[:, :2], np.argsort(-masked, 1)[:, :2])
    m = np.asarray(mask)
    for i in range(8):
        assert len(set(hard[i])) == 4 and m[i, hard[i]].all()
        assert all(len(set(r)) == 4 and m[i, r].all() for r in rand[:, i])
        np.testing.assert_array_equal(np.unique(rand[:, i]), np.flatnonzero(m[i]))


def test_motion_miner_keeps_moving_patch_drops_static_and_reads_shape():
    """Miner (the IDT stand-in): two sprites drawn with common/video.py's silhouettes, a
    square moving 2 px between frames 0 and 1 and a static disk: the square's patch has
    moving pixels, the disk's none; mine_pair picks the square, valid, with x cut at its
    frame-0 centre and x+ at its last one; with both static the pair is dropped. The shape
    label reads square 1, disk 0 from the masks at radii 2.5-6. Mutations tried: the miner
    keeps the least moving sprite (argmin); the shape threshold 3 r^2: both fail."""
    cfg = dataclasses.replace(TINY, frame_size=32, num_sprites=2, channels=1)
    spec = cfg.spec()
    r, shape = jnp.array([3.0, 3.0]), jnp.array([1, 0])

    def video(pos):  # (T, 2, 2)
        masks = jax.vmap(lambda p: vid.silhouettes(p, r, shape, spec))(pos)
        frames = 0.9 * masks.any(1)[..., None].astype(jnp.float32)
        return vid.Video(frames, masks, jnp.zeros(frames.shape[:3], jnp.int32), pos, pos, r)

    still = jnp.array([[8.0, 8.0], [22.0, 22.0]])
    moving = jnp.stack([still, still.at[0].add(2.0), still.at[0].add(4.0)])

    def shapes(rad):
        rr = jnp.array([rad, rad])
        masks = vid.silhouettes(still, rr, shape, spec)[None]
        v = vid.Video(masks[..., None], masks, masks[..., 0].astype(jnp.int32), still[None],
                      still[None], rr)
        return jnp.stack([tt.shape_label(v, i) for i in (0, 1)])

    def parts(moving):
        v_move, v_still = video(moving), video(jnp.stack([still] * 3))
        return (v_move.frames, tt.motion_score(v_move.frames[0], v_move.frames[1], still, cfg),
                tt.mine_pair(v_move, cfg), tt.mine_pair(v_still, cfg)[2],
                jax.vmap(shapes)(jnp.array([2.5, 4.0, 6.0])))

    frames, score, (x, x_pos, valid, k), valid_still, labels = compiled(parts, moving)
    assert float(score[0]) > 0.05 and float(score[1]) == 0.0
    assert int(k) == 0 and bool(valid) and not bool(valid_still)
    np.testing.assert_array_equal(x, frames[0, 2:14, 2:14])
    np.testing.assert_array_equal(x_pos, frames[2, 6:18, 6:18])
    np.testing.assert_array_equal(labels, [[1, 0]] * 3)

# Seeds 0 and 1 train; seed BROKEN the broken variant (x+ from the next pair's track);
# seed FROZEN the encoder at init (no update): all in the run's one vmapped program, in
# chunks of CHUNK updates (the purity test reruns one chunk).
SEEDS, BROKEN, FROZEN = 2, 2, 3
CHUNK = 30
RUN_ARGS = cli_args(TINY, tt.Config()) + [
    "--num-seeds", str(SEEDS + 2), "--log-every", str(CHUNK), "--no-progress"]


def _arms(states):
    return states.replace(arm=jnp.array([0] * SEEDS + [1, 2], jnp.int32))


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """TINY through the CLI entry point, once: SEEDS + 2 seeds (the runner's initial states
    with the arms set), then evaluate(); with the compiled chunks and their inputs."""
    real_initial_states = run.initial_states
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run, "initial_states", lambda *a: _arms(real_initial_states(*a)))
        return main_recording_chunks(tt.main, RUN_ARGS + [
            "--run-dir", str(tmp_path_factory.mktemp("tracking_triplet"))])


def test_retrieval_beats_init_and_broken_variant(recorded_run):
    """Behaviour ([1] Sec. 3): TINY, 60 steps; held-out retrieval top-1 among 32 pairs
    (chance 0.031). Measured on a loaded 2-core CPU: trained 0.310 0.241; broken (x+ from
    the next pair's track) 0.103; encoder at init (frozen arm) 0.069: the broken arm stays
    at the init's level (above chance: even random features match a sprite's colour), not
    at chance. The shape probes are not asserted: at TINY they are noise (0.54-0.64 in every
    arm). Mutations tried: broken flag ignored (x+ always the true track): fails; frozen
    flag ignored (the baseline arm trains): fails."""
    f = recorded_run[0].final
    top1 = f["retrieval_top1"]
    print({k: np.round(v, 3) for k, v in f.items()})
    assert (top1[:SEEDS] >= top1[FROZEN] + 0.1).all(), top1
    assert (top1[:SEEDS] >= top1[BROKEN] + 0.1).all(), top1


def test_train_is_pure_and_cli_writes_its_files(recorded_run, capsys):
    """Same keys: the runner's initial states again, and the first chunk rerun from them,
    are bit-identical to the run's; the two training seeds differ; the frozen arm's
    parameters stay at init; hard mining switches on at hard_after; --help documents every
    field. Mutation tried: frozen flag ignored: fails (the frozen parameters move)."""
    res, chunks = recorded_run
    with pytest.raises(SystemExit):
        tt.main(["--help"])
    out = capsys.readouterr().out
    for fld in dataclasses.fields(tt.Config):
        assert "--" + fld.name.replace("_", "-") in out, fld.name
    assert "Presets (--preset): quick, paper" in out
    assert (res.run_dir / "metrics.jsonl").exists()
    h = res.history["losses/triplet"]
    assert h.shape == (SEEDS + 2, TINY.num_updates) and np.isfinite(h).all()
    assert not np.array_equal(h[0], h[1])
    np.testing.assert_array_equal(res.history["charts/hard"][0],
                                  np.arange(TINY.num_updates) >= TINY.hard_after)
    first_chunk, first_input = chunks[0]
    assert len(chunks) == TINY.num_updates // CHUNK
    again = _arms(run.initial_states(tt.init, TINY, 0, SEEDS + 2))
    jax.tree.map(np.testing.assert_array_equal, first_input, again)
    state, metrics = first_chunk(jax.tree.map(jnp.copy, first_input))  # the chunk donates
    jax.tree.map(np.testing.assert_array_equal, state.params, chunks[1][1].params)
    np.testing.assert_array_equal(h[:, :CHUNK], metrics["losses/triplet"])
    frozen = lambda s: jax.tree.map(lambda a: a[FROZEN], s.params)
    jax.tree.map(np.testing.assert_array_equal, frozen(res.state), frozen(first_input))


def test_bad_values_fail_with_named_field(tmp_path):
    for flags, msg in ((["--patch-size", "500"], "patch_size=500 must be in"),
                       (["--num-negatives", "79"], "num_negatives=79 must be in"),
                       (["--hard-fraction", "2"], "--hard-fraction must be in"),
                       (["--conv-kernels", "3"], "must be non-empty and of equal length")):
        with pytest.raises(ValueError, match=msg):
            tt.main(flags + ["--run-dir", str(tmp_path)])


def test_every_config_field_is_read():
    assert unread_fields(tt) == []


def test_paper_preset_traces():
    """eval_shape of init and one update under `paper`: 40 pairs of 227x227 RGB patches from
    454x454 frames, 30-frame tracks, AlexNet (conv1 11x11/4 96 ... fc6 4096, fc7 1024),
    M = 0.5, K = 4; nothing runs."""
    cfg, state, (after, metrics) = trace_paper(tt)
    assert (cfg.patch_size, cfg.num_frames, cfg.batch_size, cfg.margin, cfg.num_negatives) == (
        227, 30, 40, 0.5, 4)
    p = state.params
    assert p["Conv_0"]["kernel"].shape == (11, 11, 3, 96)
    assert p["Dense_0"]["kernel"].shape == (8 * 8 * 256, 4096)
    assert p["Dense_1"]["kernel"].shape == (4096, 1024)
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
