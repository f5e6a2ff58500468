"""Tests of evolution/novelty_es.py: archive, novelty, selection, score mixing, the NSRA-ES
w schedule, the maze, behaviour (ES vs NS-ES on the deceptive maze), purity and CLI."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import blackbox, run
from evolution import novelty_es as ne
from tests.common.config_fields import unread_fields

# One tiny maze setting for the module: 60 generations (past NSRA-ES's patience of 10
# several times), 8 perturbations, 3 agents, a 16-slot archive that wraps, 20-step episodes.
TINY = ne.Config(variant="nsra", generations=60, population_size=8, sigma=0.1, lr=0.03,
                 meta_population_size=3, k=3, archive_capacity=16, hidden=4, horizon=20)
KEYS = jax.random.split(jax.random.PRNGKey(0), 4)


VARIANT_CODES = {"nsra": 0, "es": 1, "nsr": 2}  # the seed blocks of the one compiled run


@functools.cache
def tiny_run():
    """TINY, 3 x 4 vmapped seeds in ONE compiled program: seeds 0-3 NSRA-ES, 4-7 plain ES,
    8-11 NSR-ES, each block on KEYS. The variant is a traced per-seed code: a patched
    `fitness_weight` returns the file's weight under the seed's variant (nsra: w, es: 1,
    nsr: 1/2; `adapt_w` runs in every variant and only nsra reads w), so each block equals
    `run.make_train` of its variant. Shared by
    the behaviour, w-schedule, late-update and purity tests. Besides the charts, each
    generation emits what `update` drew and evaluated (agent m, eps, returns, behaviours,
    recomputed from the same key: XLA computes them once) and the Strategy it started from.
    Returns (train, out) with out = {variant: (state, metrics, initial best f)}."""
    box = []  # the traced code of the seed being traced
    orig = ne.fitness_weight

    def weight(w, cfg):  # the file's weight under the seed's variant
        ws = [orig(w, dataclasses.replace(cfg, variant=v)) for v in VARIANT_CODES]
        return jnp.select([box[-1] == i for i in range(len(ws))], ws)

    def update(s, cfg):
        new, metrics = ne.update(s, cfg)
        m, eps, pop = ne.ask(jax.random.split(s.key)[1], s.strat, cfg)  # update's draw
        ret, bc = jax.vmap(lambda t: ne.rollout(t, cfg))(pop)
        return new, metrics | {"x/m": m, "x/eps": eps, "x/ret": ret, "x/bc": bc,
                               "x/strat": s.strat}

    def one(code, key):
        box.append(code)
        state0 = ne.init(key, TINY)
        state, metrics = jax.lax.scan(lambda s, _: update(s, TINY), state0, None,
                                      TINY.num_updates)
        return state, metrics, state0.strat.best_f

    codes = jnp.repeat(jnp.arange(3), len(KEYS))
    keys = jnp.concatenate([KEYS] * 3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ne, "fitness_weight", weight)
        train = jax.jit(jax.vmap(one)).lower(codes, keys).compile()
    out = jax.device_get(train(codes, keys))
    split = {v: jax.tree.map(lambda x, c=c: x[4 * c:4 * c + 4], out)
             for v, c in VARIANT_CODES.items()}
    return functools.partial(train, codes, keys), split


def _archive(data, count):
    return ne.Archive(jnp.asarray(data, jnp.float32), jnp.asarray(count, jnp.int32))


def _knn_bruteforce(entries, b, k):
    d = np.sort(np.linalg.norm(np.asarray(entries) - np.asarray(b), axis=-1))
    return d[:k].mean()


_add = jax.jit(ne.archive_add)  # one compile each for the cases below (same shapes)
_novelty = jax.jit(ne.novelty, static_argnums=2)


@pytest.mark.parametrize("count", [3, 10, 21, 40, 77])
def test_novelty_equals_bruteforce_knn(count):
    """[1] Eq. 2 on a 32-slot ring buffer: partly filled (with fewer than k entries too),
    full, and wrapped; stale zero rows of the unfilled part must not count."""
    rng = np.random.default_rng(count)
    cap, k = 32, 10
    entries = rng.normal(size=(count, 2)) * 3.0
    archive = ne.archive_init(cap, 2)
    for e in entries:
        archive = _add(archive, jnp.asarray(e, jnp.float32))
    kept = entries[-cap:]  # the ring buffer holds the newest `cap` behaviours
    for b in rng.normal(size=(5, 2)):
        got = float(_novelty(archive, jnp.asarray(b, jnp.float32), k))
        np.testing.assert_allclose(got, _knn_bruteforce(kept, b, min(k, len(kept))), rtol=1e-5)
    # a query at the origin would see distance 0 to the unused zero slots if they counted
    got0 = float(_novelty(archive, jnp.zeros(2), k))
    np.testing.assert_allclose(got0, _knn_bruteforce(kept, np.zeros(2), min(k, len(kept))),
                               rtol=1e-5)


def test_archive_ring_buffer_wraps():
    archive = ne.archive_init(4, 2)
    for i in range(6):
        archive = ne.archive_add(archive, jnp.array([i, -i], jnp.float32))
    assert int(archive.count) == 6
    np.testing.assert_array_equal(archive.data[:, 0], [4, 5, 2, 3])  # slots 0, 1 overwritten
    # jittable: the same insertions inside a scan
    def body(a, i):
        return ne.archive_add(a, jnp.stack([i, -i]).astype(jnp.float32)), None

    a2, _ = jax.jit(lambda: jax.lax.scan(body, ne.archive_init(4, 2), jnp.arange(6)))()
    np.testing.assert_array_equal(a2.data, archive.data)


def test_selection_proportional_to_novelty():
    nov = jnp.array([0.5, 2.0, 1.5, 0.0])
    p = ne.selection_probs(nov)
    np.testing.assert_allclose(float(p.sum()), 1.0, rtol=1e-6)
    np.testing.assert_allclose(p, np.array([0.5, 2.0, 1.5, 0.0]) / 4.0, rtol=1e-6)
    np.testing.assert_allclose(ne.selection_probs(jnp.zeros(3)), np.full(3, 1 / 3))
    # ask() picks agents with these probabilities: agents' behaviours vs a 1-entry archive
    archive = _archive([[0.0, 0.0]], 1)
    bc = jnp.array([[1.0, 0.0], [0.0, 3.0], [0.0, 0.0]])  # novelty 1, 3, 0
    strat = ne.Strategy(jnp.zeros((3, 2)), None, bc, jnp.zeros(3), archive, jnp.array(1.0),
                        jnp.array(0), jnp.array(0.0), jnp.zeros(2), jnp.zeros(2))
    cfg = dataclasses.replace(TINY, population_size=2, k=1)
    ms = jax.jit(jax.vmap(lambda key: ne.ask(key, strat, cfg)[0]))(
        jax.random.split(jax.random.PRNGKey(0), 4000))
    freq = np.bincount(np.asarray(ms), minlength=3) / 4000
    np.testing.assert_allclose(freq, [0.25, 0.75, 0.0], atol=0.03)


def test_w_moves_by_delta_on_triggers():
    """NSRA-ES: improvement -> w + delta (capped at 1) and the count restarts; t_max
    generations without improvement -> w - delta (floored at 0) and the count restarts."""
    cfg = dataclasses.replace(TINY, w_delta=0.05, w_patience=10)
    w, stall, best = jnp.float32(0.5), jnp.int32(0), jnp.float32(1.0)
    w, stall, best = ne.adapt_w(w, stall, best, jnp.float32(0.8), cfg)  # f improves (min)
    assert np.isclose(float(w), 0.55) and int(stall) == 0 and np.isclose(float(best), 0.8)
    for i in range(9):  # 9 stalled generations: w unchanged
        w, stall, best = ne.adapt_w(w, stall, best, jnp.float32(0.9), cfg)
        assert np.isclose(float(w), 0.55) and int(stall) == i + 1
    w, stall, best = ne.adapt_w(w, stall, best, jnp.float32(0.8), cfg)  # equal: no gain
    assert np.isclose(float(w), 0.50) and int(stall) == 0 and np.isclose(float(best), 0.8)
    for _ in range(10):
        w, stall, best = ne.adapt_w(w, stall, best, jnp.float32(5.0), cfg)
    assert np.isclose(float(w), 0.45)
    # clipping to [0, 1]
    w1, _, _ = ne.adapt_w(jnp.float32(1.0), jnp.int32(3), best, jnp.float32(-9.0), cfg)
    w0, _, _ = ne.adapt_w(jnp.float32(0.0), jnp.int32(9), best, jnp.float32(9.0), cfg)
    assert float(w1) == 1.0 and float(w0) == 0.0


def test_es_gradient_and_nsr_with_zero_fitness_is_half_ns():
    """g = 1/(n sigma) sum_i s_i eps_i over the n mirrored samples (eps_{i+n/2} = -eps_i);
    NSR-ES's mix with shaped F = 0 is exactly half NS-ES's step direction."""
    key = jax.random.PRNGKey(1)
    eps = jax.random.normal(key, (6, 5))
    nov = jax.random.uniform(jax.random.PRNGKey(2), (12,))
    rank_n = blackbox.centered_ranks(nov)
    full = np.concatenate([eps, -eps])
    expect = (np.asarray(rank_n) @ full) / (12 * 0.1)
    g_ns = ne.es_gradient(eps, ne.mix_scores(rank_n, jnp.zeros(12), 0.0), 0.1)
    np.testing.assert_allclose(g_ns, expect, rtol=1e-5, atol=1e-6)
    w_nsr = ne.fitness_weight(jnp.float32(0.7), dataclasses.replace(TINY, variant="nsr"))
    g_nsr = ne.es_gradient(eps, ne.mix_scores(rank_n, jnp.zeros(12), w_nsr), 0.1)
    np.testing.assert_allclose(g_nsr, 0.5 * expect, rtol=1e-5, atol=1e-6)
    # NSRA-ES with w = 0 is NS-ES, with w = 1 is plain ES on fitness ranks
    cfg_a = dataclasses.replace(TINY, variant="nsra")
    rank_f = blackbox.centered_ranks(-nov)
    for w, target in ((0.0, rank_n), (1.0, rank_f)):
        mixed = ne.mix_scores(rank_n, rank_f, ne.fitness_weight(jnp.float32(w), cfg_a))
        np.testing.assert_allclose(mixed, target)


def test_tell_updates_only_agent_m_with_separately_ranked_scores():
    cfg = dataclasses.replace(TINY, variant="nsr", population_size=6)
    theta = jax.random.normal(jax.random.PRNGKey(0), (3, 5))
    bc = jnp.array([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    strat = jax.jit(ne.init_strategy, static_argnums=3)(theta, jnp.array([3.0, 2.0, 1.0]), bc,
                                                        cfg)
    assert int(strat.archive.count) == 3  # the initial agents' behaviours are archived
    eps = jax.random.normal(jax.random.PRNGKey(1), (3, 5))
    f = jnp.array([5.0, 1.0, 3.0, 2.0, 4.0, 0.0])  # minimised: -return
    bcs = jax.random.normal(jax.random.PRNGKey(2), (6, 2)) * 4
    new, _ = jax.jit(ne.tell, static_argnums=5)(strat, 1, eps, f, bcs, cfg)
    nov = np.array([_knn_bruteforce(np.asarray(bc), b, 3) for b in np.asarray(bcs)])
    scores = 0.5 * blackbox.centered_ranks(jnp.asarray(nov)) + 0.5 * blackbox.centered_ranks(-f)
    g = np.asarray(scores) @ np.concatenate([eps, -eps]) / (6 * cfg.sigma)
    tx = optax.adam(cfg.lr)
    upd, _ = tx.update(jnp.asarray(-g) + cfg.l2_coeff * theta[1], tx.init(theta[1]))
    np.testing.assert_allclose(new.theta[1], theta[1] + upd, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(new.theta[0], theta[0])
    np.testing.assert_array_equal(new.theta[2], theta[2])


def test_maze_walls_block_and_the_trap_is_deceptive():
    cfg = ne.Config(horizon=50)
    env = ne.PointMaze(50, 0.25)
    params = env.default_params()

    def run_actions(fn):
        ret, _, state = blackbox.episode(env, lambda obs, _: fn(obs), jax.random.PRNGKey(0),
                                         params, cfg.horizon)
        return float(ret), np.asarray(state.pos)

    # straight at the goal: stopped by the bottom of the U, 1.5 from the goal
    ret, pos = run_actions(lambda obs: jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(pos, [0.0, 1.0 - 1e-3], atol=1e-5)
    np.testing.assert_allclose(ret, -1.5, atol=1e-3)
    # sideways from inside: stopped by the side wall
    _, pos = run_actions(lambda obs: jnp.array([1.0, 0.0]))
    assert pos[0] < 1.0 and pos[0] > 0.99
    # out of the opening, around the wall and to the goal (a hand-written route)
    def route(obs):
        x, y, t = obs[0], obs[1], obs[2] * 50
        down = jnp.array([0.0, -1.0])
        right = jnp.array([1.0, 0.0])
        up = jnp.array([0.0, 1.0])
        to_goal = jnp.clip((jnp.array(ne.GOAL) - obs[:2]) * 4, -1, 1)
        return jnp.where(y >= 1.3, to_goal, jnp.where(t < 6, down, jnp.where(
            x < 1.3, right, up)))

    ret, pos = run_actions(route)
    assert ret > -0.1, (ret, pos)
    # deception: every point the agent can reach inside the U is >= 1.5 from the goal
    xs, ys = np.meshgrid(np.linspace(-1, 1, 21), np.linspace(-1, 1, 21))
    assert np.hypot(xs - ne.GOAL[0], ys - ne.GOAL[1]).min() >= 1.5 > cfg.goal_radius


@pytest.mark.slow
def test_novelty_escapes_the_trap_where_es_does_not():
    """4 vmapped seeds, 600 generations of the quick preset (population 64): the highest
    final y of the updated agent over the run. Plain ES (broken variant: fitness only)
    never gets above the bottom of the U (measured: 0.999 in 4/4 seeds); NS-ES goes out of
    the opening and around the wall (measured: 4.0, the top of the arena, in 4/4 seeds,
    first above y = 1.5 at generations 354, 54, 101, 73)."""
    base = dataclasses.replace(ne.Config(**ne.PRESETS["quick"]), generations=600)
    ymax = {}
    for variant in ("es", "ns"):
        cfg = dataclasses.replace(base, variant=variant)
        train = jax.jit(jax.vmap(run.make_train(ne.init, ne.update, cfg)))
        _, m = train(jax.random.split(jax.random.PRNGKey(0), 4))
        ymax[variant] = np.asarray(m["charts/final_y"]).max(axis=1)
    assert (ymax["es"] <= 1.0).all(), ymax
    assert (ymax["ns"] > 1.5).sum() >= 3, ymax


def test_nsr_es_explores_more_than_es_on_the_tiny_maze():
    """Short behaviour (TINY, 60 generations, 4 seeds): the spread of the updated agents'
    final positions over the run (std of x + std of y) is larger for NSR-ES than for plain
    ES (the broken variant: no novelty) in every seed, and by > 1.3x on average. Measured:
    NSR-ES 0.82, 0.85, 0.77, 0.89 vs ES 0.51, 0.55, 0.71, 0.46. NSR-ES's fitness weight is
    1/2 in every generation (the mean of the novelty and fitness ranks)."""
    spread = {}
    for v in ("nsr", "es"):
        m = tiny_run()[1][v][1]
        xy = np.stack([np.asarray(m["charts/final_x"]), np.asarray(m["charts/final_y"])], -1)
        spread[v] = xy.std(axis=1).sum(-1)
    print(spread)
    assert np.all(spread["nsr"] > spread["es"]), spread
    assert spread["nsr"].mean() > 1.3 * spread["es"].mean(), spread
    np.testing.assert_array_equal(tiny_run()[1]["nsr"][1]["charts/w"], 0.5)


def test_nsr_es_late_update_is_the_mean_of_novelty_and_fitness_ranks():
    """NSR-ES's 60th generation in the shared run (the 16-slot archive has wrapped; agent
    m's Adam state has many steps): the theta that `update` left for agent m equals a NumPy
    transcription from the Strategy it started from and the population it drew and
    evaluated: brute-force kNN novelty over the archive's 16 entries, centred ranks of
    novelty and of return taken separately, their mean, g = 1/(n sigma) sum s_i eps_i, then
    optax Adam from the agent's own moments. The other agents are unchanged."""
    cfg = dataclasses.replace(TINY, variant="nsr")
    state, metrics, _ = tiny_run()[1]["nsr"]
    t = cfg.generations - 1
    strat = jax.tree.map(lambda x: jnp.asarray(x[0, t]), metrics["x/strat"])
    m, eps, ret, bc = (np.asarray(metrics[f"x/{k}"][0, t]) for k in ("m", "eps", "ret", "bc"))
    new_theta = np.asarray(state.strat.theta[0])
    assert int(strat.archive.count) == cfg.meta_population_size + t > 16
    nov = np.array([_knn_bruteforce(np.asarray(strat.archive.data), b, cfg.k) for b in bc])
    assert len(set(nov.round(6))) > 1 and len(set(ret.round(6))) > 1
    scores = 0.5 * blackbox.centered_ranks(jnp.asarray(nov)) + 0.5 * blackbox.centered_ranks(
        jnp.asarray(ret))
    g = np.asarray(scores) @ np.concatenate([eps, -eps]) / (cfg.population_size * cfg.sigma)
    theta = strat.theta[m]
    opt_m = jax.tree.map(lambda x: x[m], strat.opt_state)
    upd, _ = optax.adam(cfg.lr).update(jnp.asarray(-g) + cfg.l2_coeff * theta, opt_m)
    np.testing.assert_allclose(new_theta[m], theta + upd, rtol=1e-5, atol=1e-6)
    others = np.arange(cfg.meta_population_size) != m
    np.testing.assert_array_equal(new_theta[others], np.asarray(strat.theta)[others])


