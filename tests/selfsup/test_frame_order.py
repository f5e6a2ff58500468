"""Tests of selfsup/frame_order.py: the tuple sampler (order labels, tau bounds, the
high-motion windows), the procedural video and its flow, the loss, the solver, the siamese
concatenation, behaviour against random init and shuffled labels, purity, CLI and the
paper preset."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import run
from selfsup import frame_order as fo
from tests.common.cli import cli_args
from tests.common.compiled import compiled, main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# One tiny configuration for every test of the module: 16x16 frames, 24-frame videos,
# tau_max 6, tau_min 3, a 3-conv trunk of 16-16-32 channels, 32-unit fc layers and a
# 64-unit fusion layer, balanced tuples (with the paper's 25% positives, or a linear fc8,
# 150-300 steps stayed at the prior: held-out order accuracy 0.46-0.64).
TINY = fo.Config(frame_size=16, num_frames=24, tau_max=6, tau_min=3, arm_speed=(10.0, 25.0),
                 cycle_frames=48, positive_fraction=0.5, batch_size=32, num_steps=300,
                 lr=0.05, lr_decay_steps=1000,
                 conv_channels=(16, 16, 32), conv_kernels=(3, 3, 3), conv_strides=(1, 1, 1),
                 pool_after=(1, 2, 3), fc_features=(32, 32), dropout=0.0, bn_momentum=0.9,
                 init_std=0.05, fusion_hidden=64, num_eval_tuples=256, probe_train=400,
                 probe_test=400, shift_conv=True)
SEEDS = 2


@pytest.fixture(scope="module")
def sampled():
    """One compiled program for both sampler tests: 4000 tuples of a constant-flow video
    under TINY with [1]'s 25% positives (indices, labels, (a..e)), and, for high-motion
    fractions 0.2 and 1.0, the window starts of span 4 of a video moving only between frames
    15 and 16, with the (a..e) of 500 tuples of a video moving only between frames 12 and 18."""
    cfgs = [dataclasses.replace(TINY, high_motion_fraction=f) for f in (0.2, 1.0)]
    one = np.zeros(TINY.num_frames - 1, np.float32)
    one[15] = 1.0
    flow = np.zeros(TINY.num_frames - 1, np.float32)
    flow[12:18] = 1.0
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)

    def all_of_it(ks, const, o, f):
        tuples = jax.vmap(lambda k: fo.sample_tuple(k, const, 0.25, TINY))(ks)
        return tuples, [(fo.high_motion_starts(o, 4, c),
                         jax.vmap(lambda k, c=c: fo.sample_tuple(k, f, 0.5, c))(ks[:500])[2])
                        for c in cfgs]

    out = compiled(all_of_it, keys, jnp.ones(TINY.num_frames - 1), jnp.asarray(one),
                   jnp.asarray(flow))
    return jax.tree.map(np.asarray, out), flow


def test_tuple_sampler_order_labels_and_tau_bounds(sampled):
    """[1] Sec. 3.2 on 4000 tuples of a constant-flow video: a < b < c < d < e with
    2 <= d - b <= tau_max, b - a >= tau_min, e - d >= tau_min; positives are exactly
    (b, c, d) or (d, c, b), negatives (b, a, d) or (b, e, d), each form about half of its
    class; the label is 1 iff the middle frame lies between the outer two; positives are
    25% (binomial sd 0.007)."""
    cfg = TINY
    (idx, lab, five), _ = sampled[0]  # [1]'s ratio
    a, b, c, d, e = five.T
    assert (a < b).all() and (b < c).all() and (c < d).all() and (d < e).all()
    assert (d - b >= 2).all() and (d - b <= cfg.tau_max).all() and (d - b == cfg.tau_max).any()
    assert (b - a >= cfg.tau_min).all() and (e - d >= cfg.tau_min).all()
    assert a.min() == 0 and e.max() == cfg.num_frames - 1
    pos, neg = lab == 1, lab == 0
    fwd = (idx == np.stack([b, c, d], 1)).all(1)
    rev = (idx == np.stack([d, c, b], 1)).all(1)
    na = (idx == np.stack([b, a, d], 1)).all(1)
    ne = (idx == np.stack([b, e, d], 1)).all(1)
    assert (fwd | rev)[pos].all() and (na | ne)[neg].all()
    assert 0.4 < fwd[pos].mean() < 0.6 and 0.4 < na[neg].mean() < 0.6
    between = (np.minimum(idx[:, 0], idx[:, 2]) < idx[:, 1]) & (
        idx[:, 1] < np.maximum(idx[:, 0], idx[:, 2]))
    np.testing.assert_array_equal(between, pos)
    assert abs(pos.mean() - 0.25) < 0.03, pos.mean()


def test_high_motion_windows_by_hand(sampled):
    """[1] Sec. 3.2: flow 1 only between frames 15 and 16 (T = 24, tau_min 3). Windows of
    span 4 that leave room for a and e start at b in [3, 16] (14 of them); the 4 with
    b in [12, 15] contain the motion. Keeping the top 20% (the 0.8 quantile, 'lower', of
    10 zeros and 4 ones is 1) keeps exactly those; keeping all (fraction 1) keeps [3, 16].
    Sampled tuples (random spans) from a video moving only between frames 12 and 18 with
    high_motion_fraction 0.2 all have motion inside [b, d]; with fraction 1 some do not."""
    (_, ((top, five_top), (every, five_all))), flow = sampled
    np.testing.assert_array_equal(np.flatnonzero(top), [12, 13, 14, 15])
    np.testing.assert_array_equal(np.flatnonzero(every), np.arange(3, 17))
    moving = lambda five: np.array([flow[b:d].sum() > 0 for b, d in np.asarray(five)[:, [1, 3]]])
    assert moving(five_top).all()
    assert not moving(five_all).all()


def test_video_flow_render_and_probe_label_by_hand():
    """The generator: the arm turns by speed x moving steps, so the flow (arm-tip speed) is
    0 at rest and speed x 0.3 S while moving (either direction), half of the time; a frame
    without noise with theta = 0 has the arm (brightness 1) to the right of the body and
    background on the left; theta = 100 degrees is class 2 of 8 (bins of 45 degrees)."""
    cfg = dataclasses.replace(TINY, num_frames=240, noise_std=0.0)

    def parts(k):  # one compiled program: a video, its flow, two hand-set frames, a label
        v = fo.draw_video(k, cfg)
        v0 = v.replace(body=jnp.array([8.5, 8.5]), theta=jnp.zeros(cfg.num_frames),
                       background=jnp.zeros((16, 16)))
        v100 = v0.replace(theta=jnp.full(cfg.num_frames, jnp.deg2rad(100.0)))
        flows = fo.flow_magnitude(v, cfg), fo.flow_magnitude(v.replace(theta=-v.theta), cfg)
        return (v, flows, fo.render(v0, 0, k, cfg)[..., 0],
                fo.render(v100, 0, k, cfg)[..., 0], fo.arm_direction_class(v100, 0, 8))

    v, (flow, flow_back), img, img100, cls100 = compiled(parts, jax.random.PRNGKey(3))
    flow = np.asarray(flow)
    np.testing.assert_array_equal(flow_back, flow)  # a speed: the same turning either way
    speed = np.abs(np.diff(np.asarray(v.theta))).max()
    lo, hi = np.deg2rad(cfg.arm_speed)
    assert lo <= speed <= hi
    np.testing.assert_allclose(np.unique(flow.round(4)), [0, round(speed * 0.3 * 16, 4)],
                               rtol=1e-3)
    assert 0.4 < (flow > 0).mean() < 0.6
    img, img100 = np.asarray(img), np.asarray(img100)
    assert img[8, 12] == 1.0 and img[8, 3] == 0.0 and img[8, 8] == 1.0
    assert img[3, 8] == 0.0 and 0 < img[8, 9] <= 1.0
    assert int(cls100) == 2
    assert img100[12, 7] > 0.9 and img100[4, 8] == 0.0  # y grows downwards: +100 deg is below


def test_order_loss_by_hand():
    """[1] Sec. 3.3: logits [[2, 0], [0, 1]], labels [1, 1]: -log softmax = log(1 + e^2)
    = 2.12693 and log(1 + e^-1) = 0.31326, mean 1.22009; accuracy 0.5."""
    loss, acc = compiled(fo.order_loss, jnp.array([[2.0, 0.0], [0.0, 1.0]]), jnp.array([1, 1]))
    np.testing.assert_allclose(loss, (np.log(1 + np.e ** 2) + np.log(1 + np.e ** -1)) / 2,
                               rtol=1e-6)
    assert float(acc) == 0.5


def test_solver_decays_kernels_only_and_doubles_bias_rate():
    """The released solver by hand, one kernel w = 1 and one bias b = 1, gradients 1, lr 0.1
    x 0.1 every 2 steps, momentum 0.9, weight decay 5e-4 on the kernel only, bias lr x 2:
        kernel g' = 1 + 5e-4 w;  bias g' = 2;  m = 0.9 m + g';  p -= lr m."""
    cfg = dataclasses.replace(TINY, lr=0.1, lr_decay_steps=2)
    tx, sched = fo.make_optimizer(cfg)
    p = {"layer": {"kernel": jnp.array(1.0), "bias": jnp.array(1.0)}}

    def steps(p):  # the 4 steps as one compiled program (eagerly, each op compiles)
        s, out = tx.init(p), []
        for step in range(4):
            u, s = tx.update(jax.tree.map(jnp.ones_like, p), s, p)
            p = optax.apply_updates(p, u)
            out.append((sched(step), p))
        return out

    w, b, mw, mb = 1.0, 1.0, 0.0, 0.0
    for step, (lr_used, q) in enumerate(compiled(steps, p)):
        lr = 0.1 if step < 2 else 0.01
        np.testing.assert_allclose(lr_used, lr, rtol=1e-6)
        mw, mb = 0.9 * mw + 1 + 5e-4 * w, 0.9 * mb + 2.0
        w, b = w - lr * mw, b - lr * mb
        np.testing.assert_allclose(q["layer"]["kernel"], w, rtol=1e-6)
        np.testing.assert_allclose(q["layer"]["bias"], b, rtol=1e-6)


