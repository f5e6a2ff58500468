"""Tests of exploration/count_tabular.py: the count bonus, the count and model updates, MBIE-EB
value iteration and the Q-learning step (hand-computed, through the functions `update`
calls), DORA's E-values against the counts, the MDP tables, behaviour, purity and CLI."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import run
from exploration import count_tabular as ct
from tests.common.cli import cli_args
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# One tiny configuration for the module: RiverSwim, 1000 steps in 10 updates of 100.
TINY = ct.Config(total_timesteps=1000, num_steps=100, beta=1000.0)
SEEDS = 8


@pytest.fixture(scope="module")
def riverswim_runs():
    """TINY with the bonus (beta = 1000) and without (beta = 0, the broken variant), 8 seeds
    each, in ONE compiled vmap (beta is traced). The first two keys are the runner's seeds
    0 and 1 of a 2-seed run, so the CLI test can compare against them."""
    def one(key, beta):
        return run.make_train(ct.init, ct.update, dataclasses.replace(TINY, beta=beta))(key)

    keys = jnp.concatenate([run.seed_keys(0, 2), run.seed_keys(1, SEEDS - 2)])
    keys = jnp.concatenate([keys, keys])
    betas = jnp.repeat(jnp.array([TINY.beta, 0.0]), SEEDS)
    train = jax.jit(jax.vmap(one))
    out = jax.device_get(train(keys, betas))
    return train, keys, betas, out


def test_count_bonus_by_hand():
    """[1] r^+ = beta n^(-1/2): beta = 2 on counts [[0, 1], [4, 9]] gives [[0, 2], [1, 2/3]]
    (a pair never tried gets no bonus: the optimistic value covers it)."""
    b = ct.count_bonus(jnp.array([[0, 1], [4, 9]], jnp.int32), 2.0)
    np.testing.assert_allclose(b, [[0.0, 2.0], [1.0, 2.0 / 3.0]], rtol=1e-6)


def test_counts_and_empirical_model_by_hand():
    """Counts after (0,1)->1 r=2, (0,1)->0 r=0, (0,1)->1 r=4, then a 4th sample past the cap
    (learn = False, not counted): n(0,1) = 3, n(0,1,.) = [1, 2], R^ = 2, T^ = [1/3, 2/3];
    pairs never tried have R^ = T^ = 0."""
    counts, trans, rew = jnp.zeros((2, 2), jnp.int32), jnp.zeros((2, 2, 2), jnp.int32), \
        jnp.zeros((2, 2))
    observe = jax.jit(ct.observe)
    for s_next, r, learn in ((1, 2.0, True), (0, 0.0, True), (1, 4.0, True), (1, 9.0, False)):
        counts, trans, rew = observe(counts, trans, rew, 0, 1, s_next, r, jnp.asarray(learn))
    np.testing.assert_array_equal(counts, [[0, 3], [0, 0]])
    np.testing.assert_array_equal(trans[0, 1], [1, 2])
    r_hat, t_hat = ct.empirical_model(counts, trans, rew)
    np.testing.assert_allclose(r_hat, [[0.0, 2.0], [0.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(t_hat[0, 1], [1 / 3, 2 / 3], rtol=1e-6)
    assert float(jnp.abs(t_hat[1]).sum()) == 0.0


def test_value_iteration_by_hand():
    """[1] MBIE-EB on 2 states, gamma = 0.5, beta = 1, untried pairs worth v_unknown = 0:
    (0,0) -> 1 surely, reward 1; (1,0) -> 0 or 1 evenly, reward 0; 4 samples of each, so
    both bonuses are 1/2; (0,1), (1,1) never tried.
        Q10 = 0.5 + 0.25 Q00 + 0.25 Q10,  Q00 = 1.5 + 0.5 Q10  =>  Q10 = 1.4, Q00 = 2.2.
    Without the bonus (beta = 0): Q10 = 0.4, Q00 = 1.2. With v_unknown = 10 the untried
    actions win: Q = [[6.5, 10], [5.5, 10]]."""
    counts = jnp.array([[4, 0], [4, 0]], jnp.int32)
    trans = jnp.zeros((2, 2, 2), jnp.int32).at[0, 0, 1].set(4).at[1, 0].set(jnp.array([2, 2]))
    r_hat, t_hat = ct.empirical_model(counts, trans, jnp.array([[4.0, 0.0], [0.0, 0.0]]))
    vi = jax.jit(ct.value_iteration, static_argnames=("max_iters",))

    def solve(beta, v0):
        q, res, sweeps = vi(jnp.zeros((2, 2)), r_hat, t_hat, ct.count_bonus(counts, beta),
                            counts > 0, gamma=0.5, v_unknown=v0, tol=1e-7, max_iters=1000)
        assert res < 1e-7 and 1 < sweeps < 1000
        return q

    np.testing.assert_allclose(solve(1.0, 0.0), [[2.2, 0.0], [1.4, 0.0]], rtol=1e-5)
    np.testing.assert_allclose(solve(0.0, 0.0), [[1.2, 0.0], [0.4, 0.0]], rtol=1e-5)
    np.testing.assert_allclose(solve(1.0, 10.0), [[6.5, 10.0], [5.5, 10.0]], rtol=1e-5)


def test_q_learning_update_by_hand():
    """Q(0,1) = 2, r + r^+ = 1 + 0.5, gamma = 0.9, max Q(1,.) = 4, lr = 0.1:
    TD = 1.5 + 3.6 - 2 = 3.1, Q(0,1) = 2.31; nothing else moves."""
    q = jnp.array([[0.0, 2.0], [4.0, -1.0]])
    q2, td = ct.q_learning_update(q, 0, 1, 1.5, 1, lr=0.1, gamma=0.9)
    np.testing.assert_allclose(td, 3.1, rtol=1e-6)
    np.testing.assert_allclose(q2, [[0.0, 2.31], [4.0, -1.0]], rtol=1e-6)


def test_dora_e_values_are_scaled_counts_at_gamma_e_zero():
    """[2] with gamma_E = 0: after n updates E = (1 - alpha)^n, -log E = n (-log(1 - alpha)),
    so the DORA bonus equals the count bonus / sqrt(-log(1 - alpha)) to 1e-6 (n = 1..50,
    alpha = 0.1). One step with gamma_E = 0.5 from E = 1 everywhere: 0.9 + 0.1 * 0.5 = 0.95."""
    alpha = 0.1

    def run_updates(e, _):
        e = ct.e_value_update(e, 0, 1, 1, 0, lr=alpha, gamma_e=0.0)
        return e, ct.dora_bonus(e, 3.0)[0, 1]

    _, dora = jax.jit(lambda e: jax.lax.scan(run_updates, e, None, 50))(jnp.ones((2, 2)))
    count = ct.count_bonus(jnp.arange(1, 51), 3.0) / math.sqrt(-math.log(1 - alpha))
    np.testing.assert_allclose(dora, count, rtol=1e-6)
    e = ct.e_value_update(jnp.ones((2, 2)), 0, 1, 1, 0, lr=alpha, gamma_e=0.5)
    np.testing.assert_allclose(e, [[1.0, 0.95], [1.0, 1.0]], rtol=1e-6)
    assert float(ct.dora_bonus(jnp.ones(()), 3.0)) == 0.0  # never visited: no bonus


def test_mdp_tables():
    """RiverSwim as [1] Fig. 2; SixArms' hub odds and room rewards; DeepSea's right path
    pays 1 - 0.01 (the 10 move costs) once per 10-step walk. Sampled RiverSwim "right" in a
    middle state: 0.1 / 0.6 / 0.3 (4000 draws of env_step)."""
    for env in ct.ENVS:
        P, R, p0 = ct.make_mdp(env, 10)
        np.testing.assert_allclose(P.sum(-1), 1.0, rtol=1e-6)
        assert abs(p0.sum() - 1) < 1e-6
    P, R, p0 = ct.make_mdp("RiverSwim", 10)
    np.testing.assert_allclose(P[0, 1, :2], [0.7, 0.3])
    np.testing.assert_allclose(P[3, 1, 2:5], [0.1, 0.6, 0.3])
    np.testing.assert_allclose(P[5, 1, 4:], [0.7, 0.3])
    assert R[0, 0, 0] == 5 and R[5, 1, 5] == 10_000 and R.sum() == 10_005
    np.testing.assert_allclose(p0, [0, 0.5, 0.5, 0, 0, 0])
    P, R, _ = ct.make_mdp("SixArms", 10)
    np.testing.assert_allclose(P[0, np.arange(6), np.arange(1, 7)],
                               [1, 0.15, 0.1, 0.05, 0.03, 0.01], rtol=1e-6)
    np.testing.assert_allclose(R[np.arange(1, 7), np.arange(6), np.arange(1, 7)],
                               [50, 133, 300, 800, 1660, 6000])
    P, R, _ = ct.make_mdp("DeepSea", 10)
    s, total = 0, 0.0
    for _ in range(10):  # always take "right": the action with a cost (or the treasure)
        a = int(np.argmax(np.abs(R[s]).sum(-1)))
        s_next = int(P[s, a].argmax())
        total += R[s, a, s_next]
        s = s_next
    assert s == 0 and abs(total - 0.99) < 1e-6
    P, R, _ = (jnp.asarray(x) for x in ct.make_mdp("RiverSwim", 10))
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    nxt, _ = jax.jit(jax.vmap(lambda k: ct.env_step(k, P, R, 3, 1)))(keys)
    np.testing.assert_allclose(np.bincount(np.asarray(nxt), minlength=6)[2:5] / 4000,
                               [0.1, 0.6, 0.3], atol=0.025)


def test_bonus_reaches_the_far_bank_and_train_is_pure(riverswim_runs):
    """Behaviour ([1] Sec. 6, RiverSwim): 1000 steps, 8 seeds. MBIE-EB (beta = 1000) against
    the broken variant, the same learner with beta = 0 (untried pairs still optimistic).
    Measured on CPU (jax 0.10.2):
        beta = 1000: 10000-reward hits 32-84 per seed, 6/6 states in every seed,
                     total 3.2e5-8.4e5
        beta = 0:    0 hits in 7 of 8 seeds (one lucky seed: 59), 3.1 states on average,
                     total ~5e3 (stuck at the left bank, where the certainty-equivalent
                     model says "right" goes nowhere)
    Setting the bonus to 0 inside `update`, or beta * n instead of beta / sqrt(n), fails here.
    Same keys give bit-identical results a second time; different seeds differ."""
    train, keys, betas, (state, metrics) = riverswim_runs
    hits, states = state.far_hits, state.visited.sum(-1)
    on, off = slice(0, SEEDS), slice(SEEDS, 2 * SEEDS)
    print("hits", hits[on], hits[off], "states", states[on], states[off],
          "total", state.total_reward[on], state.total_reward[off])
    assert (hits[on] > 0).all() and (hits[off] > 0).sum() <= 2, hits
    assert (states[on] == 6).all() and states[off].mean() <= 4.5, states
    assert np.median(state.total_reward[on]) > 10 * np.median(state.total_reward[off])
    assert metrics["charts/total_reward"].shape == (2 * SEEDS, TINY.num_updates)
    assert np.isfinite(metrics["losses/bellman_residual"]).all()
    assert not np.array_equal(metrics["charts/reward"][0], metrics["charts/reward"][1])
    state2, metrics2 = jax.device_get(train(keys, betas))
    jax.tree.map(np.testing.assert_array_equal, state, state2)
    np.testing.assert_array_equal(metrics["charts/reward"], metrics2["charts/reward"])


def test_cli_dora_run_equals_the_count_run(riverswim_runs, tmp_path, capsys):
    """`--help` documents every field. A 2-seed CLI run in DORA mode with gamma_E = 0 and
    beta scaled by sqrt(-log(1 - alpha)) has the count run's bonus to ~1e-6 at every step
    ([2]'s E-values as counts), so it takes the same actions as the fixture's count run of
    the same seeds: identical counts, reward and hits."""
    with pytest.raises(SystemExit):
        ct.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(ct.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, sixarms, paper" in out

    dora = dataclasses.replace(TINY, bonus="dora", gamma_e=0.0, dora_lr=0.1,
                               beta=TINY.beta * math.sqrt(-math.log(1 - 0.1)))
    res = ct.main(cli_args(dora, ct.Config()) + ["--num-seeds", "2", "--run-dir",
                                                 str(tmp_path), "--no-progress"])
    assert (tmp_path / "metrics.jsonl").exists()
    assert "total_reward" in capsys.readouterr().out
    _, _, _, (state, _) = riverswim_runs
    np.testing.assert_array_equal(res.state.counts, state.counts[:2])
    np.testing.assert_array_equal(res.final["far_reward_hits"], state.far_hits[:2])
    e = np.asarray(res.state.e)
    np.testing.assert_allclose(-np.log(e), -np.log(0.9) * np.asarray(state.counts[:2]),
                               rtol=1e-4)


def test_bad_values_fail_with_named_field(tmp_path):
    for args, msg in ((["--beta", "-1"], "beta=-1"), (["--gamma-e", "1.0"], "gamma_e=1.0"),
                      (["--learner", "sarsa"], "learner='sarsa'"),
                      (["--env-id", "Chain"], "env_id='Chain'")):
        with pytest.raises(ValueError, match=msg):
            ct.main(args + ["--run-dir", str(tmp_path)])


def test_every_config_field_is_read():
    """No flag that lies: each Config field is read by code that runs (AST, not text)."""
    assert unread_fields(ct) == []


def test_paper_preset_traces():
    """jax.eval_shape of init and one update under `paper` (and, as cheap traces, the
    Q-learning and DORA paths and the other two environments)."""
    _, state, (after, metrics) = trace_paper(ct)
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
    for over in (dict(learner="q"), dict(bonus="dora", gamma_e=0.9),
                 ct.PRESETS["quick"], ct.PRESETS["sixarms"]):
        _, state, (after, _) = trace_paper(ct, **over)
        assert after.q.shape == state.q.shape