def test_nsra_es_w_falls_after_stagnation_and_rises_on_improvement_in_a_run():
    """NSRA-ES on TINY for 60 generations, 4 seeds, [1]'s w_init 1, delta 0.05, t_max 10:
    (a) the charted w follows the paper's rule replayed from the run's own best returns
    (improvement -> min(1, w + 0.05) and the count restarts; 10 generations without one ->
    max(0, w - 0.05) and the count restarts); (b) w does fall in every seed (measured: first
    at generations 29-35), each fall after exactly 10 flat generations of the best return;
    (c) some seed's w rises again on an improvement (measured: seed 1, 0.90 -> 0.95);
    (d) while w = 1 the run is bit-identical to plain ES (same key), and it departs from ES
    after w first falls, so the adapted w is what tell uses."""
    cfg = TINY
    state, m, best_f0 = tiny_run()[1]["nsra"]
    w = np.asarray(m["charts/w"])
    best = np.asarray(m["charts/best_return"])
    best0 = -np.asarray(best_f0)  # init's best f of the M initial agents, as a return
    rises = 0
    for i in range(len(KEYS)):
        wi, stall, prev_best = 1.0, 0, np.r_[best0[i], best[i]]
        for t in range(cfg.generations):
            improved = prev_best[t + 1] > prev_best[t]
            stall = 0 if improved else stall + 1
            lower = stall >= cfg.w_patience
            wi = min(1.0, wi + 0.05) if improved else (max(0.0, wi - 0.05) if lower else wi)
            stall = 0 if lower else stall
            assert abs(w[i, t] - wi) < 1e-6, (i, t, w[i, t], wi)
            if t and w[i, t] < w[i, t - 1]:  # a fall: the 10 previous bests are flat
                assert np.all(prev_best[t - 9:t + 2] == prev_best[t + 1]), (i, t)
            if t and w[i, t] > w[i, t - 1]:
                rises += 1
                assert prev_best[t + 1] > prev_best[t]
        assert w[i].min() < 1.0, (i, w[i])
    assert rises >= 1, w
    x_es = np.asarray(tiny_run()[1]["es"][1]["charts/final_x"])
    x_nsra = np.asarray(m["charts/final_x"])
    for i in range(len(KEYS)):
        t0 = int(np.flatnonzero(w[i] < 1.0)[0])  # w falls after update t0; tell uses it next
        np.testing.assert_array_equal(x_nsra[i, :t0 + 1], x_es[i, :t0 + 1])
        assert not np.array_equal(x_nsra[i, t0 + 1:], x_es[i, t0 + 1:]), i


