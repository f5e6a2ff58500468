"""Tests of evolution/wann.py: network evaluation, mutation validity, NSGA-II sort,
behaviour on CartPole, purity and CLI."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import run
from evolution import wann
from tests.common.compiled import main_recording_chunks
from tests.common.config_fields import unread_fields

A = {name: i for i, name in enumerate(wann.ACTIVATIONS)}


def _np_act(name, x):  # [1] ind.py applyAct, written out independently
    return {"linear": x, "step": float(x > 0), "sin": math.sin(math.pi * x),
            "gaussian": math.exp(-x * x / 2), "tanh": math.tanh(x),
            "sigmoid": 1 / (1 + math.exp(-x)), "inverse": -x, "abs": abs(x),
            "relu": max(x, 0.0), "cos": math.cos(math.pi * x)}[name]


def test_hand_built_genome_matches_manual_computation():
    """2 inputs, 3 hidden slots (2 used), 2 outputs: bias=0, x=1,2, h=3,4 (5 unused), o=6,7."""
    lay = wann.Layout(n_in=2, n_out=2, max_hidden=3)
    n = lay.n
    on = np.zeros((n, n), bool)
    for i, j in [(1, 3), (2, 3), (0, 4), (3, 4), (1, 6), (4, 6), (3, 7), (0, 7)]:
        on[i, j] = True
    fwd = jax.jit(lambda g, o, w: wann.forward(g, lay, o, w))
    edge = on.copy()
    edge[2, 6] = True  # a disabled gene: must not count
    for h3, h4 in [("sin", "gaussian"), ("tanh", "sigmoid"), ("step", "cos"), ("abs", "relu"),
                   ("inverse", "linear")]:
        act = np.zeros(n, np.int32)
        act[3], act[4] = A[h3], A[h4]
        act[5] = A["cos"]  # unused slot, not connected: no effect
        g = wann.Genome(jnp.asarray(act), jnp.asarray(edge), jnp.asarray(on), jnp.array(2))
        for w in (-2.0, -0.5, 1.0, 1.7):
            for x1, x2 in [(0.3, -0.8), (-1.1, 0.45), (0.9, 0.2)]:
                v3 = _np_act(h3, w * (x1 + x2))
                v4 = _np_act(h4, w * (1.0 + v3))
                o6, o7 = w * (x1 + v4), w * (v3 + 1.0)
                out = fwd(g, jnp.array([x1, x2]), w)
                np.testing.assert_allclose(out, [o6, o7], rtol=1e-5, atol=1e-6,
                                           err_msg=f"{h3} {h4} w={w}")


def test_swingup_port_follows_the_reference_dynamics():
    """One step of CartPoleSwingUp against [1]'s domain/cartpole_swingup.py, transcribed in
    numpy; and the continuous path: one tanh output, the action is its value."""
    env = wann.CartPoleSwingUp()
    rng = np.random.default_rng(0)
    for _ in range(5):
        x, x_dot, th, th_dot = rng.normal(size=4) * [1.0, 1.0, 3.0, 2.0]
        act = rng.uniform(-1.5, 1.5)
        a = np.clip(act, -1, 1) * 10.0
        s, c, mpl, mt = np.sin(th), np.cos(th), 0.5 * 0.6, 1.0
        xacc = (-2 * mpl * th_dot**2 * s + 3 * 0.5 * 9.82 * s * c + 4 * a - 4 * 0.1 * x_dot) / (
            4 * mt - 3 * 0.5 * c**2)
        thacc = (-3 * mpl * th_dot**2 * s * c + 6 * mt * 9.82 * s + 6 * (a - 0.1 * x_dot) * c) / (
            4 * 0.6 * mt - 3 * mpl * c**2)
        nx, nth = x + x_dot * 0.01, th + th_dot * 0.01
        state = wann.SwingUpState(jnp.array([x, x_dot, th, th_dot], jnp.float32), jnp.array(5))
        obs, st, r, term, trunc = env.step(None, state, jnp.array([act]), None)
        np.testing.assert_allclose(st.s, [nx, x_dot + xacc * 0.01, nth, th_dot + thacc * 0.01],
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(obs, [nx, st.s[1], np.cos(nth), np.sin(nth), st.s[3]],
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(r, (np.cos(nth) + 1) / 2 * np.cos(nx / 2.4 * np.pi / 2),
                                   rtol=1e-4, atol=1e-6)
        assert bool(term) == (abs(nx) > 2.4) and not bool(trunc)
    lay = wann.layout(wann.Config(env_id="CartPoleSwingUp"))
    assert (lay.n_in, lay.n_out, lay.continuous) == (5, 1, True)
    g = wann.minimal_genome(jax.random.PRNGKey(0), lay, 1.0)  # all 6 inputs wired to output
    o = jnp.array([0.1, -0.2, 0.3, 0.4, -0.5])
    np.testing.assert_allclose(wann.forward(g, lay, o, -1.5), [np.tanh(-1.5 * (1 + 0.1))],
                               rtol=1e-5)


def _check_valid(g, lay, act_ok):
    """The DAG invariants of a genome (numpy arrays)."""
    n, h0, nh = lay.n, lay.h0, int(g.num_hidden)
    edge, on = np.asarray(g.edge), np.asarray(g.on)
    assert 0 <= nh <= lay.max_hidden
    assert not (on & ~edge).any()  # enabled implies present
    assert not np.tril(edge).any()  # edges only forward in the order: acyclic
    assert not edge[:, :h0].any()  # nothing flows into bias / inputs
    assert not edge[n - lay.n_out:, :].any()  # nothing flows out of outputs
    unused = np.arange(h0 + nh, n - lay.n_out)
    assert not edge[unused, :].any() and not edge[:, unused].any()
    act = np.asarray(g.act)
    assert (act[:h0] == 0).all() and (act[n - lay.n_out:] == 0).all()
    assert act_ok[act[h0:h0 + nh]].all()
    # Kahn's algorithm on the enabled graph: every node gets sorted (independent check)
    indeg = on.sum(0).copy()
    stack, seen = [k for k in range(n) if indeg[k] == 0], 0
    while stack:
        k = stack.pop()
        seen += 1
        for j in np.flatnonzero(on[k]):
            indeg[j] -= 1
            if indeg[j] == 0:
                stack.append(j)
    assert seen == n


@pytest.mark.slow  # its vmapped 120-step program compiles for ~20 CPU s
def test_mutations_keep_a_valid_dag():
    """64 lineages x 120 random mutations (CartPole layout, 6 hidden slots, so the capacity
    fills up), every intermediate genome checked; every operator fires. (Default tier: the
    same invariants on every operator's output along the 30-step walk of
    test_each_mutation_changes_what_it_should.)"""
    cfg = wann.Config(max_hidden=6, hidden_acts=("sin", "tanh", "abs", "relu"))
    lay = wann.layout(cfg)
    assert (lay.n_in, lay.n_out) == (4, 2)
    act_ok = np.array([a in cfg.hidden_acts for a in wann.ACTIVATIONS])

    def lineage(key):
        k0, k1 = jax.random.split(key)
        g = wann.minimal_genome(k0, lay, 0.5)
        return jax.lax.scan(lambda g, k: (wann.mutate(g, k, lay, cfg),) * 2, g,
                            jax.random.split(k1, 120))[1]

    hist = jax.jit(jax.vmap(lineage))(jax.random.split(jax.random.PRNGKey(3), 64))
    hist = jax.tree.map(np.asarray, hist)
    for b in range(64):
        for t in range(0, 120, 7):
            _check_valid(jax.tree.map(lambda x: x[b, t], hist), lay, act_ok)
        _check_valid(jax.tree.map(lambda x: x[b, -1], hist), lay, act_ok)
    assert hist.num_hidden[:, -1].max() == 6  # the capacity was reached (no-op after that)
    assert hist.on.sum((-1, -2))[:, -1].mean() > 10  # connections were added


def test_each_mutation_changes_what_it_should():
    """30 steps of a growing genome (3 inputs, 2 outputs, 4 hidden slots), each operator
    applied to the step's genome with the step's key; the whole walk is one jitted scan.
    Every genome of the walk and every operator's output is also a valid DAG (the
    invariants of test_mutations_keep_a_valid_dag, which runs 64 x 120 in the slow tier)."""
    lay = wann.Layout(n_in=3, n_out=2, max_hidden=4)
    lin = jnp.array([a == "linear" for a in wann.ACTIVATIONS])
    all_acts = jnp.ones(len(wann.ACTIVATIONS), bool)
    obs = jax.random.normal(jax.random.PRNGKey(0), (20, 3))
    out = jax.vmap(lambda g, o: wann.forward(g, lay, o, 1.0), (None, 0))
    cfg = wann.Config(max_hidden=4)

    def step(g, k):
        g2 = wann.add_node(g, k, lay, lin)
        cases = {"g": g, "g2": g2, "g3": wann.add_conn(g, k, lay, all_acts),
                 "g4": wann.mut_act(g, k, lay, all_acts), "g5": wann.enable(g, k, lay, all_acts)}
        conns = {name: wann.num_connections(x) for name, x in cases.items()}
        return wann.mutate(g, k, lay, cfg), (cases, conns, out(g, obs), out(g2, obs))

    @jax.jit
    def walk():
        g = wann.minimal_genome(jax.random.PRNGKey(1), lay, 0.5)
        g = wann.add_node(g, jax.random.PRNGKey(2), lay, all_acts)
        keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.PRNGKey(4), s))(jnp.arange(30))
        return jax.lax.scan(step, g, keys)[1]

    hist = jax.device_get(walk())
    for s in range(30):
        cases, nc, out_g, out_g2 = jax.tree.map(lambda x, s=s: x[s], hist)
        g, g2, g3, g4 = cases["g"], cases["g2"], cases["g3"], cases["g4"]
        # insert node with a linear node: at w = 1 the function is unchanged; one more
        # node, connections: +2 new genes, the split one disabled
        if int(g.num_hidden) < lay.max_hidden:
            assert int(g2.num_hidden) == int(g.num_hidden) + 1
            assert int(g2.edge.sum()) == int(g.edge.sum()) + 2
            assert int(nc["g2"]) == int(nc["g"]) + 1
            np.testing.assert_allclose(out_g2, out_g, rtol=1e-5, atol=1e-5)
        else:
            assert jax.tree.all(jax.tree.map(np.array_equal, g2, g))
        assert int(g3.edge.sum()) == int(g.edge.sum()) + 1
        assert int(nc["g3"]) == int(nc["g"]) + 1
        changed = np.flatnonzero(np.asarray(g4.act != g.act))
        assert len(changed) == 1 and lay.h0 <= changed[0] < lay.h0 + int(g.num_hidden)
        if bool((g.edge & ~g.on).any()):
            assert int(nc["g5"]) == int(nc["g"]) + 1
        for name in ("g", "g2", "g3", "g4", "g5"):
            _check_valid(cases[name], lay, np.ones(len(wann.ACTIVATIONS), bool))
    assert int(hist[0]["g"].num_hidden[-1]) == lay.max_hidden  # the genome grew to capacity


def _brute_fronts(obj):
    """O(n^2) per peel: repeatedly remove the points no remaining point dominates."""
    n = len(obj)
    front, rest, f = np.full(n, -1), set(range(n)), 0

    def dom(p, q):
        return all(obj[p] >= obj[q]) and any(obj[p] > obj[q])

    while rest:
        layer = [q for q in rest if not any(dom(p, q) for p in rest)]
        for q in layer:
            front[q] = f
        rest -= set(layer)
        f += 1
    return front


def _brute_crowding(obj, front):
    n, m = obj.shape
    d = np.zeros(n)
    for f in np.unique(front):
        idx = np.flatnonzero(front == f)
        for k in range(m):
            srt = idx[np.lexsort((idx, obj[idx, k]))]  # by value, ties by index
            span = obj[srt[-1], k] - obj[srt[0], k]
            span = span if span > 0 else 1.0
            d[srt[0]] = d[srt[-1]] = np.inf
            for a in range(1, len(srt) - 1):
                d[srt[a]] += (obj[srt[a + 1], k] - obj[srt[a - 1], k]) / span
    return d


@pytest.mark.parametrize("m,integer", [(2, False), (2, True), (3, True)])
def test_nondominated_sort_matches_brute_force(m, integer):
    order_fn = jax.jit(wann.nsga_order)
    rng = np.random.default_rng(m)
    for _ in range(8):
        obj = rng.normal(size=(48, m)).astype(np.float32)
        if integer:  # many ties and duplicate points
            obj = rng.integers(0, 5, size=(48, m)).astype(np.float32)
        order, front = order_fn(jnp.asarray(obj))
        expect = _brute_fronts(obj)
        np.testing.assert_array_equal(front, expect)
        assert expect.max() >= 2  # several fronts
        crowd = _brute_crowding(obj, expect)
        got = np.asarray(wann.crowding(jnp.asarray(obj), jnp.asarray(expect)))
        np.testing.assert_allclose(got, crowd, rtol=1e-5)
        order = np.asarray(order)
        assert sorted(order) == list(range(48))
        keys = list(zip(expect[order], -crowd[order], strict=True))
        assert keys == sorted(keys)  # front ascending, crowding descending within a front


def _random_genome(key, lay, num_hidden, num_conn):
    """A random DAG with exactly num_hidden hidden nodes and num_conn enabled connections."""
    k_act, k_edge = jax.random.split(key)
    k = jnp.arange(lay.n)
    used = (k < lay.h0 + num_hidden) | (k >= lay.n - lay.n_out)
    valid = (used & (k < lay.n - lay.n_out))[:, None] & (used & (k >= lay.h0))[None, :] & (
        k[:, None] < k[None, :])
    score = jnp.where(valid, jax.random.uniform(k_edge, valid.shape), -1.0)
    on = score >= jnp.sort(score.ravel())[-num_conn]
    act = jnp.where((k >= lay.h0) & (k < lay.h0 + num_hidden),
                    jax.random.randint(k_act, (lay.n,), 0, len(wann.ACTIVATIONS)), 0)
    return wann.Genome(act, on, on, jnp.array(num_hidden, jnp.int32))


BEHAVIOUR = wann.Config(num_generations=12, pop_size=48, num_reps=2, max_steps=200,
                        max_hidden=6, test_reps=2)


@pytest.mark.slow
def test_evolved_topology_beats_random_topologies_of_the_same_size():
    """Behaviour ([1] Sec. 4): CartPole-v1 capped at 200 steps, 48 networks, 2 episodes per
    weight, 12 generations, 3 seeds. The champion's mean return over the 6 shared weights
    (re-tested on 4 fresh episodes per weight) is compared, on the same episodes, with
    (a) the best network of the initial minimal population and (b) the best of 64 random
    DAGs with the champion's numbers of hidden nodes and connections. Direct
    input -> output wiring flips its action with the sign of w, so (a) stays near half the
    maximum; the champion needs a 2-hop path (e.g. through a linear or tanh node: w^2 x).
    Measured on a 2-core CPU (seeds 0, 1, 2): champion 195.2, 200, 200 (1 hidden node,
    4-6 connections); initial best 104.5 x 3; random same-size best 105.0, 88.7, 104.5.
    In calibration 15 of 16 other seeds reached >= 180 within 12 generations, so 2 of the
    3 seeds must win here."""
    cfg = BEHAVIOUR
    lay = wann.layout(cfg)
    seeds = 3
    train = jax.jit(jax.vmap(run.make_train(wann.init, wann.update, cfg)))
    keys = jax.random.split(jax.random.PRNGKey(0), seeds)
    state, metrics = train(keys)
    init_pop = jax.vmap(lambda k: wann.init(k, cfg).pop)(keys)

    @jax.jit
    def mean_over_weights(pop, key):  # (P,) mean return over weights x 4 episodes
        ret, _ = wann.evaluate_population(pop, lay, cfg, key, 4)
        return ret.mean((-1, -2))

    champ, init_best, rand_best = [], [], []
    for s in range(seeds):
        best = jax.tree.map(lambda x: x[s], state.best)
        nh, nc = int(best.num_hidden), int(wann.num_connections(best))
        rand = jax.vmap(lambda k: _random_genome(k, lay, nh, nc))(
            jax.random.split(jax.random.PRNGKey(10 + s), 64))
        key = jax.random.PRNGKey(100 + s)
        champ.append(float(mean_over_weights(jax.tree.map(lambda x: x[None], best), key)[0]))
        init_best.append(float(
            mean_over_weights(jax.tree.map(lambda x: x[s], init_pop), key).max()))
        rand_best.append(float(mean_over_weights(rand, key).max()))
        print(f"seed {s}: champion {champ[-1]:.1f} (hidden {nh}, conns {nc}), initial best "
              f"{init_best[-1]:.1f}, random same-size best {rand_best[-1]:.1f}")
    champ, init_best, rand_best = map(np.array, (champ, init_best, rand_best))
    wins = (champ >= 180) & (champ >= init_best + 50) & (champ >= rand_best + 50)
    assert wins.sum() >= 2, (champ, init_best, rand_best)
    assert np.median(champ) >= np.median(np.maximum(init_best, rand_best)) + 50
    curve = np.asarray(metrics["charts/best_mean_return"])
    assert ((curve.max(1) > curve[:, 0] + 40).sum() >= 2), curve


SHORT = wann.Config(num_generations=6, pop_size=24, num_reps=2, max_steps=100, max_hidden=4,
                    test_reps=2, tournament_size=2)
# The same run from the command line: --seed 0 with 3 seeds gives split(PRNGKey(0), 3).
SHORT_ARGS = ["--num-generations", "6", "--pop-size", "24", "--num-reps", "2", "--max-steps",
              "100", "--max-hidden", "4", "--test-reps", "2", "--tournament-size", "2",
              "--num-seeds", "3", "--log-every", "6", "--no-progress"]


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory):
    """SHORT through wann.main once (in-process); one compile of the runner's chunk serves
    the CLI, the short behaviour and the purity tests (the purity test runs the recorded
    compiled chunk again on its recorded input)."""
    root = tmp_path_factory.mktemp("wann")
    return main_recording_chunks(wann.main, SHORT_ARGS + ["--run-dir", str(root / "a")])


def test_short_run_beats_the_initial_minimal_networks(short_runs):
    """Short behaviour: CartPole capped at 100 steps, 24 networks, 6 generations, 3 seeds.
    Baseline in the same run: generation 0's best mean return over the shared weights (the
    initial minimal networks, direct input -> output wiring, stay near half the cap: 54-55).
    Ranking keeps what it finds: the best network of EACH of the last 3 generations beats
    it by >= 10 in every seed. Measured: min over the last 3 = 100, 72.1, 73.8. Broken
    variant tried (not run here: ranking on -mean, the worst networks kept): CartPole-100
    is easy enough that mutation alone finds 100 now and then, but it is lost again: 54.8,
    54.5, 47.0."""
    curve = np.asarray(short_runs[0].history["charts/best_mean_return"])
    print(curve.round(1))
    assert np.all(curve[:, 0] < 60), curve
    assert np.all(curve[:, -3:].min(1) >= curve[:, 0] + 10), curve


def test_train_is_pure_and_seeded(short_runs):
    """Same seed, same run: the CLI's compiled chunk (the whole run: 6 updates) run again on
    its recorded input gives the CLI's state and every metric bit for bit; the 3 seeds of
    the vmap differ."""
    a, chunks = short_runs
    assert len(chunks) == 1
    compiled, states = chunks[0]
    state, m2 = jax.device_get(compiled(states))
    for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(x, y)
    m1 = a.history
    assert set(m2) <= set(m1) and "charts/best_mean_return" in m2
    for k in m2:
        np.testing.assert_array_equal(m1[k], m2[k])
        assert m1[k].shape == (3, 6)
    on = np.asarray(a.state.pop.on)
    assert not np.array_equal(on[0], on[1]) and not np.array_equal(on[1], on[2])
    for k in ("best_mean_return", "best_max_return", "connections", "nodes"):
        assert np.isfinite(m1[f"charts/{k}"]).all()
    assert (m1["charts/best_max_return"] >= m1["charts/best_mean_return"]).all()


def test_cli_runs_and_documents_every_field(short_runs, capsys):
    with pytest.raises(SystemExit):
        wann.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(wann.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, swingup, paper" in out
    res = short_runs[0]
    assert (res.run_dir / "metrics.jsonl").exists()
    assert len((res.run_dir / "metrics.jsonl").read_text().splitlines()) == 6
    assert res.history["charts/best_mean_return"].shape == (3, 6)
    assert "return_w-2" in res.final and res.final["mean_return"].shape == (3,)


def test_bad_values_fail_with_named_field(tmp_path):
    with pytest.raises(ValueError, match="hidden_acts"):
        wann.main(["--hidden-acts", "swish", "--run-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="cull_ratio=1.0"):
        wann.main(["--cull-ratio", "1.0", "--run-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="CartPole-v2"):
        wann.main(["--env-id", "CartPole-v2", "--run-dir", str(tmp_path)])


def test_every_config_field_is_read():
    assert unread_fields(wann) == []


def test_paper_preset_traces():
    """jax.eval_shape of init and one update under the `paper` preset (nothing runs): a
    preset that cannot build its env, shapes or state fails here, on CPU."""
    cfg = wann.Config(**wann.PRESETS["paper"])
    cfg.validate()
    state = jax.eval_shape(lambda k: wann.init(k, cfg), jax.random.PRNGKey(0))
    after, metrics = jax.eval_shape(lambda s: wann.update(s, cfg), state)
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
