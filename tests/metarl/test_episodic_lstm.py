"""Tests of metarl/episodic_lstm.py: the cell with its reinstatement gate, the DND read and
write by hand, a block replayed step by step (writes of c_T at trial ends, reads by
context), the A2C pieces by hand, behaviour against the gate-off variant in the same run,
purity, CLI, the paper preset and every Config field.

Mutations tried (each made the named test fail): no r_t c_ep term in the cell (cell test);
the gate flag ignored by the cell (cell test) or by the rollout (behaviour: the gate-off
arm then reinstates too, ratio 0.67-0.72); the DND reading the farthest key (DND and block
tests); h_T written instead of c_T (block test); gamma ignored (returns); the advantage not
held constant in the policy gradient (loss); kernel_delta unread (fields); the paper preset
changed (trace); no p_other <= p_best check (bad values); init ignoring its key (purity:
seeds identical); the read's match scale removed (DND test, block test, and behaviour:
ratio 0.82 0.90, repeats 1.58 1.68 against gate-off 1.45 1.48); tau ignored by the read
(DND test); a_prev = 0 (one-hot of arm 0) at a trial's start (block test); init ignoring
--gate-off (gate-off init test); no stop-gradient on the DND write (gradient test: the
first leaf checked had 160 / 160 non-zero entries); num_neighbors missing from validate's
>= 1 list (bad values: validate() does not raise, and main would fail while tracing)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metarl import episodic_lstm as el
from tests.common.cli import cli_args
from tests.common.compiled import compiled, main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# ONE tiny configuration for the whole module: 2-armed bandits, 5 tasks met twice, 10 pulls.
UPDATES = 200
TINY = el.Config(
    num_arms=2,
    num_tasks=5,
    pulls_per_trial=10,
    context_dim=8,
    hidden=32,
    dict_size=10,
    num_envs=16,
    total_timesteps=16 * 100 * UPDATES,
    lr=5e-3,
    ent_coef=0.01,
    eval_blocks=128,
)


def test_cell_equation_by_hand():
    """c_t = i c_in + f c_{t-1} + r c_ep and h_t = o tanh(c_t), gates from W [h, x] + b in the
    order (i, f, o, r, c_in), recomputed in numpy from the cell's own parameters; with the
    gate forced off (gate_on = 0) c_ep has no effect and r = 0."""
    cfg = dataclasses.replace(TINY, hidden=4)
    net = el.network(cfg)

    def setup(key):
        h, c, c_ep = (jax.random.normal(k, (4,)) for k in jax.random.split(key, 3))
        x = jax.random.normal(key, (el.input_size(cfg),))
        params = net.init(key, (h, c), x, c_ep, 1.0)
        params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(key, p.shape), params)
        on = net.apply(params, (h, c), x, c_ep, 1.0)
        off = net.apply(params, (h, c), x, c_ep, 0.0)
        off5 = net.apply(params, (h, c), x, 5 * c_ep, 0.0)
        return (h, c, c_ep, x), params, on, off, off5

    (h, c, c_ep, x), params, on, off, off5 = compiled(setup, jax.random.PRNGKey(0))
    (h1, c1), _, _, r = on
    cell = params["params"]["EpisodicLSTMCell_0"]["Dense_0"]
    z = np.concatenate([h, x]) @ np.asarray(cell["kernel"]) + np.asarray(cell["bias"])
    sig = lambda v: 1 / (1 + np.exp(-v))
    i, f, o, rr, g = np.split(z, 5)
    c_ref = sig(i) * np.tanh(g) + sig(f) * np.asarray(c) + sig(rr) * np.asarray(c_ep)
    np.testing.assert_allclose(c1, c_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h1, sig(o) * np.tanh(c_ref), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r, sig(rr), rtol=1e-5)
    (_, c_a), _, _, r0 = off
    (_, c_b), _, _, _ = off5
    np.testing.assert_allclose(c_a, c_ref - sig(rr) * np.asarray(c_ep), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(c_a, c_b)
    assert float(np.abs(r0).max()) == 0.0


def test_dnd_read_and_write_by_hand():
    """Keys (0,0), (1,0), (0,2), values 10, 20, 30 (times ones(2)); query (0.9, 0), tau 0.5:
    k = 1 returns the nearest value, 20, times the match scale exp(-0.01 / 0.5); k = 2
    weighs 20 and 10 by 1/(0.01 + d), 1/(0.81 + d), same scale; an exact match reads its
    value exactly; only the first `count` slots count (query (0, 2) with one slot: 10
    exp(-4 / 0.5)); an empty memory reads zeros. Writes go to slot count mod S, so the third
    write into S = 2 slots replaces the first."""
    keys = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    vals = jnp.array([[10.0, 10.0], [20.0, 20.0], [30.0, 30.0]])
    q = jnp.array([0.9, 0.0])
    read = jax.jit(el.dnd_read, static_argnums=(4, 5, 6))
    write = jax.jit(el.dnd_write)
    s = np.exp(-0.01 / 0.5)
    np.testing.assert_allclose(read(keys, vals, 3, q, 1, 1e-3, 0.5), [20.0 * s] * 2, rtol=1e-6)
    np.testing.assert_array_equal(read(keys, vals, 3, keys[2], 1, 1e-3, 0.5), [30.0, 30.0])
    w = np.array([1 / 0.011, 1 / 0.811])
    np.testing.assert_allclose(
        read(keys, vals, 3, q, 2, 1e-3, 0.5), [s * (w @ [20.0, 10.0]) / w.sum()] * 2, rtol=1e-5
    )
    np.testing.assert_allclose(
        read(keys, vals, 1, jnp.array([0.0, 2.0]), 1, 1e-3, 0.5), [10.0 * np.exp(-8.0)] * 2
    )  # slot 2 not yet written
    np.testing.assert_array_equal(read(keys, vals, 0, q, 2, 1e-3, 0.5), [0.0, 0.0])
    k, v, n = jnp.zeros((2, 2)), jnp.zeros((2, 1)), 0
    for i in range(3):
        k, v, n = write(k, v, n, jnp.full(2, i + 1.0), jnp.full(1, 10.0 * (i + 1)))
    np.testing.assert_array_equal(k, [[3, 3], [2, 2]])
    np.testing.assert_array_equal(v[:, 0], [30, 20])
    assert n == 3


def test_a_block_writes_c_T_at_trial_ends_and_reinstates_it_by_context():
    """One block of the tiny config with random (non-trivial) weights, replayed here step by
    step through the same network: the DND ends holding the contexts of the 2M trials in
    their order with count 2M; each trial's stored value is the c_T of the replay of its
    recorded pulls; the first trial reads zeros (empty memory), the other first encounters
    read the nearest earlier value times exp(-d2_min / tau) (small: another task's key is
    far), and each
    re-encounter reads exactly the value its task's first trial wrote. Recorded
    log-probabilities match the replay (so x_t = [context, onehot(a_{t-1}), r_{t-1}] with a
    zero one-hot at a trial's first pull, and h reset per trial)."""
    cfg = TINY
    net = el.network(cfg)
    key = jax.random.PRNGKey(3)

    def setup(key):
        state = el.init(key, cfg)
        params = jax.tree.map(lambda p: p + 0.5 * jax.random.normal(key, p.shape), state.params)
        return params, el.play_block(params, key, jnp.float32(1.0), cfg)

    params, (out, first, (keys, values, count)) = compiled(setup, key)
    contexts, _, order, _ = el.sample_block(jax.random.split(key)[0], cfg)
    m, t_len, k_arms = cfg.num_tasks, cfg.pulls_per_trial, cfg.num_arms
    np.testing.assert_array_equal(first, np.arange(2 * m) < m)
    np.testing.assert_allclose(keys, contexts[order], atol=1e-6)
    assert int(count) == 2 * m
    np.testing.assert_array_equal(out["c_ep"][0], np.zeros(cfg.hidden))
    for j in range(1, m):  # a new task reads the nearest earlier memory, scaled down
        d2 = ((np.asarray(keys[:j]) - np.asarray(keys[j])) ** 2).sum(-1)
        near = np.exp(-d2.min() / cfg.match_tau) * np.asarray(values[d2.argmin()])
        np.testing.assert_allclose(out["c_ep"][j], near, rtol=1e-4, atol=1e-7)
    for j in range(m, 2 * m):  # re-encounter of task order[j], first met in trial order[j]
        np.testing.assert_array_equal(out["c_ep"][j], values[int(order[j])])

    step = jax.jit(lambda hc, x, c_ep: net.apply(params, hc, x, c_ep, 1.0))
    for j in (0, m + 2):
        hc = (jnp.zeros(cfg.hidden), jnp.zeros(cfg.hidden))
        a_prev, r_prev = -1, 0.0  # no previous pull: a zero one-hot
        for t in range(t_len):
            x = jnp.concatenate(
                [contexts[order[j]], jax.nn.one_hot(a_prev, k_arms), jnp.array([r_prev])]
            )
            hc, logits, _, _ = step(hc, x, out["c_ep"][j])
            a_prev, r_prev = int(out["action"][j, t]), float(out["reward"][j, t])
            np.testing.assert_allclose(
                jax.nn.log_softmax(logits)[a_prev], out["logp"][j, t], atol=1e-5
            )
        np.testing.assert_allclose(hc[1], values[j], atol=1e-5)


def test_returns_loss_and_early_regret_by_hand():
    """R = r + gamma R' with gamma = 0.5 on rewards (1, 0, 2): R = (1.5, 1, 2). A2C with
    logp = log(0.5, 0.25), A = (2, -1), V = (1, 0), R = (0, 2), H = (0.7, 0.5), vf 0.5,
    ent 0.1: pg = -(2 log 0.5 - log 0.25) / 2 = 0, value 1.25, loss 0.565. Early regret
    (n = 2) of trials with regrets (0.4, 0.4, 0), (0, 0, 0.4), first = (True, False): 0.8
    and 0; the policy gradient holds A constant."""
    np.testing.assert_allclose(
        el.discounted_returns(jnp.array([[1.0, 0.0, 2.0]]), 0.5), [[1.5, 1.0, 2.0]]
    )
    logp, adv = jnp.log(jnp.array([0.5, 0.25])), jnp.array([2.0, -1.0])
    v, ret, ent = jnp.array([1.0, 0.0]), jnp.array([0.0, 2.0]), jnp.array([0.7, 0.5])
    loss, m = el.a2c_loss(logp, adv, ent, v, ret, 0.5, 0.1)
    np.testing.assert_allclose(loss, 0.565, atol=1e-6)
    np.testing.assert_allclose(m["losses/value"], 1.25)
    g = jax.grad(lambda a: el.a2c_loss(logp, a, ent, v, ret, 0.5, 0.1)[0])(adv)
    np.testing.assert_array_equal(g, [0.0, 0.0])
    f, r = el.early_regret(
        jnp.array([[0.4, 0.4, 0.0], [0.0, 0.0, 0.4]]), jnp.array([True, False]), 2
    )
    np.testing.assert_allclose([f, r], [0.8, 0.0], atol=1e-6)


def test_gate_off_turns_the_gate_off_in_init():
    """`--gate-off` sets the traced gate flag to 0 in `init` (the behaviour test sets it by
    monkeypatching init, so it does not check this); the default is 1."""
    key = jax.random.PRNGKey(0)
    off = dataclasses.replace(TINY, gate_off=True)
    gates = compiled(lambda k: (el.init(k, TINY).gate_on, el.init(k, off).gate_on), key)
    assert [float(g) for g in gates] == [1.0, 0.0]


def test_the_dnd_write_stops_the_gradient():
    """Stored values are constants: the gradient of every read c_ep (sum over a block) with
    respect to the parameters is exactly zero, though c_ep holds earlier trials' c_T."""
    key = jax.random.PRNGKey(1)

    def grads(k):
        params = el.init(k, TINY).params
        c_ep = lambda p: el.play_block(p, k, jnp.float32(1.0), TINY)[0]["c_ep"]
        return c_ep(params), jax.grad(lambda p: c_ep(p).sum())(params)

    c_ep, g = compiled(grads, key)
    assert float(np.abs(c_ep).max()) > 0.0
    for leaf in jax.tree.leaves(g):
        np.testing.assert_array_equal(leaf, np.zeros_like(leaf))


def test_bad_values_fail_with_named_field(tmp_path):
    bad = [
        (["--dtype", "fp8"], "dtype='fp8'"),
        (["--num-arms", "1"], "num_arms=1"),
        (["--num-neighbors", "30"], "num_neighbors=30"),
        (["--early-pulls", "20"], "early_pulls=20"),
        (["--p-other", "0.95"], "p_other=0.95"),
        (["--hidden", "0"], "--hidden must be"),
        (["--match-tau", "0"], "match_tau=0"),
        (["--num-neighbors", "0"], "--num-neighbors must be"),
        (["--num-tasks", "0"], "--num-tasks must be"),
        (["--num-envs", "0"], "--num-envs must be"),
    ]
    for args, msg in bad:
        with pytest.raises(ValueError, match=msg):
            el.main(args + ["--run-dir", str(tmp_path)])
    for name in ("num_tasks", "num_envs", "num_neighbors"):  # validate() alone too
        with pytest.raises(ValueError, match=f"--{name.replace('_', '-')} must be >= 1"):
            dataclasses.replace(TINY, **{name: 0}).validate()


SEEDS = 2
RUN_ARGS = cli_args(TINY, el.Config()) + [
    "--num-seeds",
    str(2 * SEEDS),
    "--log-every",
    str(UPDATES),
    "--no-progress",
    "--fast-compile",
]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """TINY through `el.main`, 2 x SEEDS seeds in ONE compiled program: seeds SEEDS.. are the
    broken variant (reinstatement gate forced to 0, traced in the state), each on the key of
    its episodic twin. Returns (the run, its compiled chunks with their inputs)."""
    keys = jax.random.split(jax.random.PRNGKey(0), 2 * SEEDS)  # the runner's seed keys
    real = el.init

    def init(key, cfg):
        i = jnp.argmax(jnp.all(key == keys, -1))
        return real(keys[i % SEEDS], cfg).replace(gate_on=jnp.where(i >= SEEDS, 0.0, 1.0))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(el, "init", init)
        return main_recording_chunks(
            el.main, RUN_ARGS + ["--run-dir", str(tmp_path_factory.mktemp("elstm"))]
        )


def test_reinstatement_cuts_the_regret_of_repeated_tasks_and_gate_off_cannot(recorded):
    """Behaviour ([1] Sec. 4 [M]) in seconds: 2-armed bandits (p = 0.9 / 0.1), 5 tasks met twice
    per block, 10 pulls per trial, 200 updates of 16 blocks, 2 seeds per arm; evaluated on
    128 fresh blocks. Expected regret summed over the first 5 pulls (random play: 2.0) on
    first encounters and on re-encounters, and their ratio. Measured (loaded 2-core CPU):
        episodic LSTM   first 1.65 1.44   repeat 0.40 0.18   ratio 0.24 0.12
        gate r = 0      first 1.48 1.41   repeat 1.45 1.48   ratio 0.98 1.05
    The gate-off agent is a plain LSTM meta-learner: a re-encountered task looks new to it,
    so it saves nothing. Required: ratio < 0.4 ([1]'s gap, catalogue < 0.3), and repeats at
    least 0.1 cheaper than the gate-off agent's (so the ratio cannot come from worse first
    encounters). With the plain k-NN read (no match scale) the episodic arm scored ratio
    0.82 0.90, repeat 1.58 1.68: both fail."""
    run_, _ = recorded
    f = run_.final
    ratio, first, repeat = f["early_ratio"], f["early_regret_first"], f["early_regret_repeat"]
    print("ratio", ratio, "first", first, "repeat", repeat)
    on, off = ratio[:SEEDS], ratio[SEEDS:]
    assert on.max() < 0.4, ratio
    assert off.min() > 0.9, ratio
    assert (repeat[:SEEDS] < repeat[SEEDS:] - 0.1).all(), repeat  # better than a plain LSTM
    gap = first - repeat  # what a re-encounter saves
    assert gap[:SEEDS].min() > gap[SEEDS:].max() + 0.3, gap
    np.testing.assert_array_equal(run_.state.gate_on, [1.0] * SEEDS + [0.0] * SEEDS)


def test_train_is_pure_and_cli_writes_its_files(recorded, capsys):
    """The runner's compiled chunk again on its recorded input: bit-identical params and
    metrics (no tracing, no compiling); seeds differ; the run wrote its files; --help
    documents every field."""
    run_, chunks = recorded
    with pytest.raises(SystemExit):
        el.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(el.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert (run_.run_dir / "metrics.jsonl").exists()
    h = run_.history["losses/value"]
    assert h.shape == (2 * SEEDS, UPDATES) and np.isfinite(h).all()
    assert not np.array_equal(h[0], h[1])
    assert len(chunks) == 1
    state, metrics = jax.device_get(chunks[0][0](chunks[0][1]))
    jax.tree.map(np.testing.assert_array_equal, run_.state.params, state.params)
    np.testing.assert_array_equal(run_.history["losses/value"], metrics["losses/value"])


def test_every_config_field_is_read():
    assert unread_fields(el) == []


def test_paper_preset_traces():
    """jax.eval_shape of init and one update under `paper` (256 blocks of 50 tasks met twice,
    LSTM 128, DND of 100 slots; bfloat16 traces too): builds on CPU without running."""
    cfg, state, (after, metrics) = trace_paper(el)
    assert cfg.steps_per_update == 256 * 100 * 10 and cfg.num_updates == 1000
    assert state.params["params"]["EpisodicLSTMCell_0"]["Dense_0"]["kernel"].shape == (
        128 + 16 + 4 + 1,
        5 * 128,
    )
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
    trace_paper(el, dtype="bfloat16")


def test_plot_writes_the_regret_curves(recorded, tmp_path):
    out = el.plot_regret([(recorded[0].final, "episodic LSTM")], str(tmp_path / "a.png"))
    assert (tmp_path / "a.png").stat().st_size > 1000 and out.endswith("a.png")
