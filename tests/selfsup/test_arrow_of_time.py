"""Tests of selfsup/arrow_of_time.py: the reversal of a clip and of its motion frames, the
clips' labels and group layout, the border cue and its removal, the loss, behaviour on
gravity videos against time-symmetric ones, purity, CLI and the paper preset; the cue test
in the slow tier."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import run
from common import video as vid
from selfsup import arrow_of_time as aot
from tests.common.cli import cli_args
from tests.common.compiled import compiled, main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# One tiny configuration for every test of the module: 16x16 frames (14x14 after a 1-pixel
# crop), T = 2 groups of 3 differences (7-frame clips), one sprite, a 2-conv trunk (8, 16
# channels, two pools) and one top conv of 32, 150 steps of 32 clips.
TINY = aot.Config(frame_size=16, group_frames=3, num_sprites=1, restitution=0.3,
                  border_crop=1, cue_width=1,
                  trunk_channels=(8, 0, 16, 0), top_channels=(32,), dropout=0.0,
                  batch_size=32, num_steps=150, lr=0.05, lr_drop_steps=1000,
                  num_eval_clips=512, shift_conv=True)
SEEDS = 2
CONSTANT = 1  # the seed whose training videos are time-symmetric (gravity 0, restitution 1)


@pytest.fixture(scope="module")
def pieces(recorded_run):
    """One compiled program for the equation tests: reversal and motion frames of a random
    clip, 8 gravity videos and make_clips (the function update runs) from the same key, the
    BCE of two logits, TINY's TCAM on the clips (all params; the top Conv_0 kernel's half
    that reads z_2 zeroed) with group 1 or 2 perturbed, and the optimiser's first two
    updates on zero gradients and its schedule around lr_drop_steps. The network's
    variables are seed 0's initial ones from the recorded run (no init compiled here)."""
    cfg = TINY
    x = np.random.default_rng(0).uniform(size=(7, 4, 4, 1)).astype(np.float32)
    key = jax.random.PRNGKey(3)

    first = jax.tree.map(lambda a: a[0], recorded_run[1][0][1])  # seed 0's initial state
    variables = {"params": first.params, "batch_stats": first.batch_stats}

    def parts(x, key, variables):
        k_vid, _ = jax.random.split(key)
        videos = jax.vmap(lambda k: vid.make_video(k, cfg.spec(), cfg.gravity * 16,
                                                   cfg.restitution))(jax.random.split(k_vid, 8))
        clips, labels = aot.make_clips(key, 8, cfg.gravity, cfg.restitution, 0.0, cfg)
        p, f = variables["params"], cfg.trunk_channels[-2]  # F: channels per group
        cut = {**p, "Conv_0": {**p["Conv_0"], "kernel": p["Conv_0"]["kernel"].at[:, :, f:].set(0)}}
        net = lambda params, x: aot.TCAM(cfg).apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x, train=False)
        noise = jax.random.normal(key, clips.shape[:1] + clips.shape[2:])
        x1, x2 = clips.at[:, 0].add(noise), clips.at[:, 1].add(noise)
        both = jax.tree.map(lambda a, b: jnp.stack([a, b]), p, cut)  # one network, vmapped
        logits = jax.vmap(lambda q: jax.vmap(lambda c: net(q, c))(jnp.stack([clips, x1, x2])))(
            both).reshape(6, -1)
        tx, sched = aot.make_optimizer(cfg)
        zeros = jax.tree.map(jnp.zeros_like, p)
        u1, s1 = tx.update(zeros, tx.init(p), p)
        u2, _ = tx.update(zeros, s1, p)
        return dict(rev=aot.reverse(x), d=aot.motion_frames(x),
                    d_rev=aot.motion_frames(aot.reverse(x)), frames=videos.frames, clips=clips,
                    labels=labels, bce=aot.aot_loss(jnp.array([2.0, -1.0]), jnp.array([1, 1])),
                    logits=logits, p=p, u1=u1, u2=u2,
                    lr=[sched(cfg.lr_drop_steps - 1), sched(cfg.lr_drop_steps)])

    return x, compiled(parts, x, key, variables)


