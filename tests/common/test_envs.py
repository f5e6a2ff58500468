"""Tests of common/envs.py: sampler-driven auto-reset, episode stats, adapters, wrappers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import envs
from common.envs import (
    Coverage,
    GridMaze,
    GridMazeParams,
    NormalizeObservation,
    VecEnv,
    make,
    mark_visited,
)

TINY = ("#####", "#S.G#", "#...#", "#####")
CORRIDOR = ("#####", "#S.G#", "#####")


def _goal_histogram(vecenv: VecEnv, goals: jax.Array, num_steps: int, seed: int = 0):
    """Counts over `goals` of the goal of every episode started by an auto-reset."""

    def run(key):
        k_reset, k_run = jax.random.split(key)
        _, vstate = vecenv.reset(k_reset)

        def body(carry, key):
            vstate, counts = carry
            k_act, k_step = jax.random.split(key)
            action = jax.random.randint(k_act, (vecenv.num_envs,), 0, 4)
            _, vstate, _, done, _ = vecenv.step(vstate, action, k_step)
            match = jnp.all(vstate.params.goal[:, None, :] == goals[None], axis=-1)  # [N, 3]
            return (vstate, counts + (match & done[:, None]).sum(0)), None

        counts = jnp.zeros(len(goals), jnp.int32)
        (_, counts), _ = jax.lax.scan(body, (vstate, counts), jax.random.split(k_run, num_steps))
        return counts

    counts = np.asarray(jax.jit(run)(jax.random.key(seed)))
    return counts / counts.sum(), counts.sum()


def test_sampler_draws_every_new_episode():
    """Auto-reset draws each new episode's goal from the sampler: the histogram of goals
    over ~5000 auto-resets matches (0.5, 0.3, 0.2) within 0.03. Broken variant: without
    the sampler every episode gets the map's default goal, histogram (1, 0, 0), which
    misses the target by 0.5."""
    goals = jnp.array([[1, 3], [2, 1], [2, 3]], jnp.int32)  # goals[0] is the map's 'G'
    probs = np.array([0.5, 0.3, 0.2])
    env = GridMaze(TINY, max_steps=2)

    def sampler(key):
        goal = goals[jax.random.choice(key, 3, p=jnp.asarray(probs))]
        return GridMazeParams(start=jnp.array([1, 1], jnp.int32), goal=goal)

    hist, resets = _goal_histogram(VecEnv(env, 8, sampler), goals, num_steps=1200)
    assert resets > 4000
    np.testing.assert_allclose(hist, probs, atol=0.03)

    broken, _ = _goal_histogram(VecEnv(env, 8), goals, num_steps=300)
    np.testing.assert_allclose(broken, [1.0, 0.0, 0.0])
    assert np.abs(broken - probs).max() > 0.03


def test_auto_reset_and_episode_stats():
    """Scripted corridor: env 0 reaches G in 2 steps (reward 1, terminated), env 1 walks
    into the wall and is truncated at max_steps=3; stats and pre-reset positions."""
    venv = VecEnv(GridMaze(CORRIDOR, max_steps=3), 2)
    step = jax.jit(venv.step)
    obs0, vs = venv.reset(jax.random.key(0))
    right_left = jnp.array([3, 2])

    obs, vs, r, done, info = step(vs, right_left, jax.random.key(1))
    assert not done.any() and (info["position"] == jnp.array([[1, 2], [1, 1]])).all()
    obs, vs, r, done, info = step(vs, right_left, jax.random.key(2))
    assert done.tolist() == [True, False] and r.tolist() == [1.0, 0.0]
    assert info["terminated"].tolist() == [True, False] and not info["truncated"].any()
    assert info["returned_episode"].tolist() == [True, False]
    assert info["returned_episode_return"].tolist() == [1.0, 0.0]
    assert info["returned_episode_length"].tolist() == [2, 0]
    assert info["position"][0].tolist() == [1, 3]  # the goal cell, before the reset
    np.testing.assert_array_equal(obs[0], obs0[0])  # the reset observation
    assert vs.episode_return.tolist() == [0.0, 0.0] and vs.episode_length.tolist() == [0, 2]
    obs, vs, r, done, info = step(vs, right_left, jax.random.key(3))
    assert done.tolist() == [False, True]
    assert info["truncated"].tolist() == [False, True] and not info["terminated"].any()
    assert info["returned_episode_length"].tolist() == [0, 3]
    assert info["position"].tolist() == [[1, 2], [1, 1]]

    # returned_episode_return is the sum of the finished episode's rewards.
    class Penalised(GridMaze):
        def step(self, key, state, action, params):
            obs, state, reward, term, trunc = super().step(key, state, action, params)
            return obs, state, reward - 0.1, term, trunc

    venv = VecEnv(Penalised(TINY, max_steps=5), 4)

    def rollout(key):
        _, vs = venv.reset(key)

        def body(vs, key):
            k_act, k_step = jax.random.split(key)
            action = jax.random.randint(k_act, (4,), 0, 4)
            _, vs, r, done, info = venv.step(vs, action, k_step)
            return vs, (r, done, info["returned_episode_return"])

        return jax.lax.scan(body, vs, jax.random.split(key, 60))[1]

    rewards, dones, returned = map(np.asarray, jax.jit(rollout)(jax.random.key(4)))
    running = np.zeros(4)
    for r, d, ret in zip(rewards, dones, returned, strict=True):
        running += r
        np.testing.assert_allclose(ret, np.where(d, running, 0.0), rtol=1e-5, atol=1e-6)
        running[d] = 0.0
    assert dones.sum() > 20


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="Did you mean") as err:
        make("CartPole-v2", 4)
    assert "CartPole-v1" in str(err.value)
    with pytest.raises(ValueError, match="brax/ant"):
        make("brax/antt", 4)
    with pytest.raises(ValueError, match="num_envs=0"):
        make("GridMaze-FourRooms", 0)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Navix-Empty-5x5-v0"])
def test_adapters_jit_vmap_over_seeds(env_id):
    """Library adapters step under jit + vmap over 2 seeds; same seed, same result."""
    venv = make(env_id, 3)
    assert venv.num_actions is not None and venv.action_shape == ()

    def rollout(key):
        k_reset, k_run = jax.random.split(key)
        _, vs = venv.reset(k_reset)

        def body(vs, key):
            k_act, k_step = jax.random.split(key)
            action = jax.random.randint(k_act, (3,), 0, venv.num_actions)
            obs, vs, r, done, info = venv.step(vs, action, k_step)
            return vs, (obs, r, done, info.get("position", jnp.zeros((3, 2), jnp.int32)))

        return jax.lax.scan(body, vs, jax.random.split(k_run, 6))[1]

    run = jax.jit(jax.vmap(rollout))
    keys = jax.random.split(jax.random.key(0), 2)
    obs, r, done, pos = run(keys)
    assert obs.shape == (2, 6, 3, *venv.observation_shape)
    assert r.shape == done.shape == (2, 6, 3) and done.dtype == jnp.bool_
    jax.tree.map(np.testing.assert_array_equal, run(keys), (obs, r, done, pos))
    if env_id.startswith("Navix"):
        assert obs.shape[-3:] == (5, 5, 3)
        assert ((pos >= 0) & (pos < 5)).all() and ((pos > 0) & (pos < 4)).all()  # not on walls
    else:
        assert not np.array_equal(obs[0], obs[1])


def test_normalize_observation_clips_and_counts():
    """Running moments themselves are tested in test_rl (RunningMeanStd)."""
    venv = NormalizeObservation(VecEnv(GridMaze(TINY, max_steps=4), 8), clip=0.5)
    assert venv.observation_shape == (2,) and venv.num_envs == 8
    obs, state = venv.reset(jax.random.key(0))
    step = jax.jit(venv.step)
    seen = []
    for i in range(10):
        action = jax.random.randint(jax.random.key(100 + i), (8,), 0, 4)
        obs, state, _, _, _ = step(state, action, jax.random.key(i))
        seen.append(np.asarray(obs))
    seen = np.stack(seen)
    assert np.abs(seen).max() <= 0.5 + 1e-6 and np.isclose(np.abs(seen).max(), 0.5)
    np.testing.assert_allclose(float(state.rms.count), 8 * 11, rtol=1e-5)


def test_coverage_marks_grid_cells_and_montezuma_rooms():
    """`mark_visited`: a (G, G) board takes info["position"] (row, col; clipped to the
    board), a (256,) one takes RAM byte 3 (Montezuma's room); a board without positions
    stays as it was. `Coverage` on TINY: reset marks nothing; one step down / right marks
    exactly (2, 1) and (1, 2), a wall bump the same cell again."""
    board = jnp.zeros((5, 5), bool)
    got = mark_visited(board, {"position": jnp.array([[1, 2], [1, 2], [7, 0]])})
    np.testing.assert_array_equal(np.argwhere(np.asarray(got)), [[1, 2], [4, 0]])
    ram = jnp.zeros((3, 128), jnp.uint8).at[:, 3].set(jnp.array([5, 5, 9], jnp.uint8))
    rooms = mark_visited(jnp.zeros(256, bool), {"ram": ram})
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(rooms)), [5, 9])
    assert mark_visited(board, {"ram": ram}) is board  # a grid on Atari stays empty

    venv = Coverage(VecEnv(GridMaze(TINY, max_steps=50), 2), grid=5)
    assert venv.num_envs == 2 and venv.num_actions == 4
    _, state = venv.reset(jax.random.key(0))
    assert state.visited.shape == (5, 5) and not state.visited.any()
    step = jax.jit(venv.step)
    _, state, _, _, _ = step(state, jnp.array([1, 3]), jax.random.key(1))  # down, right
    np.testing.assert_array_equal(np.argwhere(np.asarray(state.visited)), [[1, 2], [2, 1]])
    _, state, _, _, _ = step(state, jnp.array([1, 2]), jax.random.key(2))  # wall, left
    np.testing.assert_array_equal(np.argwhere(np.asarray(state.visited)),
                                  [[1, 1], [1, 2], [2, 1]])
    assert Coverage(VecEnv(GridMaze(TINY), 2), grid=5, rooms=True).reset(
        jax.random.key(0))[1].visited.shape == (256,)


class _Scripted:
    """A stand-in batch of 2 envs whose step returns the next scripted (ended, return)."""

    num_envs = 2

    def __init__(self, script):
        self.script = script

    def reset(self, key):
        return jnp.zeros(2), jnp.zeros((), jnp.int32)

    def step(self, t, action, key):
        ended, ret = (jnp.asarray(a)[t] for a in self.script)
        info = {"returned_episode": ended, "returned_episode_return": ret}
        return jnp.zeros(2), t + 1, jnp.zeros(2), ended, info


def test_coverage_counts_steps_successes_and_the_first_one():
    """Steps count the whole batch (2 per step); an episode counts as a success when it
    ends with a positive return (an ended episode with return 0, or a running one with a
    positive running return, does not); `first_success` is the step count at the first one
    and stays there; `restart` zeroes everything."""
    ended = [[True, False], [False, False], [True, True], [False, True]]
    ret = [[0.0, 0.0], [0.0, 0.0], [1.0, 0.5], [0.0, 2.0]]
    env = Coverage(_Scripted((ended, ret)), grid=3)
    _, state = env.reset(jax.random.key(0))
    assert int(state.first_success) == -1 and int(state.steps) == 0
    firsts = []
    for _ in range(4):
        _, state, *_ = env.step(state, jnp.zeros(2, jnp.int32), jax.random.key(1))
        firsts.append(int(state.first_success))
    assert firsts == [-1, -1, 6, 6] and int(state.steps) == 8 and int(state.positives) == 3
    state = env.restart(state)
    assert (int(state.steps), int(state.positives), int(state.first_success)) == (0, 0, -1)


def test_brax_params_scale_the_traced_system():
    """Default tier, no compile: inside `_physics(params)` the env's sys has every mass,
    inertia and friction scaled by the params, and the unmodified sys is back afterwards.
    Catches a multiplier that is not applied (or applied to the wrong field) and a sys that
    leaks out of the context into later traces."""
    pytest.importorskip("brax")
    venv = make("brax/inverted_pendulum", 2, episode_length=3)
    env = venv.env
    sys0 = env.env.unwrapped.sys
    with env._physics({"friction": jnp.float32(3.0), "mass": jnp.float32(5.0)}):
        sys = env.env.unwrapped.sys
        np.testing.assert_allclose(sys.body_mass, 5.0 * sys0.body_mass)
        np.testing.assert_allclose(sys.body_inertia, 5.0 * sys0.body_inertia)
        np.testing.assert_allclose(sys.link.inertia.mass, 5.0 * sys0.link.inertia.mass)
        np.testing.assert_allclose(sys.geom_friction, 3.0 * sys0.geom_friction)
    assert env.env.unwrapped.sys is sys0
    with env._physics(None):
        assert env.env.unwrapped.sys is sys0


@pytest.mark.slow
def test_brax_params_change_physics():
    """Slow tier (tracing brax's generalized step takes ~30 s of CPU): brax/inverted_pendulum
    reset + step with sampled params; a heavier system moves differently from the same
    state (broken variant: the mass multiplier ignored, and the two states are equal)."""
    pytest.importorskip("brax")

    def sampler(key):
        return {
            "friction": jnp.float32(1.0),
            "mass": jax.random.uniform(key, (), minval=0.5, maxval=2.0),
        }

    venv = make("brax/inverted_pendulum", 2, sampler=sampler, episode_length=3)
    assert venv.num_actions is None and venv.action_shape == (1,)

    @jax.jit
    def reset_step(key):
        _, vs = venv.reset(key)
        obs, vs, r, done, info = venv.step(vs, jnp.ones((2, 1)), key)
        # same state and action, mass x1 vs x5
        env, state = venv.env, jax.tree.map(lambda x: x[0], vs.env_state)
        masses = {"friction": jnp.ones(2), "mass": jnp.array([1.0, 5.0])}  # one step, vmapped
        moved = jax.vmap(lambda p: env.step(key, state, jnp.ones(1), p)[0])(masses)
        return obs, vs, r, done, moved

    obs, vs, r, done, (light, heavy) = reset_step(jax.random.key(0))
    assert obs.shape == (2, 4) and r.shape == (2,) and done.shape == (2,)
    assert vs.params["mass"].shape == (2,) and not np.allclose(*vs.params["mass"])
    assert not np.allclose(light, heavy)


def test_envpool_xla_step():
    envpool = pytest.importorskip("envpool")
    del envpool
    venv = make("CartPole-v1", 2, envpool=True, seed=0)
    assert not venv.uses_callback and venv.num_actions == 2
    obs, state = venv.reset(jax.random.key(0))
    assert obs.shape == (2, 4)
    step = jax.jit(venv.step)
    finished = 0
    for _ in range(60):
        obs, state, r, done, info = step(state, jnp.ones(2, jnp.int32), None)
        ended = np.asarray(info["returned_episode"])
        # CartPole pays 1 per step, so a finished episode's return equals its length.
        np.testing.assert_array_equal(
            np.asarray(info["returned_episode_return"])[ended],
            np.asarray(info["returned_episode_length"])[ended],
        )
        finished += ended.sum()
    assert obs.shape == (2, 4) and finished > 0
    with pytest.raises(ValueError, match="sampler"):
        make("CartPole-v1", 2, sampler=lambda key: None, envpool=True)


# --- meta-RL task families and the RL^2 trial wrapper ---

from common.envs import (  # noqa: E402
    BanditParams,
    BernoulliBandit,
    PointNav2D,
    TabularMDP,
    TabularMDPParams,
    Trial,
    make_meta,
    meta_env,
)


def test_bandit_pulls_are_bernoulli_of_the_arm_and_each_pull_ends_an_episode():
    """Reward ~ Bernoulli(p[a]) (4000 pulls per arm, within 4 standard errors); every step
    terminates; tasks p ~ U[0, 1]^K (mean 0.5, variance 1/12 over 4000 tasks)."""
    env = BernoulliBandit(3)
    p = BanditParams(jnp.array([0.1, 0.5, 0.9]))
    _, s = env.reset(jax.random.PRNGKey(0), p)
    keys = jax.random.split(jax.random.PRNGKey(1), 4000)
    step = jax.jit(jax.vmap(jax.vmap(env.step, (0, None, None, None)), (None, None, 0, None)))
    _, _, r, term, trunc = step(keys, s, jnp.arange(3), p)  # [3 arms, 20k]
    np.testing.assert_allclose(r.mean(1), [0.1, 0.5, 0.9], atol=4 * 0.5 / np.sqrt(4000))
    assert bool(term.all()) and not bool(trunc.any())
    tasks = jax.jit(jax.vmap(env.sample_params))(jax.random.split(jax.random.PRNGKey(2), 4000))
    assert tasks.p.shape == (4000, 3)
    np.testing.assert_allclose(tasks.p.mean(), 0.5, atol=0.01)
    np.testing.assert_allclose(tasks.p.var(), 1 / 12, atol=0.005)


def test_tabular_mdp_tasks_and_steps():
    """Duan et al. Sec. 4.2 (40 tasks): P(.|s,a) ~ Dirichlet(1) (rows sum to 1, E = 1/S, Var =
    (S-1)/(S^2 (S+1)) = 9/1100 at S = 10), mu ~ N(1, 1); r ~ N(mu(s, a), 1); s' ~ P(.|s, a);
    episodes start in state 0 and are truncated after episode_length steps."""
    env = TabularMDP(num_states=10, num_actions=5, episode_length=3)
    # A deterministic task: (s, a) -> (s + a + 1) mod S, mean reward s - a.
    s_, a_ = np.meshgrid(np.arange(10), np.arange(5), indexing="ij")
    det = TabularMDPParams(np.eye(10, dtype=np.float32)[(s_ + a_ + 1) % 10],
                           (s_ - a_).astype(np.float32))

    def run(key):  # one compiled program: task sampling and a 3-step episode
        tasks = jax.vmap(env.sample_params)(jax.random.split(key, 40))
        obs0, st = env.reset(key, det)

        def roll(st, a):
            obs, st, r, term, trunc = env.step(jax.random.PRNGKey(2), st, a, det)
            return st, (obs, r, term, trunc)

        return tasks, obs0, jax.lax.scan(roll, st, jnp.array([2, 1, 0]))[1]

    tasks, obs0, (obs, r, term, trunc) = jax.jit(run)(jax.random.PRNGKey(0))
    P, mu = np.asarray(tasks.transitions), np.asarray(tasks.reward_mean)
    assert P.shape == (40, 10, 5, 10) and mu.shape == (40, 10, 5)
    np.testing.assert_allclose(P.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(P.mean(), 0.1, atol=1e-3)
    np.testing.assert_allclose(P.var(), 9 / 1100, rtol=0.05)
    np.testing.assert_allclose([mu.mean(), mu.std()], [1.0, 1.0], atol=0.1)
    np.testing.assert_array_equal(obs0, np.eye(10)[0])
    np.testing.assert_array_equal(obs.argmax(-1), [3, 5, 6])  # 0+2+1, 3+1+1, 5+0+1
    np.testing.assert_array_equal(np.asarray(term), [False] * 3)
    np.testing.assert_array_equal(np.asarray(trunc), [False, False, True])
    noise = np.asarray(r) - np.array([0 - 2, 3 - 1, 5 - 0])  # one N(0, 1) draw each
    assert np.all(np.abs(noise) < 5) and not np.allclose(noise, 0)


def test_point_nav_clips_the_velocity_and_rewards_minus_distance():
    """Finn et al. Sec. 5.2 by hand: goal (0.3, -0.2), action (0.5, -0.05) is clipped to
    (0.1, -0.05): pos (0.1, -0.05), reward -sqrt(0.2^2 + 0.15^2) = -0.25; reaching within
    0.01 of the goal terminates; goals ~ U[-0.5, 0.5]^2."""
    env = PointNav2D(episode_length=100)
    goal = jnp.array([0.3, -0.2])

    def run(key):
        _, st = env.reset(key, goal)
        first = env.step(key, st, jnp.array([0.5, -0.05]), goal)
        near = st.replace(pos=jnp.array([0.2, -0.15]))
        last = env.step(key, near, jnp.array([0.1, -0.051]), goal)
        return first, last, jax.vmap(env.sample_params)(jax.random.split(key, 1000))

    (obs, _, r, term, trunc), (_, _, r2, term2, _), goals = jax.jit(run)(jax.random.PRNGKey(0))
    np.testing.assert_allclose(obs, [0.1, -0.05], rtol=1e-6)
    np.testing.assert_allclose(r, -0.25, rtol=1e-5)
    assert not bool(term) and not bool(trunc)
    assert bool(term2) and abs(float(r2)) < 0.01
    assert float(goals.min()) >= -0.5 and float(goals.max()) <= 0.5 and goals.shape == (1000, 2)


def test_trial_keeps_the_task_for_n_episodes_and_ends_only_at_the_last():
    """`make_meta` on 2-armed bandits with p = (1, 0) for env 0, 3 episodes per trial, by
    hand. obs = [1, one-hot(a_{t-1}), r_{t-1}, d_{t-1}]; zeros at a trial's first step.
    Pulls 0, 1, 0 give rewards 1, 0, 1; done only after the 3rd; the task stays (1, 0)
    during the trial and is redrawn (sampler) after it; the episode counter runs 0, 1, 2."""
    vec = make_meta("Meta-Bandit-2", 2, episodes_per_trial=3)
    assert vec.observation_shape == (5,) and vec.num_actions == 2

    def run(key):
        obs0, vs = vec.reset(key)
        vs = vs.replace(params=BanditParams(jnp.array([[1.0, 0.0], [1.0, 0.0]])))

        def body(vs, x):
            a, k = x
            obs, vs2, r, d, info = vec.step(vs, jnp.array([a, a]), k)
            ret = info["returned_episode_return"]
            return vs2, (obs, r, d, vs.env_state.episode, vs2.params.p, ret)

        xs = (jnp.array([0, 1, 0, 1]), jax.random.split(key, 4))
        return obs0, jax.lax.scan(body, vs, xs)[1]

    obs0, (obs, r, d, episode, p, ret) = jax.jit(run)(jax.random.PRNGKey(0))
    np.testing.assert_array_equal(obs0[0], [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(r[:3, 0], [1, 0, 1])
    np.testing.assert_array_equal(d[:, 0], [False, False, True, False])
    np.testing.assert_array_equal(episode[:, 0], [0, 1, 2, 0])
    np.testing.assert_array_equal(obs[0, 0], [1, 1, 0, 1, 1])  # a=0, r=1, inner done
    np.testing.assert_array_equal(obs[1, 0], [1, 0, 1, 0, 1])  # a=1, r=0
    np.testing.assert_array_equal(obs[2, 0], [1, 0, 0, 0, 0])  # new trial: zeros
    np.testing.assert_array_equal(p[:2, 0], [[1, 0], [1, 0]])  # task kept inside the trial
    assert not np.allclose(p[2, 0], [1, 0])  # a new task drawn for the next trial
    np.testing.assert_array_equal(ret[:3, 0], [0, 0, 2])  # the trial's return


def test_trial_resets_the_inner_env_between_episodes():
    """On a tabular MDP with 2-step episodes and 2 episodes per trial: the inner state
    returns to 0 (one-hot) after each inner episode, d_{t-1} = 1 there, the inner clock
    restarts, and only step 4 ends the trial. Unknown ids name the known ones."""
    env = Trial(meta_env("Meta-TabularMDP", num_states=4, num_actions=2, episode_length=2), 2)
    params = env.default_params()  # uniform transitions (no Dirichlet draw to compile)

    def run(key):
        _, st = env.reset(key, params)

        def body(st, k):
            obs, st, r, term, trunc = env.step(k, st, jnp.int32(1), params)
            return st, (obs, term, st.inner.time)

        return jax.lax.scan(body, st, jax.random.split(key, 4))[1]

    obs, term, time = jax.jit(run)(jax.random.PRNGKey(1))
    assert obs.shape == (4, 4 + 2 + 2)
    np.testing.assert_array_equal(obs[:, -1], [0, 1, 0, 1])  # d_{t-1}
    np.testing.assert_array_equal(obs[1, :4], [1, 0, 0, 0])  # back in state 0
    np.testing.assert_array_equal(time, [1, 0, 1, 0])
    np.testing.assert_array_equal(term, [False, False, False, True])
    with pytest.raises(ValueError, match="known: Meta-Bandit-<K>"):
        make_meta("Meta-Bandits", 2, 2)


def test_noisy_tv_screen_shows_noise_only_on_the_tv_and_the_remote_controls_it():
    """`NoisyTV` on FourRooms (TV on cells (4-5, 3-4) of the start room), one jitted scan of
    a fixed walk per variant. Uncontrollable: the 8 screen features are 0 off the TV and a
    new uniform draw at every step on it. Controllable: a 5th action, the remote, redraws
    the picture and leaves the agent where it is; walking on the TV keeps the picture.
    Breaks caught: noise shown everywhere (no TV cell test), a static picture, a remote that
    moves the agent or does not redraw."""
    D, U, R, REMOTE = 1, 0, 3, 4
    # (1,1) -D-> (2,1) -D-> (3,1) -D-> (4,1) -R-> (4,2) -R-> (4,3)tv -R-> (4,4)tv, then the
    # remote twice (uncontrollable: down twice, to (5,4)tv and into the wall), up, down
    walk = jnp.array([D, D, D, R, R, R, REMOTE, REMOTE, U, D])

    def run(controllable):
        env = envs.NoisyTV(envs.GridMaze(envs.FOUR_ROOMS), envs.FOUR_ROOMS_TV_CELLS,
                           controllable=controllable)
        params = env.default_params()

        def step(state, xs):
            a, k = xs
            obs, state, *_ = env.step(k, state, a, params)
            return state, (obs, env.position(state))

        @jax.jit
        def go(key):
            obs0, state = env.reset(key, params)
            a = walk if controllable else jnp.where(walk == REMOTE, D, walk)
            return obs0, jax.lax.scan(step, state, (a, jax.random.split(key, len(walk))))[1]

        obs0, (obs, pos) = go(jax.random.PRNGKey(0))
        return env, np.asarray(obs0), np.asarray(obs[:, 2:]), [tuple(p) for p in np.asarray(pos)]

    env, obs0, screen, pos = run(False)
    assert env.num_actions == 4 and screen.shape == (10, 8)
    on = np.array([p in envs.FOUR_ROOMS_TV_CELLS for p in pos])
    assert on.tolist() == [False] * 4 + [True] * 6, pos
    assert (screen[~on] == 0).all() and (screen[on] > 0).all() and not obs0[2:].any()
    assert all(not np.allclose(a, b) for a, b in zip(screen[4:], screen[5:], strict=False))

    env, _, screen, pos = run(True)
    assert env.num_actions == 5
    assert pos[4:] == [(4, 3), (4, 4), (4, 4), (4, 4), (3, 4), (4, 4)], pos
    np.testing.assert_array_equal(screen[4], screen[5])  # walking on the TV: same picture
    assert not np.allclose(screen[6], screen[5]) and not np.allclose(screen[7], screen[6])
    assert not screen[8].any()  # off the TV
    np.testing.assert_array_equal(screen[9], screen[7])  # back on it: the last picture


# ----------------------------------------------------------------------------- dynamics DR

from common.envs import DynamicsParams, DynamicsRandomized, GymnaxEnv, with_physics  # noqa: E402

PHYSICS = {  # every physical field a DR file randomizes, per gymnax task
    "CartPole-v1": ("masscart", "masspole", "length", "gravity", "force_mag", "tau"),
    "Pendulum-v1": ("m", "l", "g", "max_torque", "dt"),
}


def _trajectories(env_id: str, params_list, steps: int = 30, max_delay: int = 0):
    """Observations of `steps` steps from the same reset key under the same action sequence
    (alternating for CartPole; for Pendulum a slow sine of amplitude 3, beyond the torque
    limit 2, which is all that max_torque is), one row per params: [P, T, D].
    One compiled program for all params (they are stacked)."""
    env = DynamicsRandomized(GymnaxEnv(env_id), max_delay)
    if env.num_actions:
        actions = jnp.arange(steps) % 2
    else:
        actions = 3.0 * jnp.sin(jnp.arange(steps) / 4.0)[:, None]
    stacked = jax.tree.map(lambda *x: jnp.stack([jnp.asarray(v) for v in x]), *params_list)

    def one(p):
        obs, s = env.reset(jax.random.key(0), p)

        def body(s, a):
            obs, s, _, _, _ = env.step(jax.random.key(1), s, a, p)
            return s, obs

        return jax.lax.scan(body, s, actions)[1]

    return np.asarray(jax.jit(jax.vmap(one))(stacked))


@pytest.mark.parametrize("env_id", sorted(PHYSICS))
def test_every_randomized_physics_field_changes_the_trajectory(env_id):
    """The catalogue's per-backend check (gymnax): each field a DR file randomizes, set to
    1.5x nominal through `with_physics`, moves the observations of 30 fixed-action steps
    from one reset by more than 1e-3 (measured: 0.004 to 1.9). Broken variant in the same
    test: a field the dynamics never read (CartPole's x_threshold, only a termination
    bound; Pendulum's max_steps_in_episode) leaves them identical, so it would fail the
    assert. And CartPole's derived fields follow masspole and length."""
    base = GymnaxEnv(env_id).default_params()
    dyn = lambda phys: DynamicsParams(phys, np.int32(0), np.float32(0.0))
    fields = PHYSICS[env_id]
    dead = "x_threshold" if env_id == "CartPole-v1" else "max_steps_in_episode"
    changed = [with_physics(base, **{f: getattr(base, f) * 1.5}) for f in fields]
    changed.append(base.replace(**{dead: getattr(base, dead) * 2}))
    obs = _trajectories(env_id, [dyn(base)] + [dyn(p) for p in changed])
    moved = np.abs(obs[1:] - obs[0]).max(axis=(1, 2))
    print(dict(zip([*fields, dead], moved.round(4), strict=True)))
    assert (moved[:-1] > 1e-3).all(), dict(zip(fields, moved, strict=False))
    assert moved[-1] == 0.0
    if env_id == "CartPole-v1":
        p = with_physics(base, masspole=0.3, length=0.7)
        assert np.isclose(p.total_mass, base.masscart + 0.3)
        assert np.isclose(p.polemass_length, 0.3 * 0.7)
        naive = base.replace(masspole=0.3, length=0.7)  # the gotcha: derived fields stale
        assert np.isclose(naive.polemass_length, base.polemass_length)
    with pytest.raises(ValueError, match="has no field"):
        with_physics(base, friction=2.0)


def test_action_delay_applies_the_action_chosen_d_steps_before():
    """Delay d = 2: the trajectory equals the undelayed one under the action sequence
    shifted by two steps with the default action (0: push left) in front. Delay 0 gives the
    plain env (the buffer is transparent); a wrapper that ignored the delay fails the first
    assert (its trajectory is the unshifted one, max diff 0.3)."""
    base = GymnaxEnv("CartPole-v1").default_params()
    env = DynamicsRandomized(GymnaxEnv("CartPole-v1"), max_delay=3)
    actions = jnp.array([1, 1, 0, 1, 1, 1, 0, 0, 1, 1])
    shifted = jnp.concatenate([jnp.zeros(2, jnp.int32), actions[:-2]])

    def run(delay, acts):
        p = DynamicsParams(base, jnp.int32(delay), jnp.float32(0.0))
        _, s = env.reset(jax.random.key(0), p)

        def body(s, a):
            obs, s, _, _, _ = env.step(jax.random.key(1), s, a, p)
            return s, obs

        return jax.lax.scan(body, s, acts)[1]

    run = jax.jit(run)
    np.testing.assert_allclose(run(2, actions), run(0, shifted), atol=1e-6)
    assert np.abs(run(2, actions) - run(0, actions)).max() > 0.1
    plain = GymnaxEnv("CartPole-v1")
    _, s = plain.reset(jax.random.split(jax.random.key(0))[0], base)  # the wrapper's split
    obs0, *_ = plain.step(jax.random.key(1), s, actions[0], base)
    np.testing.assert_allclose(run(0, actions)[0], obs0, atol=1e-7)


def test_observation_noise_is_gaussian_with_the_episode_std_and_leaves_the_state():
    """obs_noise = 0.05: the observed minus the true observation has std 0.05 (within 10%)
    and mean ~0 over 256 envs x 4 features x 20 steps; the inner state, reward and
    termination are those of the noiseless env (noise only on what the agent sees)."""
    base = GymnaxEnv("CartPole-v1").default_params()
    env = DynamicsRandomized(GymnaxEnv("CartPole-v1"))

    def run(key, noise):
        p = DynamicsParams(base, jnp.int32(0), jnp.float32(noise))
        obs, s = env.reset(key, p)

        def body(s, k):
            obs, s, r, term, _ = env.step(k, s, jnp.int32(1), p)
            true = env.env.env.get_obs(s.inner)
            return s, (obs - true, r, term, s.inner.x)

        return jax.lax.scan(body, s, jax.random.split(key, 20))[1]

    keys = jax.random.split(jax.random.key(3), 256)
    noisy = jax.jit(jax.vmap(run, (0, None)))(keys, 0.05)
    clean = jax.jit(jax.vmap(run, (0, None)))(keys, 0.0)
    err = np.asarray(noisy[0])
    assert abs(err.std() - 0.05) < 0.005 and abs(err.mean()) < 0.005, (err.std(), err.mean())
    assert np.abs(np.asarray(clean[0])).max() == 0.0
    for a, b in zip(noisy[1:], clean[1:], strict=True):
        np.testing.assert_array_equal(a, b)


def test_vecenv_redraws_dynamics_at_every_auto_reset():
    """A `VecEnv` over `DynamicsRandomized` with a sampler of (delay, pole length): each
    env's params change exactly where its episode ended (CartPole under random actions ends
    every ~20 steps) and never elsewhere."""
    base = GymnaxEnv("CartPole-v1").default_params()

    def sampler(key):
        k1, k2 = jax.random.split(key)
        phys = with_physics(base, length=jax.random.uniform(k1, minval=0.25, maxval=1.0))
        return DynamicsParams(phys, jax.random.randint(k2, (), 0, 3), jnp.float32(0.0))

    vec = VecEnv(DynamicsRandomized(GymnaxEnv("CartPole-v1"), 2), 8, sampler)

    def run(key):
        _, vs = vec.reset(key)

        def body(vs, k):
            before = vs.params.physics.length
            a = jax.random.randint(k, (8,), 0, 2)
            _, vs, _, done, _ = vec.step(vs, a, k)
            return vs, (done, before != vs.params.physics.length,
                        vs.params.physics.polemass_length / vs.params.physics.length)

        return jax.lax.scan(body, vs, jax.random.split(key, 100))[1]

    done, changed, masspole = map(np.asarray, jax.jit(run)(jax.random.key(0)))
    assert done.sum() > 20
    np.testing.assert_array_equal(changed, done)
    np.testing.assert_allclose(masspole, base.masspole, rtol=1e-5)  # derived field follows


def test_deepsea_size_in_the_id():
    """``DeepSea-bsuite-<N>`` is gymnax's DeepSea at size N (an N x N board, positions on
    it), the same env as ``DeepSea-bsuite`` with size=N; a malformed size is unknown."""
    from common import envs

    a, b = envs.make("DeepSea-bsuite-12", 2), envs.make("DeepSea-bsuite", 2, size=12)
    assert a.observation_shape == b.observation_shape == (12, 12)
    envs.check_id("DeepSea-bsuite-12")
    for bad in ("DeepSea-bsuite-0", "DeepSea-bsuite-x"):
        with pytest.raises(ValueError, match="Unknown environment"):
            envs.check_id(bad)
