"""Tests of curriculum/progressive_pcg.py: Eq. 1 (win up, loss down, clipped, per worker),
the generator's difficulty monotone in d (Eq. 2), the teacher owning every auto-reset's
level, the catalogue's synthetic student (d tracks the competence; the flipped sign drives d
to 0), purity, CLI, bad values, every Config field read and the paper-preset trace."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curriculum import progressive_pcg as ppcg
from tests.common.cli import cli_args
from tests.common.compiled import jit0, main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# One tiny configuration shared by the module (the CLI run and the env tests).
TINY = ppcg.Config(size=9, max_steps=12, num_envs=4, num_steps=8, total_timesteps=4 * 8 * 6,
                   hidden=(16,), eval_episodes=2, alpha=0.05)
PROGRESSIVE, UNIFORM, HARD, FLIPPED = range(len(ppcg.TEACHERS))


def test_difficulty_step_is_eq_1():
    """Eq. 1 through the function the env's step runs: +alpha on a win, -alpha on a loss,
    clipped to [0, 1], untouched where no episode ended; the flipped sign reverses it.
    Mutations tried, each fails here: no clip; the update applied to every worker (not only
    the ones whose episode ended); the sign ignored (fails the synthetic test)."""
    d = jnp.array([0.5, 0.5, 0.995, 0.004, 0.3])
    done = jnp.array([True, True, True, True, False])
    win = jnp.array([True, False, True, False, True])
    np.testing.assert_allclose(ppcg.difficulty_step(d, done, win, 0.01),
                               [0.51, 0.49, 1.0, 0.0, 0.3], atol=1e-7)
    np.testing.assert_allclose(ppcg.difficulty_step(d, done, win, 0.01, -1.0),
                               [0.49, 0.51, 0.985, 0.014, 0.3], atol=1e-7)


def test_generator_difficulty_grows_with_d():
    """Eq. 2: over 200 levels per d in 0, 0.25, ..., 1, the mean shortest-path length from
    start to goal and the wall share grow strictly with d; d = 0 is an empty room with the
    goal next to the start; every goal is reachable and never the start. Measured (9 x 9):
    path 1.0, 3.1, 5.3, 7.5, 8.1. Mutations tried, each fails here: goal at distance
    target 1 (d ignored); wall probability max_wall_frac (d ignored)."""
    gen = jit0(jax.vmap(ppcg.generate_level, (0, None, None)), static_argnums=2)
    keys = jax.random.split(jax.random.PRNGKey(0), 200)
    path, wall = [], []
    for d in (0.0, 0.25, 0.5, 0.75, 1.0):
        lv = gen(keys, d, TINY)
        dist = jax.vmap(ppcg.bfs_distances)(lv.walls, lv.start)
        pl = np.asarray(dist[jnp.arange(200), lv.goal[:, 0], lv.goal[:, 1]])
        assert (pl >= 1).all() and (pl < 81).all()
        path.append(pl.mean())
        wall.append(float(lv.walls[:, 1:-1, 1:-1].mean()))
    print("path", np.round(path, 2), "walls", np.round(wall, 3))
    assert path[0] == 1.0 and wall[0] == 0.0
    assert np.all(np.diff(path) > 0.3) and np.all(np.diff(wall) > 0.03)


def test_bfs_distances_on_a_hand_level():
    """The spiral test level by hand: the goal is 30 steps from the start; walls are far.
    Mutation tried, fails here: diagonal moves in the sweep."""
    lv = ppcg.hand_levels(TINY)
    dist = np.asarray(ppcg.bfs_distances(jnp.asarray(lv.walls[3]), jnp.asarray(lv.start[3])))
    assert dist[tuple(lv.goal[3])] == 30 and dist[0, 0] == 81 and dist[1, 2] == 1


def test_teacher_owns_every_auto_reset_level():
    """100 steps of random actions on 4 workers (episodes of at most 12 steps): after every
    step, each worker whose episode ended holds a new level generated at its d just updated by
    Eq. 1 from that episode's result (progressive), at d ~ U(0, 1) (uniform) or d = 1
    (hard). Mutations tried, each fails here: the level drawn at the d
    before the update; VecEnv's own auto-reset level kept (the dummy)."""
    env = ppcg.ProgressiveVecEnv(TINY)
    step, reset = jit0(env.step), jit0(env.reset)  # small programs: XLA's lowest level
    for teacher in (PROGRESSIVE, UNIFORM, HARD):
        obs, st = reset(jax.random.PRNGKey(teacher), teacher)
        key, ended, levels_d = jax.random.PRNGKey(9), 0, []
        for _ in range(100):
            key, k_a, k_s = jax.random.split(key, 3)
            d0 = st.d
            obs, st, reward, done, info = step(st, jax.random.randint(k_a, (4,), 0, 4), k_s)
            done = np.asarray(done)
            want = np.where(np.asarray(info["terminated"]), 1.0, -1.0) * TINY.alpha + d0
            if teacher == PROGRESSIVE:
                np.testing.assert_allclose(st.d, np.where(done, np.clip(want, 0, 1), d0))
                np.testing.assert_allclose(st.vec.params.d[done], st.d[done])
            levels_d += list(np.asarray(st.vec.params.d[done]))
            ended += done.sum()
        assert ended > 20
        if teacher == UNIFORM:
            assert np.ptp(levels_d) > 0.5
        if teacher == HARD:
            assert (np.asarray(levels_d) == 1).all()