def test_reversal_of_clip_and_motion_frames_and_clip_layout(pieces):
    """reverse(x)[t] = x[N - 1 - t] and d_rev[t] = -d[N - 2 - t] on a random clip; make_clips
    (the function update runs) on 8 gravity videos: a clip labelled 1 holds the video's
    own differences, a clip labelled 0 those of the reversed video, group i's channels are
    differences iL .. iL + L - 1 of the cropped frames, and both labels occur."""
    x, o = pieces
    np.testing.assert_array_equal(o["rev"], x[::-1])
    np.testing.assert_allclose(o["d_rev"], -np.asarray(o["d"])[::-1], atol=1e-6)
    frames, clips, labels = (np.asarray(o[k]) for k in ("frames", "clips", "labels"))
    assert clips.shape == (8, 2, 14, 14, 3) and 0 < labels.sum() < 8
    for i in range(8):
        f = frames[i] if labels[i] else frames[i, ::-1]
        dd = np.diff(f[:, 1:-1, 1:-1, 0], axis=0)  # (6, 14, 14) cropped differences
        for g in range(2):
            np.testing.assert_allclose(clips[i, g], np.moveaxis(dd[3 * g:3 * g + 3], 0, -1),
                                       atol=1e-6)


def test_tcam_concatenates_groups_on_channels(pieces):
    """[z_1; z_2]: with the half of the top Conv_0 kernel that reads z_2 (input channels F
    .. 2F) zeroed, perturbing group 2 leaves the logits unchanged and perturbing group 1
    changes them; with all params, perturbing group 2 changes them too (a reshape without
    the moveaxis interleaves groups and space and fails here)."""
    (full, full1, full2, cut, cut1, cut2) = (np.asarray(a) for a in pieces[1]["logits"])
    np.testing.assert_array_equal(cut2, cut)
    assert np.abs(cut1 - cut).min() > 1e-6 and np.abs(full2 - full).min() > 1e-6


def test_optimizer_weight_decay_momentum_and_lr_drop(pieces):
    """make_optimizer (what update uses): on zero gradients the first update is
    -lr wd p and the second -lr wd p (1 + momentum) (SGD momentum on decayed weights); the
    schedule is lr before lr_drop_steps and lr / 10 from it."""
    o, c = pieces[1], TINY
    for u, scale in ((o["u1"], 1.0), (o["u2"], 1 + c.momentum)):
        jax.tree.map(lambda u, p, s=scale: np.testing.assert_allclose(
            u, -c.lr * c.weight_decay * s * np.asarray(p), rtol=1e-5, atol=1e-12), u, o["p"])
    np.testing.assert_allclose(o["lr"], [c.lr, c.lr / 10], rtol=1e-6)


def test_border_cue_and_its_removal():
    """The synthetic cue on a black 7-frame 8x8 clip, width 2, drift 0.3: the border ring
    reads 0.3 t / 6 at frame t, the 4x4 interior stays 0; its motion frames are 0.05 on the
    ring. Cropping 2 pixels (the cue removal) leaves all-zero motion frames; cropping 1
    leaves the cue; drift 0 leaves the clip untouched."""
    x = jnp.zeros((7, 8, 8, 1))

    def parts(x):
        cue = aot.add_border_cue(x, 0.3, 2)
        return (cue, aot.motion_frames(aot.crop_border(cue, 2)),
                aot.motion_frames(aot.crop_border(cue, 1)), aot.add_border_cue(x + 0.5, 0.0, 2))

    cue, d2, d1, none = (np.asarray(a) for a in compiled(parts, x))
    ring = np.ones((8, 8), bool)
    ring[2:6, 2:6] = False
    for t in range(7):
        np.testing.assert_allclose(cue[t, ..., 0][ring], 0.3 * t / 6, rtol=1e-6)
        assert (cue[t, 2:6, 2:6] == 0).all()
    assert d2.shape == (6, 4, 4, 1) and (d2 == 0).all()
    np.testing.assert_allclose(d1[:, 0, :, 0], 0.05, rtol=1e-5)
    assert (none == 0.5).all()


def test_aot_loss_by_hand(pieces):
    """BCE: logits [2, -1], labels [1, 1]: log(1 + e^-2) = 0.12693 and log(1 + e) =
    1.31326, mean 0.71009; accuracy 0.5 (logit > 0 reads "forward")."""
    loss, acc = pieces[1]["bce"]
    np.testing.assert_allclose(loss, (np.log1p(np.exp(-2)) + np.log1p(np.e)) / 2, rtol=1e-6)
    assert float(acc) == 0.5


