"""Tests of evolution/cma_es.py: the tutorial's parameter table (and pycma where it agrees),
one generation against a NumPy transcription of [1] Eq. (41)-(47), the ablation flags,
the catalog's benchmark anchors with broken variants, invariances, IPOP, purity and CLI.

Measured when written (2-core CPU, x64, default active weights, seeds = split(PRNGKey(0), 5)):
sphere 1360-1600 evals (median 1470); Rosenbrock 4300-5480 (median 5040; pycma here
4571-5621, median 4841); no_csa 13070-13800; ellipsoid axis-parallel 4210-4500, rotated
4030-4480 (median 4250), no_covariance ends at f = 570-1800; IPOP Rastrigin 5/5, 48k-82k.
Remeasured 2026-12-06 (2-core CPU, loaded; the same before and after the ConditionCov,
NaN/best_x and charts/evaluations fixes): Rosenbrock 4300-5370 (median 4980), no_csa
13090-13730, rotated ellipsoid 4030-4480 (median 4250), no_covariance f = 569-1821, IPOP
Rastrigin 5/5 at 48160-131470 evals (4-6 restarts, up to 640 evaluations per update).
"""

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import blackbox
from evolution import cma_es
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

SEEDS = 5


def keys(n=SEEDS):
    return jax.random.split(jax.random.PRNGKey(0), n)


def run_seeds(cfg, fn=None, generations=None):
    with jax.enable_x64(True):
        state, metrics = cma_es.make_seeds_train(cfg, fn, generations)(keys())
        return jax.device_get(state), jax.device_get(metrics)


# --- T1: parameters ---


def test_parameter_table_matches_tutorial_and_pycma():
    """Catalog section 1 table at n = lambda = 10: the tutorial's values to 1e-7, and
    pycma 4.5.0 for the rows where it uses the same formula (weights, mu_eff, c_c, c_1,
    chi_n). pycma's c_sigma (0.3196) and c_mu (0.0236) differ by design."""
    cma = pytest.importorskip("cma")
    with jax.enable_x64(True):
        p = {k: np.asarray(v) for k, v in cma_es.strategy_params(10, 10, active=True).items()}
    table = dict(mu_eff=3.1672993, c_sigma=0.2844286, d_sigma=1.2844286, c_c=0.2949904,
                 c_1=0.0152838, c_mu=0.0201543, chi_n=3.0847266)
    for k, v in table.items():
        assert abs(p[k] - v) < 1e-7, (k, p[k], v)
    np.testing.assert_allclose(p["weights"][:5], [0.456273, 0.270753, 0.162231, 0.085234,
                                                  0.025510], atol=1e-6)
    assert p["mu"] == 5
    # Negative weights: min(1 + c1/cmu, 1 + 2 mu_eff^-/(mu_eff+2), (1-c1-cmu)/(n cmu)), Eq. 50-53
    w_neg = np.log(5.5) - np.log(np.arange(6, 11))
    alpha = min(1 + p["c_1"] / p["c_mu"], 1 + 2 * (w_neg.sum() ** 2 / (w_neg**2).sum())
                / (p["mu_eff"] + 2), (1 - p["c_1"] - p["c_mu"]) / (10 * p["c_mu"]))
    np.testing.assert_allclose(p["weights"][5:], alpha * w_neg / np.abs(w_neg).sum(), rtol=1e-12)

    es = cma.CMAEvolutionStrategy(np.zeros(10), 0.5, {"popsize": 10, "seed": 1, "verbose": -9})
    w_pycma = np.asarray(es.sp.weights)
    np.testing.assert_allclose(p["weights"][:5], w_pycma[:5], rtol=1e-9)
    np.testing.assert_allclose(p["mu_eff"], es.sp.weights.mueff, rtol=1e-12)
    np.testing.assert_allclose(p["c_c"], es.sp.cc, rtol=1e-12)
    np.testing.assert_allclose(p["c_1"], es.sp.c1, rtol=1e-12)
    np.testing.assert_allclose(p["chi_n"], es.const.chiN, rtol=1e-12)
    # pycma's negative weights follow the same alpha rule with its own c_mu: 1 + c1/cmu.
    np.testing.assert_allclose(-w_pycma[5:].sum(), 1 + es.sp.c1 / es.sp.cmu, rtol=1e-9)
    # Other settings: equal weights (the post), no active weights, the post's c_mu rule.
    with jax.enable_x64(True):
        eq = cma_es.strategy_params(10, 10, weights="equal")
        post = cma_es.strategy_params(10, 10, c_mu_rule="post")
        lam12 = cma_es.strategy_params(10, 12, lam_max=20)
    np.testing.assert_allclose(eq["weights"], [0.2] * 5 + [0.0] * 5)
    assert float(eq["mu_eff"]) == pytest.approx(5.0)
    assert float(post["c_mu"]) == pytest.approx(0.1)  # min(1, lambda/n^2): 5x the tutorial
    assert np.all(np.asarray(lam12["weights"])[6:] == 0) and lam12["weights"].shape == (20,)