def test_train_is_pure_and_seeded():
    """The compiled run again (all 12 seeds): bit-identical state and metrics; seeds differ."""
    train, runs = tiny_run()
    s1, m1, _ = runs["nsra"]
    again = jax.device_get(train())
    for a, b in zip(jax.tree.leaves(again),
                    jax.tree.leaves(jax.tree.map(lambda *x: np.concatenate(x),
                                                 *[runs[v] for v in VARIANT_CODES])),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    s2, m2 = jax.tree.map(lambda x: x[:4], again[:2])
    np.testing.assert_array_equal(s1.strat.theta, s2.strat.theta)
    np.testing.assert_array_equal(m1["charts/novelty"], m2["charts/novelty"])
    assert not np.allclose(s1.strat.theta[0], s1.strat.theta[1])
    assert m1["charts/w"].shape == (len(KEYS), TINY.generations)
    for k in ("charts/best_return", "charts/novelty", "charts/w", "charts/final_x",
              "charts/final_y", "charts/archive_size"):
        assert np.isfinite(m1[k]).all(), k
    # the archive grows by one per generation after the M initial behaviours, up to capacity
    np.testing.assert_array_equal(
        m1["charts/archive_size"][0],
        np.minimum(TINY.meta_population_size + np.arange(1, 61), TINY.archive_capacity))


def test_validate_names_the_field():
    with pytest.raises(ValueError, match="variant"):
        dataclasses.replace(TINY, variant="nsx").validate()
    with pytest.raises(ValueError, match="population_size"):
        dataclasses.replace(TINY, population_size=7).validate()
    with pytest.raises(ValueError, match="w_init"):
        dataclasses.replace(TINY, w_init=1.5).validate()


def test_cli(tmp_path):
    result = ne.main(["--variant", "nsra", "--generations", "3", "--population-size", "8",
                      "--meta-population-size", "2", "--hidden", "4", "--horizon", "10",
                      "--num-seeds", "2", "--log-every", "3", "--run-dir", str(tmp_path),
                      "--no-progress"])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and "charts/novelty" in rows[-1]
    assert result.final["best_return"].shape == (2,)


def test_every_config_field_is_read():
    assert unread_fields(ne) == []


def test_paper_preset_traces():
    """jax.eval_shape of init and one update under the `paper` preset (nothing runs): a
    preset that cannot build its env, shapes or state fails here, on CPU."""
    cfg = ne.Config(**ne.PRESETS["paper"])
    cfg.validate()
    state = jax.eval_shape(lambda k: ne.init(k, cfg), jax.random.PRNGKey(0))
    after, metrics = jax.eval_shape(lambda s: ne.update(s, cfg), state)
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