# One chunk per 50 updates (one compiled program): the purity test reruns 50 updates.
# Seed 0 trains on gravity videos, seed CONSTANT on time-symmetric constant-velocity videos
# (State.gravity 0, restitution 1), in the run's one vmapped program.
CHUNK = 50
RUN_ARGS = cli_args(TINY, aot.Config()) + [
    "--num-seeds", str(SEEDS), "--log-every", str(CHUNK), "--no-progress"]


def _arms(states):
    return states.replace(gravity=jnp.where(jnp.arange(SEEDS) == CONSTANT, 0.0, states.gravity),
                          restitution=jnp.where(jnp.arange(SEEDS) == CONSTANT, 1.0,
                                                states.restitution))


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """TINY through the CLI entry point, once: seed 0 on gravity videos, seed CONSTANT on
    constant-velocity ones (the runner's initial states with the physics replaced), in
    chunks of CHUNK updates, then evaluate(); with the compiled chunks and their inputs."""
    real_initial_states = run.initial_states
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run, "initial_states", lambda *a: _arms(real_initial_states(*a)))
        return main_recording_chunks(aot.main, RUN_ARGS + [
            "--run-dir", str(tmp_path_factory.mktemp("arrow_of_time"))])


def test_arrow_of_time_learned_on_gravity_not_on_symmetric_videos(recorded_run):
    """Behaviour ([1] Sec. 3): TINY, 150 steps. The network trained on gravity videos with
    lossy bounces tells forward from backward on held-out gravity clips; the same network
    trained on time-symmetric constant-velocity videos (the baseline arm) does not, and
    no network beats chance on held-out time-symmetric clips, constant velocity or gravity
    with elastic bounces (no leakage of the label through the pipeline or the generator's
    gravity start state). TINY bounces keep 30% of the speed (restitution 0.3; with
    0.6 the gravity arm reached 0.69). Measured on a loaded 2-core CPU (held-out, 512
    clips each; with 256 the gravity arm's elastic score, 0.402, sat on the bound: an
    unlucky draw, 0.49-0.51 on three other sets of 1024):
        trained on gravity:  gravity 0.740, constant velocity 0.506, elastic 0.455
        trained on constant: gravity 0.484, constant velocity 0.455, elastic 0.492
    Mutations: elastic bounces in the training clips (restitution 1): the gravity arm
    reads 0.52, fails; reversed clips scaled by 1.05 (a leak): fails the constant-velocity
    bound."""
    f = recorded_run[0].final
    acc, sym, el = f["aot_acc"], f["aot_acc_constant"], f["aot_acc_elastic"]
    print("aot_acc", acc, "aot_acc_constant", sym, "aot_acc_elastic", el)
    assert acc[0] >= AOT_ACC > acc[CONSTANT], acc
    assert (np.abs(sym - 0.5) < 0.1).all(), sym
    assert (np.abs(el - 0.5) < 0.1).all(), el


AOT_ACC = 0.65
"""held-out gravity accuracy the method reaches and the time-symmetric arm does not"""