def test_siamese_trunk_shared_and_fc7_concatenated(recorded_run):
    """[1] Fig. 2: the logits of a tuple are fc8 of [fc7(f1); fc7(f2); fc7(f3)] with one
    shared trunk (frame j's features meet rows jF..(j+1)F of the next layer's kernel; TINY
    has the fusion ReLU layer between, so logits = fc8(relu(fusion([fc7_1; fc7_2; fc7_3])))).
    Reversing the frames changes the logits (the net sees the order). The run's initial
    state of seed 0, one compiled program (one OrderNet and one trunk application)."""
    state = jax.tree.map(lambda a: a[0], recorded_run[1][0][1])
    frames = np.random.default_rng(1).uniform(size=(4, 3, 16, 16, 1)).astype(np.float32) * (
        np.array([0.2, 1.0, 3.0], np.float32)[:, None, None, None])  # 3 distinct frames each

    def both(st, fr):
        logits = fo.OrderNet(TINY).apply({"params": st.params, "batch_stats": st.batch_stats},
                                         jnp.concatenate([fr, fr[:, ::-1]]), train=False)
        feats = fo.features(st, fr.reshape(-1, *fr.shape[2:]), TINY).reshape(4, 3, -1)
        return logits[:4], feats, logits[4:]

    logits, feats, swapped = (np.asarray(a) for a in compiled(both, state, frames))
    p = jax.tree.map(np.asarray, state.params)
    f = TINY.fc_features[1]
    hidden = sum(feats[:, j] @ p["fusion"]["kernel"][j * f:(j + 1) * f] for j in range(3))
    hidden = np.maximum(hidden + p["fusion"]["bias"], 0)
    hand = hidden @ p["fc8"]["kernel"] + p["fc8"]["bias"]
    np.testing.assert_allclose(logits, hand, rtol=1e-4, atol=1e-5)
    assert not np.allclose(logits, swapped, atol=1e-4)


