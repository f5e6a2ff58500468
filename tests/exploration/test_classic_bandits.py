"""Tests of exploration/classic_bandits.py: the UCB1 index, the Beta and Gaussian posteriors,
the Boltzmann probabilities and the epsilon-greedy frequencies by hand (through `select`, the
function the scanned step calls), the regret bookkeeping, and one shared 2-seed CLI run for
the CLI, purity and behaviour tests."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from exploration import classic_bandits as cb
from tests.common.cli import cli_args
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# One tiny configuration for the shared run: 5-armed Bernoulli bandits, 64 instances per seed,
# 800 pulls in 8 logged updates, constant epsilon = 0.1.
TINY = cb.Config(num_arms=5, num_bandits=64, horizon=800, pulls_per_update=100, epsilon=0.1)
N_DRAWS = 20_000


# The sampling checks below compare `select`'s arm frequencies with hand-computed
# probabilities. All draws come from ONE jitted program (one compile), one vmapped `select`
# per strategy, over a stack of cases (counts, sums) [C, K] at time t.
B3 = dataclasses.replace(TINY, num_arms=3)
GAUSS = dataclasses.replace(TINY, bandit="gaussian", num_arms=2, reward_std=2.0)
CASES = {  # strategy: (cfg, t, counts [C, K], sums [C, K])
    "ucb1": (B3, 7.0, [[2.0, 1.0, 4.0], [0.0, 3.0, 0.0]], [[1.0, 1.0, 3.0], [0.0, 3.0, 0.0]]),
    "thompson_gauss": (GAUSS, 5.0, [[2.0, 0.0]], [[4.0, 0.0]]),
    "boltzmann": (dataclasses.replace(B3, tau=0.5), 3.0, [[2.0, 1.0, 0.0]], [[1.0, 1.0, 0.0]]),
    "epsilon_greedy": (dataclasses.replace(TINY, epsilon=0.2), 11.0,
                       [[3.0, 2.0, 5.0, 1.0, 0.0]] * 2,
                       [[1.0, 1.0, 4.0, 0.0, 0.0], [2.4, 1.0, 4.0, 0.0, 0.0]]),
}
N_DRAWS = 20_000


@pytest.fixture(scope="module")
def samples():
    """{strategy: arms [C, N_DRAWS] that `select` pulls in each case}."""
    def sample():
        keys = jax.random.split(jax.random.PRNGKey(0), N_DRAWS)
        out = {}
        for case, (cfg, t, counts, sums) in CASES.items():
            name = case.removesuffix("_gauss")  # Gaussian arms: cfg.bandit = "gaussian"

            def one(k, c, s, name=name, cfg=cfg, t=t):
                return cb.select(name, k, c, s, t, cfg)

            per_case = jax.vmap(one, in_axes=(0, None, None))  # over the keys
            out[case] = jax.vmap(per_case, in_axes=(None, 0, 0))(keys, jnp.array(counts),
                                                                  jnp.array(sums))
        return out

    return jax.device_get(jax.jit(sample)())


def freqs(actions, k):
    return np.bincount(np.asarray(actions), minlength=k) / len(actions)


def test_ucb1_index_by_hand(samples):
    """[1] Fig. 1: Q(a) + sqrt(c ln t / N(a)); an arm never pulled has an infinite index and
    ties are broken at random, so the first K pulls of UCB1 are a random permutation."""
    _, t, counts, sums = CASES["ucb1"]
    counts, sums = jnp.array(counts), jnp.array(sums)
    idx = cb.ucb1_index(counts[0], sums[0], t, 2.0)
    want = [0.5 + math.sqrt(2 * math.log(7) / 2), 1.0 + math.sqrt(2 * math.log(7)),
            0.75 + math.sqrt(2 * math.log(7) / 4)]  # 1.895, 2.973, 1.736
    np.testing.assert_allclose(idx, want, rtol=1e-6)
    np.testing.assert_allclose(cb.ucb1_index(counts[0], sums[0], t, 0.5)[1],
                               1.0 + math.sqrt(0.5 * math.log(7)), rtol=1e-6)
    assert (samples["ucb1"][0] == 1).all()
    # N = 0 for arms 0 and 2: either is pulled (a tie of +inf), never arm 1.
    idx = np.asarray(cb.ucb1_index(counts[1], sums[1], t, 2.0))
    assert np.isinf(idx[[0, 2]]).all() and np.isfinite(idx[1])
    f = freqs(samples["ucb1"][1], 3)
    assert f[1] == 0 and abs(f[0] - 0.5) < 0.02, f


def test_beta_posterior_by_hand():
    """Bernoulli Thompson sampling: alpha += r, beta += 1 - r from the prior, through `observe`
    (the step's update) and `beta_posterior` (what `thompson_sample` draws from). The draws
    themselves are not sampled here (jax.random.beta's compile costs ~4 CPU s): a sampler
    with alpha and beta swapped fails the behaviour test (its regret is the worst arm's)."""
    counts, sums = jnp.zeros(3), jnp.zeros(3)
    for a, r in [(1, 1.0), (1, 0.0), (1, 1.0), (1, 1.0), (0, 0.0)]:
        counts, sums = cb.observe(counts, sums, jnp.asarray(a), jnp.asarray(r))
    np.testing.assert_array_equal(counts, [1.0, 4.0, 0.0])
    np.testing.assert_array_equal(sums, [0.0, 3.0, 0.0])
    alpha, beta = cb.beta_posterior(counts, sums, 1.0, 1.0)
    np.testing.assert_array_equal(alpha, [1.0, 4.0, 1.0])
    np.testing.assert_array_equal(beta, [2.0, 2.0, 1.0])
    alpha, beta = cb.beta_posterior(counts, sums, 2.0, 3.0)
    np.testing.assert_array_equal(alpha, [2.0, 5.0, 2.0])
    np.testing.assert_array_equal(beta, [4.0, 4.0, 3.0])


def test_gaussian_posterior_by_hand(samples):
    """Gaussian Thompson sampling, known noise sigma: 1/v = 1/s0^2 + N/s^2,
    m = v (m0/s0^2 + S/s^2); an arm never pulled keeps the prior."""
    counts, sums = jnp.array([2.0, 0.0]), jnp.array([4.0, 0.0])  # rewards 1 and 3 on arm 0
    mean, std = cb.gaussian_posterior(counts, sums, 0.0, 1.0, 2.0)
    np.testing.assert_allclose(mean, [(4 / 4) / 1.5, 0.0], rtol=1e-6)
    np.testing.assert_allclose(std, [math.sqrt(1 / 1.5), 1.0], rtol=1e-6)
    mean, std = cb.gaussian_posterior(counts, sums, 1.0, 0.5, 2.0)
    np.testing.assert_allclose(mean, [(1 / 0.25 + 1.0) / 4.5, 1.0], rtol=1e-6)
    np.testing.assert_allclose(std, [math.sqrt(1 / 4.5), 0.5], rtol=1e-6)
    # `select` (prior N(0, 1), sigma = 2) pulls arm 0 with P(theta_0 > theta_1)
    # = Phi((m_0 - m_1) / sqrt(v_0 + v_1)) = Phi((2/3) / sqrt(2/3 + 1)) = 0.697.
    p0 = 0.5 * (1 + math.erf((2 / 3) / math.sqrt(2 / 3 + 1) / math.sqrt(2)))
    np.testing.assert_allclose(freqs(samples["thompson_gauss"][0], 2), [p0, 1 - p0], atol=0.01)


def test_boltzmann_probabilities_by_hand(samples):
    """Post: pi(a) = exp(Q(a)/tau) / sum_b exp(Q(b)/tau), Q the sample average (0 unpulled);
    `select` draws arms at these frequencies. tau -> inf is uniform, tau -> 0 the argmax; the
    log schedule is tau / ln(n + 1), n = t + 1."""
    cfg, _, counts, sums = CASES["boltzmann"]  # Q = 0.5, 1, 0 and tau = 0.5
    counts, sums = jnp.array(counts[0]), jnp.array(sums[0])
    want = np.exp([1.0, 2.0, 0.0]) / np.exp([1.0, 2.0, 0.0]).sum()  # 0.245, 0.665, 0.090
    np.testing.assert_allclose(jax.nn.softmax(cb.boltzmann_logits(counts, sums, 0.5)), want,
                               rtol=1e-6)
    np.testing.assert_allclose(freqs(samples["boltzmann"][0], 3), want, atol=0.01)
    hot = jax.nn.softmax(cb.boltzmann_logits(counts, sums, 1e4))
    assert float((hot * jnp.log(hot * 3)).sum()) < 1e-3  # KL to uniform
    np.testing.assert_allclose(jax.nn.softmax(cb.boltzmann_logits(counts, sums, 1e-3)),
                               [0, 1, 0], atol=1e-6)
    log = dataclasses.replace(cfg, tau_schedule="log")
    np.testing.assert_allclose(cb.tau_at(0.0, log), 0.5 / math.log(2), rtol=1e-6)
    np.testing.assert_allclose(cb.tau_at(99.0, log), 0.5 / math.log(101), rtol=1e-6)
    assert float(cb.tau_at(99.0, cfg)) == 0.5


def test_epsilon_greedy_action_frequencies(samples):
    """With probability eps a uniform arm, else the greedy one: P(greedy) = 1 - eps + eps/K,
    eps/K for each other arm; greedy ties are split evenly. [1]'s epsilon_n schedule is
    min(1, cK / (d^2 n)), n = t + 1."""
    k, eps = 5, 0.2  # Q = 1/3, 1/2, 4/5, 0, 0: arm 2 is greedy
    want = np.full(k, eps / k)
    want[2] += 1 - eps
    np.testing.assert_allclose(freqs(samples["epsilon_greedy"][0], k), want, atol=0.01)
    # A tie between arms 0 and 2 (Q = 0.8): each gets (1 - eps)/2 + eps/K.
    np.testing.assert_allclose(freqs(samples["epsilon_greedy"][1], k),
                               [0.44, 0.04, 0.44, 0.04, 0.04], atol=0.015)
    assert float(cb.epsilon_at(5.0, CASES["epsilon_greedy"][0])) == pytest.approx(eps)
    auer = dataclasses.replace(TINY, num_arms=10, epsilon_schedule="auer", epsilon_c=0.15,
                               epsilon_d=0.1)
    assert float(cb.epsilon_at(0.0, auer)) == 1.0
    np.testing.assert_allclose(cb.epsilon_at(999.0, auer), 0.15 * 10 / (0.01 * 1000), rtol=1e-6)


def test_play_books_expected_regret_and_best_arm():
    """`play` (one scanned step of one strategy) adds mu* - mu_a to the regret, counts pulls
    of the best arm, and records the reward in N and S of the pulled arm only."""
    cfg = dataclasses.replace(TINY, num_arms=3, num_bandits=2, ucb_c=0.0)
    means = jnp.array([[0.2, 0.9, 0.5], [0.7, 0.1, 0.3]])
    counts = jnp.ones((2, 3))
    sums = jnp.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])  # UCB1 with c = 0: arms 2 and 0
    agent = cb.Agent(counts, sums, jnp.array([1.0, 2.0]), jnp.array([0.0, 5.0]))
    out = jax.jit(cb.play, static_argnums=(0, 5))("ucb1", jax.random.PRNGKey(0), agent, means,
                                                   3.0, cfg)
    np.testing.assert_allclose(out.regret, [1.0 + 0.4, 2.0 + 0.0], rtol=1e-6)
    np.testing.assert_array_equal(out.optimal, [0.0, 6.0])
    np.testing.assert_array_equal(out.counts, [[1, 1, 2], [2, 1, 1]])
    assert set(np.asarray(out.sums - sums)[[0, 1], [2, 0]]) <= {0.0, 1.0}
    np.testing.assert_array_equal(np.asarray(out.sums - sums)[[0, 0, 1, 1], [0, 1, 1, 2]], 0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """TINY from the command line (2 seeds, with --plot), twice with the same seed."""
    out = []
    for name in ("a", "b"):
        d = tmp_path_factory.mktemp(name)
        argv = cli_args(TINY, cb.Config()) + ["--num-seeds", "2", "--run-dir", str(d / "run"),
                                                "--no-progress", "--plot", str(d / "p.png")]
        out.append((cb.main(argv), d))
    return out


def test_cli_run_writes_its_files_and_plot(runs, capsys):
    """`--help` documents every field; the CLI run writes its logs and the regret plot."""
    with pytest.raises(SystemExit):
        cb.main(["--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(cb.Config):
        assert "--" + f.name.replace("_", "-") in text, f.name
    assert "Presets (--preset): quick, paper" in text and "--plot" in text
    res, d = runs[0]
    assert (d / "run" / "metrics.jsonl").exists() and (d / "p.png").stat().st_size > 10_000
    for s in cb.STRATEGIES:
        assert res.history[f"charts/regret_{s}"].shape == (2, 8)
        assert res.final[f"regret_{s}"].shape == (2,)
    assert int(res.state.t[0]) == TINY.horizon
    np.testing.assert_array_equal(res.state.agents["ucb1"].counts.sum(-1), TINY.horizon)


def test_runs_are_pure(runs):
    """Same seed, same results bit for bit; the two seeds differ (instances and pulls)."""
    (a, _), (b, _) = runs
    for k, v in a.history.items():
        np.testing.assert_array_equal(v, b.history[k], err_msg=k)
    assert not np.array_equal(a.state.means[0], a.state.means[1])
    assert a.history["charts/regret_thompson"][0, -1] != a.history["charts/regret_thompson"][1, -1]


def test_ucb1_and_thompson_regret_is_sublinear_and_epsilon_greedy_linear(runs):
    """Behaviour, 2 seeds x 64 five-armed Bernoulli bandits, 800 pulls (measured per seed;
    ratio = regret over the second half / over the first half; late = regret per pull over
    the last quarter; floor = eps x mean gap = 0.032, the rate of constant eps-greedy):
        uniform random (broken variant, exact: T x mean gap)  R_T 258, 264  ratio 1
        UCB1                R_T 62, 65    ratio 0.43, 0.48
        Thompson            R_T 16, 15    ratio 0.24, 0.18   late 0.007, 0.005
        eps-greedy, eps 0.1 R_T 43, 38    ratio 0.53, 0.63   late 0.036, 0.037 (1.1 floor)
    Pure greedy (eps-greedy with the coin never exploring) scored R_T 168, 150, ratio 1.00,
    late 0.21, 0.19 (6 floors). Asserted: UCB1 and Thompson below uniform / 3 with ratios
    < 0.6 and < 0.4, Thompson below UCB1; constant eps-greedy's late rate within 0.8-2 floors
    (linear regret at the floor: pure greedy and an inverted coin fail), Thompson's below a
    quarter of it."""
    res, _ = runs[0]
    h = {k.removeprefix("charts/"): v for k, v in res.history.items()}
    means = np.asarray(res.state.means)  # [seeds, B, K]
    mean_gap = (means.max(-1, keepdims=True) - means).mean((-1, -2))  # [seeds]
    uniform = TINY.horizon * mean_gap
    half, quarter = TINY.num_updates // 2, TINY.num_updates // 4
    out = {}
    for s in cb.STRATEGIES:
        r = h[f"regret_{s}"]
        out[s] = dict(R=r[:, -1], ratio=(r[:, -1] - r[:, half - 1]) / r[:, half - 1],
                      late=(r[:, -1] - r[:, -1 - quarter]) / (quarter * TINY.pulls_per_update))
    print("uniform", uniform, "floor", TINY.epsilon * mean_gap, out)
    for s, max_ratio in (("ucb1", 0.6), ("thompson", 0.4)):
        assert (out[s]["R"] < uniform / 3).all(), (s, out[s], uniform)
        assert (out[s]["ratio"] < max_ratio).all(), (s, out[s])
    assert (out["thompson"]["R"] < out["ucb1"]["R"]).all(), out
    floor = TINY.epsilon * mean_gap
    late = out["epsilon_greedy"]["late"]
    assert ((late >= 0.8 * floor) & (late <= 2.0 * floor)).all(), (out, floor)
    assert (out["thompson"]["late"] < 0.25 * floor).all(), (out, floor)
    # The optimal-arm fraction of the last update: Thompson mostly on the best arm.
    assert (h["optimal_arm_frac_thompson"][:, -1] > 0.8).all()
    np.testing.assert_allclose(res.final["regret_ucb1"], out["ucb1"]["R"], rtol=1e-6)


def test_bad_values_fail_with_named_field(tmp_path):
    for flag, value, msg in (("--epsilon", "1.5", "epsilon=1.5"), ("--tau", "0", "tau=0.0"),
                             ("--strategy", "greedy", "strategy='greedy'"),
                             ("--pulls-per-update", "3", "not divisible by pulls_per_update=3"),
                             ("--num-arms", "1", "num_arms=1")):
        with pytest.raises(ValueError, match=msg):
            cb.main([flag, value, "--run-dir", str(tmp_path)])


def test_every_config_field_is_read():
    assert unread_fields(cb) == []


def test_paper_preset_traces():
    """jax.eval_shape of init and one update under the `paper` preset (and Gaussian arms)."""
    cfg, state, (after, metrics) = trace_paper(cb)
    assert state.means.shape == (512, 10) and set(state.agents) == set(cb.STRATEGIES)
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert len(metrics) == 8 and all(m.shape == () for m in metrics.values())
    _, _, (after, _) = trace_paper(cb, bandit="gaussian", strategy="thompson")
    assert set(after.agents) == {"thompson"}


@pytest.mark.slow
def test_paper_setting_thompson_best_ucb1_logarithmic_greedy_linear():
    """The `paper` preset ([3]'s 10-armed Bernoulli bandit, p ~ U[0,1], eps = 0.01, 5000
    pulls) on 2 seeds x 512 instances, and pure greedy (eps = 0, the broken variant) on the
    same instances. Measured on a loaded 2-core CPU (173 s), seeds 0 and 1, regret at T = 5000
    (second-half / first-half ratio):
        Thompson 39, 41 (0.16, 0.13)      UCB1 275, 277 (0.33, 0.34)
        eps-greedy 0.01: 251, 222 (0.27, 0.23)   Boltzmann 281, 302 (0.68, 0.69)
        pure greedy (broken): 1245, 1319 (1.00, 1.00)    UCB1 bound ([1] Thm. 1) 5982, 5076
    Asserted: Thompson < a quarter of every other; ratios UCB1 < 0.6, Thompson < 0.4, greedy
    > 0.9 (linear); UCB1 < half of greedy; UCB1 below [1]'s bound."""
    from common import run

    cfg = cb.Config(**cb.PRESETS["paper"])
    greedy = dataclasses.replace(cfg, strategy="epsilon_greedy", epsilon=0.0)
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    state, m = jax.jit(jax.vmap(run.make_train(cb.init, cb.update, cfg)))(keys)
    g_state, g = jax.jit(jax.vmap(run.make_train(cb.init, cb.update, greedy)))(keys)
    np.testing.assert_array_equal(state.means, g_state.means)  # the same instances
    final = jax.device_get(jax.vmap(lambda s: cb.evaluate(s, cfg))(state))
    r = {s: np.asarray(m[f"charts/regret_{s}"]) for s in cb.STRATEGIES}
    r["greedy"] = np.asarray(g["charts/regret_epsilon_greedy"])
    half = cfg.num_updates // 2 - 1
    ratio = {s: (v[:, -1] - v[:, half]) / v[:, half] for s, v in r.items()}
    print({s: v[:, -1] for s, v in r.items()}, ratio, final["ucb1_regret_bound"])
    for s in ("epsilon_greedy", "ucb1", "boltzmann", "greedy"):
        assert (r["thompson"][:, -1] < 0.25 * r[s][:, -1]).all(), (s, r)
    assert (ratio["ucb1"] < 0.6).all() and (ratio["thompson"] < 0.4).all(), ratio
    assert (ratio["greedy"] > 0.9).all(), ratio  # linear
    assert (r["ucb1"][:, -1] < 0.5 * r["greedy"][:, -1]).all(), r
    assert (final["regret_ucb1"] < final["ucb1_regret_bound"]).all(), final  # [1] Thm. 1