def test_train_is_pure_and_cli_writes_its_files(recorded_run, capsys):
    """Same keys: the runner's initial states again, and the first chunk rerun from them,
    are bit-identical to the run's; the two seeds' initial params and keys differ; the run
    wrote its files; the
    loss falls on gravity videos; --help documents every field."""
    res, chunks = recorded_run
    with pytest.raises(SystemExit):
        aot.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(aot.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out
    assert (res.run_dir / "metrics.jsonl").exists()
    h = res.history["losses/aot"]
    assert h.shape == (SEEDS, TINY.num_updates) and np.isfinite(h).all()
    assert h[0, -30:].mean() < h[0, :30].mean() - 0.1
    assert not np.array_equal(h[0], h[1])
    first_chunk, first_input = chunks[0]
    assert len(chunks) == TINY.num_updates // CHUNK
    again = _arms(run.initial_states(aot.init, TINY, 0, SEEDS))
    jax.tree.map(np.testing.assert_array_equal, first_input, again)
    assert not np.array_equal(again.key[0], again.key[1])
    kernels = [a for path, a in jax.tree_util.tree_flatten_with_path(again.params)[0]
               if "kernel" in jax.tree_util.keystr(path)]
    assert len(kernels) == 4 and not any(np.array_equal(a[0], a[1]) for a in kernels)
    state, metrics = first_chunk(jax.tree.map(jnp.copy, first_input))  # the chunk donates
    jax.tree.map(np.testing.assert_array_equal, state.params, chunks[1][1].params)
    np.testing.assert_array_equal(h[:, :CHUNK], metrics["losses/aot"])


def test_bad_values_fail_with_named_field(tmp_path):
    for flags, msg in ((["--restitution", "1.5"], "restitution=1.5 must be in"),
                       (["--border-crop", "112"], "border_crop=112 must be in"),
                       (["--radius", "0.2", "0.1"], "radius=\\(0.2, 0.1\\)"),
                       (["--radius", "0.1", "0.3"], "< 0.25 under gravity"),
                       (["--train-cue", "-1"], "train_cue=-1.0 must be >= 0"),
                       (["--dtype", "float16"], "dtype='float16'")):
        with pytest.raises(ValueError, match=msg):
            aot.main(flags + ["--run-dir", str(tmp_path)])


def test_evaluate_holds_no_data_constants():
    """evaluate makes its held-out clips inside the program (lax.map over kinds and chunks
    of batch_size): TINY's lowered evaluate is under 1e6 characters (the former one, with
    its 3 x 512 clips baked in as constants, lowered to 14.5e6)."""
    state = jax.eval_shape(lambda k: aot.init(k, TINY), jax.random.PRNGKey(0))
    text = jax.jit(lambda s: aot.evaluate(s, TINY)).lower(state).as_text()
    assert len(text) < 1e6, len(text)


def test_every_config_field_is_read():
    assert unread_fields(aot) == []


def test_paper_preset_traces():
    """eval_shape of init and one update under `paper`: VGG-16-BN conv1_1-conv5_3 (last pool
    removed) on 2 groups of 10 difference frames of 224x224 (240 less the 8-pixel crop),
    14x14x512 per group (the released View(-1, 1024, 14, 14)), concatenated to 1024
    channels, two top convs of 1024, a linear logit; 32 clips of 21 frames; nothing runs."""
    cfg, state, (after, metrics) = trace_paper(aot)
    assert (cfg.groups, cfg.group_frames, cfg.batch_size, cfg.clip_frames) == (2, 10, 32, 21)
    t = state.params["trunk"]
    assert t["Conv_0"]["kernel"].shape == (3, 3, 10, 64)
    assert t["Conv_12"]["kernel"].shape == (3, 3, 512, 512)
    assert state.params["Conv_0"]["kernel"].shape == (3, 3, 2 * 512, 1024)
    assert state.params["fc"]["kernel"].shape == (1024, 1)
    x = jax.ShapeDtypeStruct((1, 224, 224, 10), jnp.float32)
    z = jax.eval_shape(lambda p, b, x: aot.Trunk(cfg).apply(
        {"params": p, "batch_stats": b}, x, train=False), t, state.batch_stats["trunk"], x)
    assert cfg.frame_size - 2 * cfg.border_crop == 224 and z.shape == (1, 14, 14, 512)
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))


@pytest.mark.slow
def test_cue_test_border_removal():
    """The catalogue's cue test: constant-velocity videos (no physical arrow of time) with
    a border whose brightness drifts with time. Without border removal (border_crop 0) the
    network reads the cue (held-out cue-video accuracy near 1.0); with the crop (1 pixel =
    the cue's width) it is at chance. TINY otherwise with train_cue = cue_drift, 150
    steps, one seed each. Measured on a loaded 2-core CPU: held-out cue accuracy 1.000
    without the crop, 0.514 with it. Mutation: train_cue not fed to State.cue: fails."""
    accs = {}
    for crop in (0, 1):
        cfg = dataclasses.replace(TINY, border_crop=crop)
        cfg = dataclasses.replace(cfg, train_cue=cfg.cue_drift)
        train = run.make_train(lambda k, c: aot.init(k, c).replace(
            gravity=jnp.zeros(()), restitution=jnp.ones(())), aot.update, cfg)
        state, _ = jax.jit(train)(jax.random.PRNGKey(0))
        accs[crop] = float(jax.jit(lambda s, c=cfg: aot.evaluate(s, c))(state)["aot_acc_cue"])
    print("cue accuracy by border_crop", accs)
    assert accs[0] >= 0.95 and abs(accs[1] - 0.5) < 0.1, accs