# One chunk per 25 updates (one compiled program): the purity test reruns 25 updates.
# Seeds 0 and 1 train Shuffle and Learn, seed BROKEN (State.shuffle set) the broken variant
# with the batch's labels shuffled, all in the run's one vmapped program.
CHUNK = 25
BROKEN = 2
RUN_ARGS = cli_args(TINY, fo.Config()) + [
    "--num-seeds", str(SEEDS + 1), "--log-every", str(CHUNK), "--no-progress"]


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """TINY through the CLI entry point, once: SEEDS + 1 seeds (the last the broken variant:
    the runner's initial states with shuffle set) in chunks of CHUNK updates, then
    evaluate() (compiled at XLA's lowest level and kept, to score the initial states too);
    with the compiled chunks and their inputs."""
    evaluates = []
    real_initial_states = run.initial_states

    def initial_states(*args):
        return real_initial_states(*args).replace(shuffle=jnp.arange(SEEDS + 1) == BROKEN)

    def evaluate_seeds(evaluate, state, cfg, num_seeds, compiler_options=None):
        fn = jax.jit(run.seed_map(lambda s: evaluate(s, cfg), num_seeds))
        evaluates.append(fn.lower(state).compile(run.INIT_COMPILER_OPTIONS))
        return jax.device_get(evaluates[-1](state))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run, "initial_states", initial_states)
        mp.setattr(run, "evaluate_seeds", evaluate_seeds)
        res, chunks = main_recording_chunks(fo.main, RUN_ARGS + [
            "--run-dir", str(tmp_path_factory.mktemp("frame_order"))])
    return res, chunks, evaluates[0]


