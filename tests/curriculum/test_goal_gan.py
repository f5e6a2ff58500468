"""Tests of curriculum/goal_gan.py: the LSGAN losses with negatives (Eq. 5-6) by hand, the GOID
labels (Eq. 3), the GAN trained on labelled goals generating the positives, the U-maze (walls,
feasible goals, coverage grid), the replay buffer's distance filter and ring, the behaviour of
Goal GAN against uniform goals and the broken flipped-label GAN in one compiled run of the CLI,
purity, CLI and the paper preset."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curriculum import goal_gan
from tests.common.cli import cli_args
from tests.common.compiled import compiled, main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# One tiny configuration shared by the module: 24-step episodes with long strides, 16 envs,
# 48 goals an iteration, small GAN, 6 outer iterations.
TINY = goal_gan.Config(horizon=24, max_step=0.5, num_envs=16, num_steps=24, inner_iters=2,
                       num_epochs=2, num_minibatches=4, num_new_goals=32, num_old_goals=16,
                       gen_hidden=(32, 32), disc_hidden=(32, 32), gan_batch=32, gan_iters=50,
                       coverage_res=1, outer_iters=6, buffer_size=256, lr=1e-3)
GAN, UNIFORM, FLIPPED = (goal_gan.TEACHERS.index(t) for t in ("goal_gan", "uniform", "flipped"))


def test_lsgan_losses_with_negatives_by_hand():
    """Eq. 5-6 on D(real) = [0.5, -0.5, 2], y = [1, 0, 1], D(G(z)) = [0, -1], a, b = -1, 1:
    real 1/2 mean[(0.5-1)^2, (-0.5+1)^2, (2-1)^2] = 0.25, fake 1/2 mean[1, 0] = 0.25: 0.5.
    The post's typo (no y_g on the first term) would give 0.875; without negatives the real
    term is 1/2 mean over the positives [0.25, 1] = 0.3125. L(G) = 1/2 mean[(D - c)^2]:
    0.25 with [1]'s c = 0, 1.25 with the released code's c = 1. Mutation tried: the first
    term without y (the post's version): fails."""
    d_real, y, d_fake = np.array([0.5, -0.5, 2.0]), np.array([1.0, 0.0, 1.0]), np.array(
        [0.0, -1.0])
    losses = compiled(lambda *a: (goal_gan.discriminator_loss(*a, -1.0, 1.0),
                                  goal_gan.discriminator_loss(*a, -1.0, 1.0, negatives=False),
                                  goal_gan.generator_loss(a[2], 0.0),
                                  goal_gan.generator_loss(a[2], 1.0)), d_real, y, d_fake)
    np.testing.assert_allclose(losses, [0.5, 0.5625, 0.25, 1.25], rtol=1e-6)


def test_goid_labels_are_inclusive_at_r_min_and_r_max():
    """Eq. 3: R_min <= R^g <= R_max, both ends inside. Mutation tried: strict inequalities
    (the released compute_labels): fails."""
    r = jnp.array([0.0, 0.05, 0.1, 0.5, 0.9, 0.95, 1.0])
    np.testing.assert_array_equal(goal_gan.goid_labels(r, 0.1, 0.9), [0, 0, 1, 1, 1, 0, 0])


def _gan_on_two_clusters(y):
    """train_gan as `update` runs it: 200 steps on goals at (0.5, 0.5) (labels y[:64]) and
    (-0.5, -0.5) (labels y[64:]) +- 0.05, from fresh nets; the generated goals after it."""
    cfg = dataclasses.replace(TINY, gan_iters=200)
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jnp.concatenate([jnp.full((64, 2), 0.5), jnp.full((64, 2), -0.5)])
    x = x + 0.05 * jax.random.normal(k[0], x.shape)
    g_apply, g_net = goal_gan.generator(cfg)
    _, d_net = goal_gan.discriminator(cfg)
    gp, dp = g_net.init(k[1], jnp.zeros((1, 4))), d_net.init(k[2], jnp.zeros((1, 2)))
    opt = goal_gan.gan_optimizer(cfg)
    (gp, *_), _ = goal_gan.train_gan((gp, dp, opt.init(gp), opt.init(dp)), k[3], x, y, True,
                                     cfg)
    return g_apply(gp, jax.random.normal(k[0], (500, cfg.noise_dim)))


def test_gan_generates_the_positive_goals_not_the_negatives():
    """Eq. 5-6 in training: the labelled data hold two clusters; with the positives at
    (0.5, 0.5) the generated goals go there (>= 80% nearer it), with the labels flipped
    they go to the other cluster (<= 20%). Measured: 1.00 and 0.00. Mutation tried: the
    discriminator's real term ignoring y (every goal positive): shares 0.08 and 0.08 (the
    generator collapses on one cluster), the first assert fails. (The post's typo, y_g
    missing on the first term, still separates the clusters here: the hand test catches it.)"""
    y = jnp.concatenate([jnp.ones(64), jnp.zeros(64)])
    gen = compiled(jax.vmap(_gan_on_two_clusters), jnp.stack([y, 1 - y]))
    near = [float(s) for s in (gen.sum(-1) > 0).mean(-1)]
    print("share near (0.5, 0.5):", near)
    assert near[0] >= 0.8 and near[1] <= 0.2, near


def _maze_case(_):
    """The pieces `update` runs on the cases of the test below, as one program."""
    free = goal_gan.is_free(jnp.array([[0.0, 0.0], [0.0, 2.0], [4.0, 2.0], [0.0, 4.0],
                                       [-1.01, 0.0], [0.0, -0.99], [5.1, 0.0]]), TINY)
    env = goal_gan.PointUMaze(TINY)
    obs, st = env.reset(None, jnp.array([0.0, 4.0]))
    wall = env.step(None, st.replace(pos=jnp.array([0.0, 0.8])), jnp.array([0.0, 1.0]),
                    jnp.array([0.0, 4.0]))
    goal = env.step(None, wall[1], jnp.array([0.2, -3.0]), jnp.array([0.1, 0.4]))
    in_wall = goal_gan.goal_reached(jnp.array([0.0, 0.9]), jnp.array([0.0, 1.1]), TINY)
    grid = goal_gan.is_free(jnp.asarray(goal_gan.coverage_grid(goal_gan.Config())), TINY)
    return free, obs, wall, goal, in_wall, grid


def test_u_maze_walls_goals_and_coverage_grid():
    """Released maze 0 with cells of 2 (TINY: max_step 0.5): the start cell centred at the
    origin, the wall cell between the arms covers y in [1, 3) for x < 5; a step into it is
    undone; actions are clipped to [-1, 1]; a goal inside a wall is never reached even within
    eps (only_feasible); observations are (pos, goal) scaled to the box [-3, 7]^2 -> [-1, 1];
    the coverage grid holds 16 points per free cell x 7 cells at the default resolution 2."""
    free, obs, wall, goal, in_wall, grid = compiled(_maze_case, 0)
    np.testing.assert_array_equal(free, [1, 0, 1, 1, 0, 1, 0])
    _, st, r, done, _ = wall
    np.testing.assert_allclose(st.pos, [0.0, 0.8])  # 1.3 is in the wall: undone
    assert float(r) == 0 and not bool(done)
    _, st, r, done, _ = goal
    np.testing.assert_allclose(st.pos, [0.1, 0.3], atol=1e-6)
    assert float(r) == 1 and bool(done)
    assert not bool(in_wall)
    np.testing.assert_allclose(obs, [-0.4, -0.4, -0.4, 0.4])  # (pos, goal) - 2, / 5
    assert grid.shape == (112,) and bool(grid.all())


def test_buffer_keeps_goals_far_from_every_stored_one_in_a_ring():
    """Released StateCollection: goals join one by one only if farther than eps (0.3) from
    every stored goal, including those added just before in the same call; kept = False never
    joins; a full ring overwrites its oldest slot."""
    add = jax.jit(goal_gan.buffer_add)
    buf, n = add(jnp.zeros((3, 2)), jnp.int32(0),
                 jnp.array([[0.0, 0.0], [0.2, 0.0], [1.0, 0.0], [5.0, 5.0], [1.0, 0.31]]),
                 jnp.array([True, True, True, False, True]), 0.3)
    assert int(n) == 3
    np.testing.assert_allclose(buf, [[0.0, 0.0], [1.0, 0.0], [1.0, 0.31]])
    buf, n = add(buf, n, jnp.array([[3.0, 3.0]]), jnp.array([True]), 0.3)
    assert int(n) == 4
    np.testing.assert_allclose(buf, [[3.0, 3.0], [1.0, 0.0], [1.0, 0.31]])


SEEDS = 2
RUN_ARGS = cli_args(TINY, goal_gan.Config()) + [
    "--num-seeds", str(3 * SEEDS), "--log-every", str(TINY.outer_iters), "--no-progress",
    "--fast-compile"]


def _run(run_dir):
    """TINY through `goal_gan.main`, 3 x SEEDS seeds in ONE compiled program: seeds 0..1 Goal
    GAN, 2..3 uniform goals, 4..5 the broken flipped-label GAN (the teacher is traced in the
    state), each on the key of its Goal GAN twin."""
    keys = jax.random.split(jax.random.PRNGKey(0), 3 * SEEDS)  # the runner's seed keys
    real = goal_gan.init

    def init(key, cfg):
        i = jnp.argmax(jnp.all(key == keys, -1))
        teacher = jnp.array([GAN, UNIFORM, FLIPPED])[i // SEEDS]
        return real(keys[i % SEEDS], cfg).replace(teacher=teacher)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(goal_gan, "init", init)
        return main_recording_chunks(goal_gan.main, RUN_ARGS + ["--run-dir", str(run_dir)])


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """(the run, its compiled chunks with their recorded inputs)"""
    return _run(tmp_path_factory.mktemp("goal_gan"))


@pytest.fixture(scope="module")
def quick_run(recorded):
    return recorded[0]


def test_goal_gan_generates_more_goals_of_intermediate_difficulty(quick_run):
    """Behaviour ([1] Sec. 5): share of the generated goals in GOID, mean over iterations 4-6
    of TINY (2 seeds each; measured on CPU, jax 0.10.2): Goal GAN 0.35 0.40, uniform 0.00
    0.07, flipped (broken) 0.05 0.04. Goal GAN's goals also sit near the start (mean distance
    1.1, 1.6 against 4.6, 4.4 for uniform goals, 3.4, 3.5 flipped). The broken variant fails
    the first assert; so does Goal GAN when its labels are all 1 (mutation tried: y_gan = 1:
    0.17, 0.13, distance 3.1, 2.6)."""
    frac = quick_run.history["charts/goid_frac_new"][:, 3:].mean(1)
    dist = quick_run.history["charts/start_dist_new"][:, 3:].mean(1)
    gan, uni, flip = frac[:SEEDS], frac[SEEDS:2 * SEEDS], frac[2 * SEEDS:]
    print("GOID share: Goal GAN", gan, "uniform", uni, "flipped", flip, "distance", dist)
    assert gan.min() >= 0.2 and gan.min() >= max(uni.max(), flip.max()) + 0.1, frac
    assert dist[:SEEDS].max() < dist[SEEDS:2 * SEEDS].min() - 1.0, dist
    np.testing.assert_array_equal(quick_run.state.teacher, [GAN] * 2 + [UNIFORM] * 2
                                  + [FLIPPED] * 2)


def test_train_is_pure_and_cli_writes_its_files(recorded, capsys):
    """The runner's compiled chunk (the whole run) again on its recorded input gives
    bit-identical results (no tracing, no compiling); seeds differ; the run wrote its files;
    `--help` documents every field."""
    quick_run, chunks = recorded
    with pytest.raises(SystemExit):
        goal_gan.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(goal_gan.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out
    assert (quick_run.run_dir / "metrics.jsonl").exists()
    h = quick_run.history
    assert h["charts/coverage"].shape == (3 * SEEDS, TINY.outer_iters)
    assert np.isfinite(h["losses/discriminator"]).all()
    assert not np.array_equal(h["losses/discriminator"][0], h["losses/discriminator"][1])
    assert len(chunks) == 1
    state, metrics = jax.device_get(chunks[0][0](chunks[0][1]))
    np.testing.assert_array_equal(h["losses/discriminator"], metrics["losses/discriminator"])
    jax.tree.map(np.testing.assert_array_equal, quick_run.state.gan, state.gan)


def test_bad_values_fail_with_named_field(tmp_path):
    with pytest.raises(ValueError, match=r"r_min=0.5, r_max=0.4"):
        goal_gan.main(["--r-min", "0.5", "--r-max", "0.4", "--run-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="teacher='x'"):
        goal_gan.main(["--teacher", "x", "--run-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="terminal_eps=0.0 must be > 0"):
        goal_gan.main(["--terminal-eps", "0", "--run-dir", str(tmp_path)])


def test_every_config_field_is_read():
    """No flag that lies: each Config field is read by code that runs (AST, not text)."""
    assert unread_fields(goal_gan) == []


def test_paper_preset_traces():
    """jax.eval_shape of init and one update under the `paper` preset (nothing runs): the
    released maze run's sizes (300 goals, 100 x 200 policy steps x 5, GAN 256/128)."""
    cfg, state, after = trace_paper(goal_gan)
    assert state.goals.shape == (300, 2) and after[0].success.shape == (300,)
    assert after[0].ppo.obs.shape == (100, 4)
    assert state.gan[0]["params"]["Dense_0"]["kernel"].shape == (4, 256)


@pytest.mark.slow
def test_goal_gan_covers_the_maze_faster_than_uniform_goals():
    """[1]'s headline on the quick preset (50-step episodes, 2 seeds, the runner's seed
    keys): coverage (mean success over the feasible grid) averaged over outer iterations
    1-20, Goal GAN against uniform goals and the broken flipped-label GAN, one compiled
    program (the teacher is traced). Measured (2-core CPU, loaded, ~230 s): coverage Goal
    GAN 0.42 0.36, uniform 0.14 0.24, flipped 0.40 0.21; coverage first above 0.4 at
    iteration 3, 6 (Goal GAN), never, 20 (uniform), 3, 18 (flipped). The flipped GAN still
    builds a curriculum of too-easy goals in one seed, so it is gated on the mean coverage
    and on the GOID share of the generated goals: Goal GAN 0.20 0.16, uniform 0.04 0.06,
    flipped 0.09 0.04."""
    cfg = dataclasses.replace(goal_gan.Config(**goal_gan.PRESETS["quick"]), outer_iters=20)
    keys = jax.random.split(jax.random.PRNGKey(0), SEEDS)
    teachers = jnp.array([GAN, UNIFORM, FLIPPED])
    state = jax.jit(jax.vmap(jax.vmap(lambda k, t: goal_gan.init(k, cfg).replace(teacher=t),
                                      (0, None)), (None, 0)))(keys, teachers)
    train = jax.jit(jax.vmap(jax.vmap(lambda s: jax.lax.scan(
        lambda s, _: goal_gan.update(s, cfg), s, None, cfg.outer_iters))))
    _, m = train(state)
    cov = np.asarray(m["charts/coverage"])  # [teacher, seed, iteration]
    gan, uni, flip = cov.mean(-1)
    goid = np.asarray(m["charts/goid_frac_new"]).mean(-1)
    print("coverage over iterations 1-20: Goal GAN", gan, "uniform", uni, "flipped", flip)
    print("GOID share of new goals: Goal GAN", goid[0], "uniform", goid[1], "flipped", goid[2])
    print("first iteration above 0.4 (0: never):", ((cov > 0.4).argmax(-1) + 1)
          * (cov > 0.4).any(-1))
    assert gan.min() > uni.max() + 0.05, (gan, uni)
    assert gan.mean() > flip.mean() + 0.05, (gan, flip)
    assert goid[0].min() > goid[2].max() + 0.05, goid