def test_synthetic_student_d_tracks_competence_and_flipped_sign_drives_d_to_0():
    """The catalogue's synthetic student, through difficulty_step (Eq. 1): win probability
    sigmoid(k (c - d)), k = 20, and competence c rising by 0.002 exp(-((d - c) / 0.1)^2) per
    episode (it learns from levels near its competence), 4000 episodes, c_0 = 0.1, d_0 = 0,
    alpha 0.01, 8 seeds. PPCG: over episodes 1000..4000 |d - c| < 0.1 in 99% of episodes
    and 0.05 on average, and c ends near 1 (measured |d - c| mean 0.015, 99% 0.060, max 0.100;
    final c 1.0); flipped sign: d stays near 0 (mean over the last 1000 episodes below 0.02;
    measured 8e-5) and c stalls below 0.3 (measured 0.24). Mutation tried, fails here:
    difficulty_step ignoring its sign (the flipped arm then tracks c too)."""
    def run(sign, key):
        def episode(carry, k):
            d, c = carry
            win = jax.random.uniform(k) < jax.nn.sigmoid(20.0 * (c - d))
            c = jnp.minimum(c + 0.002 * jnp.exp(-(((d - c) / 0.1) ** 2)), 1.0)
            d = ppcg.difficulty_step(d, True, win, 0.01, sign)
            return (d, c), (d, c)

        return jax.lax.scan(episode, (0.0, 0.1), jax.random.split(key, 4000))[1]

    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    both = jax.jit(jax.vmap(jax.vmap(run, (None, 0)), (0, None)))(jnp.array([1.0, -1.0]), keys)
    (d, c), (df, cf) = [tuple(np.asarray(x[i]) for x in both) for i in range(2)]
    gap = np.abs(d - c)[:, 1000:]
    print("PPCG |d - c| mean, 99%, max", gap.mean(), np.quantile(gap, 0.99), gap.max(),
          "final c", c[:, -1].min(), "flipped d", df[:, -1000:].mean(), "c", cf[:, -1].max())
    assert gap.mean() < 0.05 and np.quantile(gap, 0.99) < 0.1 and c[:, -1].min() > 0.9
    assert df[:, -1000:].mean() < 0.02 and cf[:, -1].max() < 0.3


def test_bad_values_fail_with_named_field(tmp_path):
    bad = [(["--teacher", "oracle"], "teacher='oracle' must be one of"),
           (["--alpha", "1.5"], r"alpha=1.5 must be in \[0, 1\]"),
           (["--size", "7"], "size=7 must be >= 9"),
           (["--max-steps", "0"], "max_steps=0 must be >= 1"),
           (["--total-timesteps", "10"], "less than one rollout"),
           (["--num-minibatches", "7"], "not divisible by num_minibatches=7")]
    for args, msg in bad:
        with pytest.raises(ValueError, match=msg):
            ppcg.main(args + ["--run-dir", str(tmp_path / "x")])


ARGS = cli_args(TINY, ppcg.Config()) + ["--num-seeds", "2", "--log-every", "3", "--no-progress"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("ppcg")
    return main_recording_chunks(ppcg.main, ARGS + ["--run-dir", str(d)])


def test_train_is_pure_and_cli_writes_its_files(cli_run, capsys):
    """Two seeds vmapped through the CLI: the recorded first chunk run again on the same
    input gives the bit-identical next state and metrics; the seeds differ; d moved; the run
    wrote its files and `--help` documents every field. Mutation tried, fails here: init
    ignoring its key (the seeds identical)."""
    res, chunks = cli_run
    with pytest.raises(SystemExit):
        ppcg.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(ppcg.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out
    assert (res.run_dir / "metrics.jsonl").exists()
    h = res.history
    assert h["charts/difficulty"].shape == (2, TINY.num_updates)
    assert not np.array_equal(h["losses/value"][0], h["losses/value"][1])
    assert set(res.final) >= {"test_success", "difficulty", "test_level_0"}
    first_chunk, first_input = chunks[0]
    assert len(chunks) == 2
    state, metrics = first_chunk(jax.tree.map(jnp.copy, first_input))  # the chunk donates
    jax.tree.map(np.testing.assert_array_equal, state, chunks[1][1])
    np.testing.assert_array_equal(h["losses/value"][:, :3], metrics["losses/value"])
    np.testing.assert_array_equal(h["charts/difficulty"][:, :3], metrics["charts/difficulty"])
    assert np.abs(h["charts/difficulty"]).max() > 0  # d moved (alpha 0.05 in TINY)


def test_every_config_field_is_read():
    """No flag that lies: each Config field is read by code that runs (AST, not text).
    Mutation tried, fails here: an unused field."""
    assert unread_fields(ppcg) == []


def test_paper_preset_traces():
    """jax.eval_shape of init and one update under the `paper` preset (12 workers, 5-step
    rollouts, 13 x 13 mazes): nothing runs."""
    cfg, state, (after, metrics) = trace_paper(ppcg)
    assert cfg.num_envs == 12 and cfg.num_steps == 5 and cfg.alpha == 0.01
    assert state.ppo.env_state.d.shape == (12,) and state.ppo.obs.shape == (12, 3 * 13 * 13)
    assert state.ppo.env_state.vec.params.walls.shape == (12, 13, 13)
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