def test_constants_tutorial_and_pycma_by_hand():
    """Both constant sets (--constants) at n = lambda = 10 as literal numbers, and at
    n = 10, lambda = 160 (pycma's c_s cap 1/2 and its d_s factor 3 (1 - 2^(-n/9)) act)
    and lambda = 4 (pycma's c_1 factor lambda/6) from the formulas written out here;
    then pycma 4.5.0's own values where installed (popsize >= 6: below it pycma mirrors
    samples and changes d_s)."""
    def hand(n, lam, constants):
        w = np.log((lam + 1) / 2) - np.log(np.arange(1, lam // 2 + 1))
        mu = w.sum() ** 2 / (w**2).sum()
        c1 = 2 / ((n + 1.3) ** 2 + mu)
        if constants == "tutorial":
            cs = (mu + 2) / (n + mu + 5)
            ds = 1 + 2 * max(0, np.sqrt((mu - 1) / (n + 1)) - 1) + cs
            cmu = 2 * (mu - 2 + 1 / mu) / ((n + 2) ** 2 + mu)
        else:
            cs = min(0.5, (mu + 2) / (n + mu + 3))
            fac = max(1, 3 * (1 - 0.5 ** (n / 9)))
            ds = 1 + 2 * max(0, fac * np.sqrt((mu - 1) / (n + 1)) - 1) + cs
            c1 *= min(1, lam / 6)
            cmu = 2 * (0.25 + mu - 2 + 1 / mu) / ((n + 2) ** 2 + mu)
        return dict(mu_eff=mu, c_sigma=cs, d_sigma=ds, c_1=c1, c_mu=min(1 - c1, cmu))

    with jax.enable_x64(True):
        got = {(n, lam, c): {k: float(v) for k, v in cma_es.strategy_params(
            n, lam, active=True, constants=c).items() if k in ("mu_eff", "c_sigma",
                                                               "d_sigma", "c_1", "c_mu")}
               for n, lam in ((10, 10), (10, 160), (3, 4)) for c in cma_es.CONSTANTS}
    literal = {"tutorial": dict(c_sigma=0.2844286, d_sigma=1.2844286, c_mu=0.0201543),
               "pycma": dict(c_sigma=0.3196143, d_sigma=1.3196143, c_mu=0.0235518)}
    for c, table in literal.items():
        for k, v in table.items():
            assert abs(got[10, 10, c][k] - v) < 1e-7, (c, k, got[10, 10, c][k], v)
    for (n, lam, c), p in got.items():
        for k, v in hand(n, lam, c).items():
            assert p[k] == pytest.approx(v, rel=1e-12), (n, lam, c, k)
    assert got[10, 160, "pycma"]["c_sigma"] == 0.5 < got[10, 160, "tutorial"]["c_sigma"]
    assert got[3, 4, "pycma"]["c_1"] == pytest.approx(got[3, 4, "tutorial"]["c_1"] * 4 / 6)
    with jax.enable_x64(True):  # the Config field reaches what tell reads
        via_cfg = cma_es.cfg_params(10, cma_es.Config(popsize=10, constants="pycma"))
    assert float(via_cfg["c_sigma"]) == pytest.approx(got[10, 10, "pycma"]["c_sigma"])
    cma = pytest.importorskip("cma")
    for n, lam in ((10, 10), (10, 160), (40, 20)):
        es = cma.CMAEvolutionStrategy(np.zeros(n), 0.5, {"popsize": lam, "verbose": -9})
        with jax.enable_x64(True):
            p = cma_es.strategy_params(n, lam, active=True, constants="pycma")
        ref = dict(c_sigma=es.adapt_sigma.cs, d_sigma=es.adapt_sigma.damps, c_1=es.sp.c1,
                   c_mu=es.sp.cmu, c_c=es.sp.cc)
        for k, v in ref.items():
            np.testing.assert_allclose(p[k], v, rtol=1e-12, err_msg=f"{k} n={n} lam={lam}")
        np.testing.assert_allclose(p["weights"][:lam], es.sp.weights, rtol=1e-9, atol=1e-15)


# --- one generation against a NumPy transcription of the tutorial ---


def numpy_tell(es, x, f, p, n):
    """[1] Eq. (41)-(47) in NumPy, from the tutorial's text (independent of the module)."""
    w = np.asarray(p["weights"])
    m, sigma, C = np.asarray(es.mean), float(es.sigma), np.asarray(es.C)
    y = (x[np.argsort(f)] - m) / sigma
    y_w = (w[w > 0][:, None] * y[: (w > 0).sum()]).sum(0)
    ev, B = np.linalg.eigh(C)
    c_inv_half = B @ np.diag(ev**-0.5) @ B.T
    c_s, d_s, c_c, c1, cmu, mu_eff, chi = (float(p[k]) for k in (
        "c_sigma", "d_sigma", "c_c", "c_1", "c_mu", "mu_eff", "chi_n"))
    ps = (1 - c_s) * np.asarray(es.p_sigma) + np.sqrt(c_s * (2 - c_s) * mu_eff) * c_inv_half @ y_w
    new_sigma = sigma * np.exp(c_s / d_s * (np.linalg.norm(ps) / chi - 1))
    g = int(es.g)
    h = float(np.linalg.norm(ps) / np.sqrt(1 - (1 - c_s) ** (2 * (g + 1)))
              < (1.4 + 2 / (n + 1)) * chi)
    pc = (1 - c_c) * np.asarray(es.p_c) + h * np.sqrt(c_c * (2 - c_c) * mu_eff) * y_w
    w_o = np.array([wi if wi >= 0 else wi * n / np.sum((c_inv_half @ yi) ** 2)
                    for wi, yi in zip(w, y, strict=True)])
    rank_mu = sum(wi * np.outer(yi, yi) for wi, yi in zip(w_o, y, strict=True))
    newC = ((1 + c1 * (1 - h) * c_c * (2 - c_c) - c1 - cmu * w.sum()) * C
            + c1 * np.outer(pc, pc) + cmu * rank_mu)
    return m + sigma * y_w, new_sigma, ps, pc, newC, h


def random_state(cfg, big_path: bool):
    rng = np.random.default_rng(3)
    n = cfg.dim
    a = rng.standard_normal((n, n))
    C = a @ a.T / n + 0.5 * np.eye(n)
    es = cma_es.init_strategy(jnp.asarray(rng.standard_normal(n)), cfg)
    _, B, D, _ = cma_es.eigen(jnp.asarray(C), cfg.eig_floor)
    ps = rng.standard_normal(n) * (30.0 if big_path else 0.3)
    es = es.replace(sigma=jnp.asarray(0.7), C=jnp.asarray(C), B=B, D=D, p_sigma=jnp.asarray(ps),
                    p_c=jnp.asarray(rng.standard_normal(n) * 0.3), g=jnp.int32(3))
    x = np.asarray(es.mean) + 0.7 * rng.standard_normal((cfg.lam0, n)) @ np.linalg.cholesky(C).T
    return es, x, rng.permutation(cfg.lam0).astype(float)


@pytest.mark.parametrize("big_path", [False, True])
def test_one_generation_matches_numpy_reference(big_path):
    """Mean, p_sigma (with C^{-1/2} of the OLD C), sigma, h_sigma (both branches), p_c and
    the active C update with its (1-h) c_c (2-c_c) and sum(w) terms."""
    cfg = cma_es.Config(problem="sphere", dim=6, popsize=8)
    with jax.enable_x64(True):
        es, x, f = random_state(cfg, big_path)
        new = cma_es.tell(es, jnp.asarray(x), jnp.asarray(f), cfg)
        p = cma_es.strategy_params(6, 8, active=True)
        m, sigma, ps, pc, C, h = numpy_tell(es, x, f, p, 6)
    assert h == (0.0 if big_path else 1.0)
    np.testing.assert_allclose(new.mean, m, rtol=1e-12)
    np.testing.assert_allclose(new.p_sigma, ps, rtol=1e-10)
    np.testing.assert_allclose(new.sigma, sigma, rtol=1e-10)
    np.testing.assert_allclose(new.p_c, pc, rtol=1e-10)
    np.testing.assert_allclose(new.C, C, rtol=1e-10, atol=1e-12)
    B, D = np.asarray(new.B), np.asarray(new.D)
    np.testing.assert_allclose(B * D**2 @ B.T, C, rtol=1e-9, atol=1e-12)


def test_ablation_flags_act_on_their_terms():
    """no_csa keeps sigma, no_covariance keeps C, rank_one_only adds only c_1 p_c p_c^T,
    rank_mu_only leaves no p_c p_c^T term, lazy_eigen keeps B between refreshes."""
    base = cma_es.Config(problem="sphere", dim=6, popsize=8, active=False)
    with jax.enable_x64(True):
        es, x, f = random_state(base, big_path=False)
        x, f = jnp.asarray(x), jnp.asarray(f)
        tell = lambda **kw: cma_es.tell(es, x, f, dataclasses.replace(base, **kw))
        ref, nocsa = tell(), tell(no_csa=True)
        assert float(nocsa.sigma) == 0.7 and float(ref.sigma) != 0.7
        np.testing.assert_allclose(tell(no_covariance=True).C, es.C, rtol=1e-14)
        p = cma_es.strategy_params(6, 8)
        c1, cc = float(p["c_1"]), float(p["c_c"])
        one = tell(rank_one_only=True)
        np.testing.assert_allclose(one.C, (1 - c1) * es.C + c1 * jnp.outer(ref.p_c, ref.p_c),
                                   rtol=1e-12)
        mu_only = tell(rank_mu_only=True)
        full = ref.C - c1 * (jnp.outer(ref.p_c, ref.p_c) - es.C)  # remove the rank-one part
        np.testing.assert_allclose(mu_only.C, full, rtol=1e-10)
        assert cc > 0
        # lazy eigendecomposition: at n = 100 the refresh gap is > 1 generation
        big = cma_es.Config(problem="sphere", dim=100, lazy_eigen=True)
        es100 = cma_es.init_strategy(jnp.zeros(100), big).replace(g=jnp.int32(5),
                                                                 eig_g=jnp.int32(5))
        xs = cma_es.ask(jax.random.PRNGKey(1), es100, big)
        fs = jax.vmap(blackbox.sphere)(xs + 1.0)
        lazy = cma_es.tell(es100, xs, fs, big)
        eager = cma_es.tell(es100, xs, fs, cma_es.Config(problem="sphere", dim=100))
        assert np.array_equal(lazy.B, es100.B) and not np.array_equal(eager.B, es100.B)
        np.testing.assert_allclose(lazy.C, eager.C, rtol=1e-12)


# --- termination criteria ([1] App. B.3), one hand-built state per rule ---

STOP = cma_es.Config(problem="sphere", dim=4, popsize=8)  # h = 10 + ceil(30 n / lambda) = 25


def stop_state(rule):
    """A state after tell where exactly `rule` holds (None: a healthy state, no rule).
    Base: mean 0, sigma 1, C = B = I, p_c = 1, g = 0 (< 25: TolFun not yet eligible)."""
    n = STOP.dim
    es = cma_es.init_strategy(jnp.zeros(n), STOP).replace(sigma=jnp.asarray(1.0),
                                                         p_c=jnp.ones(n))
    f = jnp.arange(8.0)
    if rule == "tolx":  # sigma p_c and sigma sqrt(C_ii) all < 1e-11; 0 + 2e-13 still moves
        es = es.replace(sigma=jnp.asarray(1e-12))
    elif rule == "tolfun":  # 25 generations in, last 25 bests and this generation all 1.0
        es = es.replace(g=jnp.int32(30), f_hist=jnp.ones(STOP.hist_len))
        f = jnp.ones(8)
    elif rule == "no_effect_axis":
        # m_0 = 2^53 (ulp 2): axis i = g % n = 0 adds 0.1 sigma D_0 = 0.6 < 1 (rounds away);
        # the coordinate test adds 0.2 sigma sqrt(C_00) = 1.2 > 1 (moves m_0 to 2^53 + 2)
        es = es.replace(mean=jnp.zeros(n).at[0].set(2.0**53), sigma=jnp.asarray(6.0))
    elif rule == "no_effect_coord":  # m_1 = 1e16 (ulp 2): + 0.2 is lost; axis 0 moves m_0
        es = es.replace(mean=jnp.zeros(n).at[1].set(1e16))
    elif rule == "condition_cov":
        # C = diag(1, 1e-15, 1, 1) decomposed by `eigen` (what tell runs): cond C = 1e15 >
        # 1e14, although the floored D (1e-14 x max) alone would give exactly 1e14
        C, B, D, cond = cma_es.eigen(jnp.eye(n).at[1, 1].set(1e-15), STOP.eig_floor)
        es = es.replace(C=C, B=B, D=D, cond=cond)
    elif rule == "not_finite":
        es = es.replace(C=jnp.eye(n).at[2, 2].set(jnp.nan))
    return es, f


@jax.jit
def stop_check(es, f):
    """stop_criteria and terminated, compiled once for every hand-built state."""
    return cma_es.stop_criteria(es, f, STOP), cma_es.terminated(es, f, STOP)


@pytest.mark.parametrize("rule", [None, "tolx", "tolfun", "no_effect_axis", "no_effect_coord",
                                  "condition_cov", "not_finite"])
def test_each_stopping_rule_fires_alone_on_a_hand_built_state(rule):
    """[1] App. B.3: TolX, TolFun, NoEffectAxis, NoEffectCoord, ConditionCov (and the
    non-finite guard) through `stop_criteria`, the function `terminated` (hence IPOP's
    restart) reads: on each state exactly the named rule holds, and `terminated` says stop;
    the healthy state trips none. Disabling any one rule fails its case."""
    with jax.enable_x64(True):
        es, f = stop_state(rule)
        crit, stop = stop_check(es, f)
        crit, stop = {k: bool(v) for k, v in crit.items()}, bool(stop)
    assert set(crit) == {"tolx", "tolfun", "no_effect_axis", "no_effect_coord",
                         "condition_cov", "not_finite"}
    assert crit == {k: k == rule for k in crit}, crit
    assert stop == (rule is not None)


def test_condition_cov_reads_the_raw_eigenvalues():
    """ConditionCov on C = diag(1, r, 1, 1) after `eigen`: fires for r = 1e-15 and for a
    singular or indefinite C (r = 0, -1e-3: a finite stand-in, no inf metric), not for
    r = 1e-13. With cond taken from the floored D (eigenvalues >= 1e-14 x max) it could
    never exceed 1e14 and only the 1e-13 case would pass."""
    n = STOP.dim
    with jax.enable_x64(True):
        es0, f = stop_state(None)
        fired = {}
        for r in (1e-13, 1e-15, 0.0, -1e-3):
            C, B, D, cond = cma_es.eigen(jnp.eye(n).at[1, 1].set(r), STOP.eig_floor)
            assert np.isfinite(cond) and float(jnp.min(D)) > 0
            fired[r] = bool(stop_check(es0.replace(C=C, B=B, D=D, cond=cond),
                                       f)[0]["condition_cov"])
    assert fired == {1e-13: False, 1e-15: True, 0.0: True, -1e-3: True}, fired


def test_tolfun_waits_for_its_history_window():
    """TolFun needs g >= 10 + ceil(30 n / lambda) = 25 generations and a flat window: at
    g = 24, or with one value of the window 1e-10 off, it does not fire."""
    with jax.enable_x64(True):
        es, f = stop_state("tolfun")
        early = stop_check(es.replace(g=jnp.int32(24)), f)[0]["tolfun"]
        bumpy = stop_check(es.replace(f_hist=es.f_hist.at[24].add(1e-10)), f)[0]["tolfun"]
        old = stop_check(es.replace(f_hist=es.f_hist.at[25].add(1.0)), f)[0]["tolfun"]
    assert not bool(early) and not bool(bumpy) and bool(old)


# --- failed evaluations and the best point ---

NANCFG = cma_es.Config(problem="sphere", dim=4, popsize=8, restart="ipop", max_restarts=1)


def half_failing(x):
    """The sphere, with a failed (NaN) evaluation wherever x_0 > 0."""
    return jnp.where(x[0] > 0, jnp.nan, blackbox.sphere(x))


@jax.jit
def nan_generation(state):
    return cma_es.generation(state, NANCFG, half_failing)


def test_nan_evaluations_rank_last_and_the_best_point_is_kept():
    """One generation from x0 = 0 where the x with x_0 > 0 fail (NaN): best_f is the best
    finite f and best_x its point (with NaN unreplaced, min(inf, nan) makes best_f NaN). A
    later generation that does not improve keeps best_x (a best_x of the last generation
    fails), and so does an IPOP restart whose generation failed entirely (f_gen = inf)."""
    with jax.enable_x64(True):
        s0 = jax.jit(lambda k: cma_es.init(k, NANCFG))(jax.random.PRNGKey(0))
        _, k_ask, _ = jax.random.split(s0.key, 3)
        x = np.asarray(cma_es.ask(k_ask, s0.es, NANCFG))[:8]  # the first lambda are used
        f = np.sum(x**2, axis=1)
        ok = x[:, 0] <= 0
        assert ok.any() and not ok.all(), ok
        s1 = jax.device_get(nan_generation(s0)[0])
        i = np.flatnonzero(ok)[np.argmin(f[ok])]
        assert s1.best_f == f[i] and np.array_equal(s1.best_x, x[i]), (s1.best_f, f[ok])
        assert np.isfinite(s1.es.mean).all() and np.isfinite(s1.es.f_hist[0])
        s2 = jax.device_get(nan_generation(jax.tree.map(jnp.asarray, s1).replace(
            best_f=jnp.asarray(-1.0)))[0])
        assert s2.best_f == -1.0 and np.array_equal(s2.best_x, s1.best_x)
        stuck = s1.es.replace(mean=jnp.full(4, 3.0), sigma=jnp.asarray(1e-13))  # all fail
        s3, m3 = jax.device_get(nan_generation(jax.tree.map(jnp.asarray, s1).replace(es=stuck)))
        m4 = jax.device_get(nan_generation(jax.tree.map(jnp.asarray, s3))[1])
    assert s3.restarts == 1 and s3.es.lam == 16 and s3.f_gen == np.inf
    assert s3.best_f == s1.best_f and np.array_equal(s3.best_x, s1.best_x)
    # charts/evaluations: the restart generation used lambda0 = 8, the next one 16 (the
    # runner's steps_per_update stays 8)
    assert (m3["charts/evaluations"], m4["charts/evaluations"]) == (8, 16)


# --- T2-T5: benchmarks with broken variants ---


SPHERE = cma_es.Config(**{**cma_es.PRESETS["sphere"], "max_evals": 2500})
MODES = ("sphere", "no_selection", "sqrt_plus_3")
"""Objectives of the shared run: f; the broken variant, a fitness that ignores how good x
is (a hash of x in [1, 2): the ranking, hence the selection, is noise); and sqrt(f) + 3 (a
strictly increasing transform of f, for the invariance test)."""


def hash_fitness(x):
    return 1.0 + jnp.mod(jnp.sin(x @ jnp.arange(1.0, 11.0) * 1e3) * 43758.5453, 1.0)


@functools.cache
def sphere_runs():
    """CMA-ES (module make_train: the generation scan `update` runs) on sphere-10 for 5 seeds
    x the 3 objectives of MODES, one jitted vmapped call compiled once and shared by the
    behaviour, invariance and purity tests. Returns (train, keys, modes, (state, metrics))."""
    with jax.enable_x64(True):
        def train(key, mode):
            fn = lambda x: jnp.select([mode == 0, mode == 1],
                                      [blackbox.sphere(x), hash_fitness(x)],
                                      jnp.sqrt(blackbox.sphere(x)) + 3.0)
            return cma_es.make_train(SPHERE, fn)(key)

        train = jax.jit(jax.vmap(train))
        ks = jnp.concatenate([keys()] * len(MODES))
        modes = jnp.repeat(jnp.arange(len(MODES)), SEEDS)
        return train, ks, modes, jax.device_get(train(ks, modes))


def test_sphere_median_evals_and_no_selection_fails():
    """T2: sphere-10, x0 ~ U[-5,5], sigma0 2, lambda 10, 2500 evals: every seed reaches 1e-8
    and the median over 5 seeds is in [1100, 2000] (pycma 1471, evosax 1510; ours
    1360-1600). Broken variant in the same call: a fitness that ignores the quality of x
    (no selection): the sphere value of its final mean stays above 1 in every seed
    (it random-walks away from f ~ 80: 287-43711 when written)."""
    state, _ = sphere_runs()[3]
    ev = state.evals_at_target[:SEEDS]
    assert np.isfinite(ev).all(), ev
    assert 1100 <= np.median(ev) <= 2000, ev
    broken = np.sum(np.asarray(state.es.mean[SEEDS:2 * SEEDS]) ** 2, axis=1)
    print("evals to 1e-8:", ev, "no-selection final f(mean):", broken)
    assert np.all(broken > 1.0), broken


def pycma_rosenbrock(num_seeds):
    cma = pytest.importorskip("cma")
    evals = []
    for s in range(num_seeds):
        f = lambda x: float(np.sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2))
        res = cma.fmin2(f, np.zeros(10), 0.5, {"ftarget": 1e-8, "seed": s + 1, "popsize": 10,
                                               "verbose": -9, "tolfun": 1e-11})[1]
        evals.append(res.result.evaluations if res.result.fbest < 1e-8 else np.inf)
    return np.asarray(evals, float)


@pytest.mark.slow
def test_rosenbrock_matches_pycma_and_no_csa_fails():
    """T3: Rosenbrock-10, x0 = 0, sigma0 0.5: >= 4/5 seeds reach 1e-8 and the median is
    within [0.75, 1.35] x pycma's median on 5 seeds measured here (catalog: 5056; ours with
    active weights ~5000). Broken variant no_csa (sigma fixed at 0.5): it still converges,
    because C learns the scale that sigma should carry, but ~2.7x slower than pycma
    (13070-13800 evals when written), so it fails the same ratio threshold. (The catalog's
    T7 expected no_csa to fail 1e-8 within 2e4 evals; it does not.)"""
    t0 = time.perf_counter()
    ref = pycma_rosenbrock(SEEDS)
    if time.perf_counter() - t0 > 20:  # too slow here: use the catalog's anchor instead
        ref = np.array([5056.0])
    state, _ = run_seeds(cma_es.Config(**cma_es.PRESETS["rosenbrock"]))
    ev = state.evals_at_target
    ratio = np.median(ev[np.isfinite(ev)]) / np.median(ref[np.isfinite(ref)])
    assert np.isfinite(ev).sum() >= 4, ev
    assert 0.75 <= ratio <= 1.35, (ev, ref)
    broken, _ = run_seeds(cma_es.Config(**cma_es.PRESETS["rosenbrock"], no_csa=True))
    ev_b = broken.evals_at_target
    assert np.median(ev_b) / np.median(ref[np.isfinite(ref)]) > 1.35, ev_b


@pytest.mark.slow
def test_rotated_ellipsoid_rotation_invariance_and_no_covariance_fails():
    """T4 + T6: ellipsoid cond 1e6, x0 = 3, sigma0 1: all 5 seeds reach 1e-8, median
    <= 7000 evals (pycma 4190), and the axis-parallel and the rotated ellipsoid need about
    the same evals (ratio of medians in [0.8, 1.25]: CMA-ES is rotation invariant).
    Broken variant: no covariance adaptation (c_1 = c_mu = 0) fails in 2e4 evals (f stays
    at 570-1800). Without active weights ours needed 5540-6210 (pycma's default is active)."""
    cfg = cma_es.Config(**cma_es.PRESETS["ellipsoid"])
    rot = jnp.asarray(blackbox.rotation(10))

    with jax.enable_x64(True):
        def train(key, r):
            fn = lambda x: blackbox.ellipsoid(x, rot=r)
            return cma_es.make_train(cfg, fn)(key)[0]

        rs = jnp.stack([jnp.eye(10)] * SEEDS + [rot] * SEEDS)
        ev = np.asarray(jax.jit(jax.vmap(train))(jnp.concatenate([keys(), keys()]), rs)
                        .evals_at_target)
    axis, rotated = ev[:SEEDS], ev[SEEDS:]
    assert np.isfinite(ev).all(), ev
    assert np.median(rotated) <= 7000, rotated
    assert 0.8 <= np.median(axis) / np.median(rotated) <= 1.25, (axis, rotated)
    broken, _ = run_seeds(cma_es.Config(**cma_es.PRESETS["ellipsoid"], no_covariance=True))
    assert not np.isfinite(broken.evals_at_target).any(), broken.best_f


@pytest.mark.slow
def test_ipop_solves_rastrigin_default_lambda_does_not():
    """T5: Rastrigin-10, x0 ~ U[-5,5], sigma0 2: IPOP reaches 1e-8 in >= 4/5 seeds within
    2e5 evals (pycma 11/11, median 61k; ours 5/5, 48k-131k on 2026-12-06). Negative control
    inside the same runs: the first run of every seed is plain CMA-ES with the default
    lambda = 10 and no restart; it ends in a local minimum in every seed (best f 4-26 at
    its termination; catalog: 0/11 for pycma and evosax), so the restarts do the work."""
    cfg = cma_es.Config(**{**cma_es.PRESETS["rastrigin_ipop"], "generations": 2000})
    state, metrics = run_seeds(cfg)
    solved = np.isfinite(state.evals_at_target)
    assert solved.sum() >= 4, (state.evals_at_target, state.best_f)
    assert (state.evals_at_target[solved] <= 200_000).all()
    lam, restarts = metrics["charts/popsize"], metrics["charts/restarts"]
    assert set(np.unique(lam)) <= {10 * 2**k for k in range(7)}
    for i in range(SEEDS):  # the default-lambda run, up to its termination
        first = np.flatnonzero(restarts[i] >= 1)[0]
        assert (lam[i, :first] == 10).all() and first > 100
        assert metrics["charts/best_f"][i, first - 1] > 0.5, metrics["charts/best_f"][i, first]


# --- T6: invariance to a monotone transform of f ---


def test_invariant_to_monotone_transform_of_f():
    """Same key, f vs sqrt(f) + 3 (strictly increasing) on the sphere: sigma and cond(C)
    stay bit-identical every generation until the f run reaches the target (about 140
    generations; then it freezes and the other goes on), while the f values differ."""
    state, m = sphere_runs()[3]
    raw, tr = slice(0, SEEDS), slice(2 * SEEDS, 3 * SEEDS)
    frozen = np.asarray(state.evals_at_target[raw]) / SPHERE.lam0  # generations run
    assert np.all(frozen > 100), frozen
    for leaf in ("charts/sigma", "charts/cond"):
        a, b = np.asarray(m[leaf][raw]), np.asarray(m[leaf][tr])
        for i in range(SEEDS):
            n = int(frozen[i])
            assert np.array_equal(a[i, :n], b[i, :n]), (leaf, i)
    f_raw, f_tr = np.asarray(m["charts/f"][raw]), np.asarray(m["charts/f"][tr])
    np.testing.assert_allclose(np.sqrt(f_raw[:, :100]) + 3.0, f_tr[:, :100], rtol=1e-12)
    assert np.asarray(m["charts/sigma"][raw])[0, 50] != SPHERE.sigma0


# --- purity, CLI, validation ---


def test_train_is_pure_and_seeded():
    train, ks, modes, (s1, m1) = sphere_runs()
    with jax.enable_x64(True):
        s2, m2 = jax.device_get(train(ks, modes))
    assert s1.es.mean.dtype == np.float64
    assert np.array_equal(s1.es.mean, s2.es.mean)
    assert np.array_equal(m1["charts/best_f"], m2["charts/best_f"])
    assert not np.array_equal(s1.es.mean[0], s1.es.mean[1])
    assert np.all(np.diff(m1["charts/best_f"], axis=1) <= 0)  # best so far
    evals = m1["charts/evals"]
    assert np.all(np.diff(evals, axis=1) % 10 == 0) and evals[:, 0].tolist() == [10] * 15
    # evaluations per update: lambda while running, 0 once frozen; they add up to evals
    per = m1["charts/evaluations"]
    assert set(np.unique(per)) == {0, 10}
    np.testing.assert_array_equal(np.cumsum(per, axis=1), evals)
    # frozen once the target is reached: evals stop at evals_to_target
    np.testing.assert_array_equal(evals[:SEEDS, -1], s1.evals_at_target[:SEEDS])


def test_cli_runs(tmp_path):
    res = cma_es.main(["--preset", "sphere", "--max-evals", "300", "--num-seeds", "2",
                       "--log-every", "10", "--run-dir", str(tmp_path), "--no-progress"])
    assert res.history["charts/evals"].shape == (2, 30)
    assert set(res.final) == {"evals_to_target", "best_f"}
    assert (tmp_path / "metrics.jsonl").exists()
    assert not jax.config.jax_enable_x64  # main() enables x64 only for its run


def test_validate_names_the_field():
    with pytest.raises(ValueError, match="weights"):
        cma_es.Config(weights="linear").validate()
    with pytest.raises(ValueError, match="no-active"):
        cma_es.Config(weights="equal").validate()
    with pytest.raises(ValueError, match="rank_one_only"):
        cma_es.Config(rank_one_only=True, rank_mu_only=True).validate()
    with pytest.raises(ValueError, match="sigma0"):
        cma_es.Config(sigma0=0.0).validate()
    cma_es.Config(weights="equal", active=False).validate()


def test_every_config_field_is_read():
    assert unread_fields(cma_es) == []


def test_paper_preset_traces():
    """jax.eval_shape of init and one update under the `paper` preset (nothing runs): a
    preset that cannot build its problem, env, shapes or state fails here, on CPU."""
    _, state, (after, metrics) = trace_paper(cma_es)
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