def test_order_verification_learned_and_features_beat_init(recorded_run):
    """Behaviour ([1] Sec. 3-4): TINY (300 steps of 32 balanced tuples), 2 seeds, against
    the same training with the batch's labels shuffled (broken, a third seed of the same
    run) and the network at init (the run's compiled evaluate). Held-out balanced order
    accuracy, chance 0.5. Measured on a loaded 2-core CPU (jax 0.10.2):
        order accuracy        trained 0.711 0.766   shuffled labels 0.539   init 0.461 0.535
        k-NN 10/class probe   trained 0.313 0.420   shuffled labels 0.340   init 0.425 0.528
        linear 10/class       trained 0.368 0.505   shuffled labels 0.388   init 0.445 0.495
    The arm-direction probes of fc7 do NOT beat init at this size (nor in 150-300 step
    runs with the paper's 25% positives), so they are printed, not asserted. 200 steps
    instead of 300: 0.707 0.688 vs shuffled 0.461 (too close to the bound). Mutations
    tried: labels shuffled in every seed (the broken arm itself: 0.539, fails the 0.65
    bound). The accuracy is also checked to be the positives' and negatives' accuracies
    weighted by their share of the held-out tuples."""
    quick_run, chunks, evaluate = recorded_run
    initial = chunks[0][1]
    out, init = quick_run.final, jax.device_get(evaluate(initial))
    print("trained/broken", {k: out[k] for k in ("order_acc_test", "knn_few", "linear_few")},
          "init", {k: init[k] for k in ("order_acc_test", "knn_few", "linear_few")})
    acc = out["order_acc_test"]
    share = fo.eval_tuples(TINY)[1].mean()  # positives among the held-out tuples (cached)
    np.testing.assert_allclose(acc, share * out["order_acc_pos"]
                               + (1 - share) * out["order_acc_neg"], rtol=1e-5)
    assert (acc[:SEEDS] >= ORDER_ACC).all(), acc
    assert acc[BROKEN] < ORDER_ACC and (init["order_acc_test"] < ORDER_ACC).all(), (acc, init)


ORDER_ACC = 0.65
"""held-out order accuracy the method reaches and the broken variant and init do not"""


def test_train_is_pure_and_cli_writes_its_files(recorded_run, capsys):
    """Same keys: the runner's initial states of seeds 0-2 again (shuffle False from init),
    and its first chunk rerun from them, are bit-identical to the run's; the two unbroken
    seeds differ; the run wrote its files; --help documents every field."""
    quick_run, chunks, _ = recorded_run
    with pytest.raises(SystemExit):
        fo.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(fo.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out
    assert (quick_run.run_dir / "metrics.jsonl").exists()
    h = quick_run.history["losses/order"]
    assert h.shape == (SEEDS + 1, TINY.num_updates) and np.isfinite(h).all()
    assert h[:SEEDS, -20:].mean() < h[:SEEDS, :20].mean()  # the order loss falls
    assert not np.array_equal(h[0], h[1])
    first_chunk, first_input = chunks[0]
    assert len(chunks) == TINY.num_updates // CHUNK
    again = run.initial_states(fo.init, TINY, 0, SEEDS + 1)
    assert not np.asarray(again.shuffle).any()
    jax.tree.map(np.testing.assert_array_equal, first_input,
                 again.replace(shuffle=jnp.arange(SEEDS + 1) == BROKEN))
    state, metrics = first_chunk(jax.tree.map(jnp.copy, first_input))  # the chunk donates
    jax.tree.map(np.testing.assert_array_equal, state.params, chunks[1][1].params)
    np.testing.assert_array_equal(h[:, :CHUNK], metrics["losses/order"])


def test_bad_values_fail_with_named_field(tmp_path):
    for flags, msg in ((["--num-frames", "20"], "num_frames=20 must be >= tau_max"),
                       (["--lr", "0"], "--lr must be > 0"),
                       (["--positive-fraction", "1.5"], "--positive-fraction must be in"),
                       (["--arm-speed", "2", "4"], "arm_speed=\\(2.0, 4.0\\)"),
                       (["--pool-after", "6"], "pool_after=\\(6,\\)"),
                       (["--conv-kernels", "3"], "must be non-empty and of equal length")):
        with pytest.raises(ValueError, match=msg):
            fo.main(flags + ["--run-dir", str(tmp_path)])


def test_every_config_field_is_read():
    assert unread_fields(fo) == []


def test_paper_preset_traces():
    """eval_shape of init and one update under `paper`: CaffeNet (conv1 11x11/4 96, ...,
    fc6 and fc7 4096) on 227x227 frames, fc8 on the 3 x 4096 concatenated fc7, 128 tuples,
    tau_max 60, tau_min 15, 25% positives; nothing runs."""
    cfg, state, (after, metrics) = trace_paper(fo)
    assert (cfg.tau_max, cfg.tau_min, cfg.positive_fraction, cfg.batch_size) == (60, 15, 0.25,
                                                                                 128)
    t = state.params["trunk"]
    assert t["Conv_0"]["kernel"].shape == (11, 11, 1, 96)
    assert t["Dense_0"]["kernel"].shape == (8 * 8 * 256, 4096)  # SAME padding: 57, 29, 15, 8
    assert state.params["fc8"]["kernel"].shape == (3 * 4096, 2)
    assert "fusion" not in state.params  # [1]: fc8 linear on the concatenated fc7
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
