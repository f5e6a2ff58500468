"""Tests of exploration/dora.py: the E-value rule as a counter (gamma_E = 0, one-hot features,
linear head: E = (1 - alpha)^n and the bonus ~ n^(-1/2), through `learn`), the SARSA target
with gamma_E and done from the target network at the next action, the bonus in the Q target
and its cap, the LLL and LLL-softmax action selection, purity, CLI, the paper preset and a
short behaviour test on DeepSea against f itself (epsilon-greedy 0.3) and a frozen E head,
both run by the CLI run's compiled program."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import run
from exploration import dora
from tests.common.cli import cli_args
from tests.common.compiled import main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# One tiny configuration for the training tests: the quick preset (DeepSea N = 10, one env,
# 150 episodes, batch 32, a linear E on the one-hot observation, LLL on epsilon = 0.3).
TINY = dora.Config(**dora.PRESETS["quick"])
SEEDS = 4
ARGS = cli_args(TINY, dora.Config()) + [
    "--num-seeds", str(SEEDS), "--log-every", str(TINY.num_updates), "--no-progress"]

# The tabular setting of [1] Sec. 3.1: one-hot cells, no hidden layer, linear E from 1, SGD.
ALPHA = 0.1
TAB = dora.Config(deepsea_size=4, hidden=(), e_hidden=(), e_activation="linear", e_init=1.0,
                  e_optimizer="sgd", e_lr=ALPHA, gamma_e=0.0, beta=1.0, bonus_eps=0.0,
                  batch_size=8)
KEY = jax.random.PRNGKey(0)
ACT = jax.jit(dora.act, static_argnums=4)  # one program per shape, not eager dispatches
SIG = dataclasses.replace(TAB, e_activation="sigmoid", e_init=0.9, hidden=(8,))


def _arm(chunks, **values):
    """The CLI run's compiled chunk (the whole run) again from its recorded initial states
    with State values replaced: the broken arms without a second compile."""
    fn, states = chunks[0]
    states = states.replace(**{k: jnp.full_like(getattr(states, k), v) for k, v in values.items()})
    return np.asarray(fn(jax.tree.map(jnp.copy, states))[0].first_success)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """TINY through `dora.main` on 4 seeds (the CLI run, its chunk recorded), and the same
    compiled chunk on the same seeds with LLL off (f = epsilon-greedy 0.3 sampled) and with
    the E head frozen."""
    argv = ARGS + ["--run-dir", str(tmp_path_factory.mktemp("dora") / "r")]
    res, chunks = main_recording_chunks(dora.main, argv)
    arms = dict(egreedy=_arm(chunks, use_e=False), frozen=_arm(chunks, e_train=0.0))
    return res, chunks, arms


def _cell(n, row, col, b):
    return jnp.zeros((b, n, n)).at[:, row, col].set(1.0)


N_STEPS = 200


@functools.cache
def _program(cfg):
    """`dora.learn` (what `update` runs) N_STEPS times on a batch of B copies of the
    transition (cell (1, 2), action 1) -> cell (2, 3), next action 0, compiled once per
    network shape; gamma_E, beta, done, the E update scale and a shift of the target
    network's E(s', 0) (linear E on the cells only) are traced arguments."""
    n, b = cfg.deepsea_size, cfg.batch_size
    nxt = dict(obs=_cell(n, 2, 3, b), action=jnp.zeros(b, jnp.int32))
    net = dora.network(cfg, 2)

    def go(key, gamma_e, beta, done, e_train, shift):
        c = dataclasses.replace(cfg, gamma_e=gamma_e, beta=beta)
        cur = dict(obs=_cell(n, 1, 2, b), action=jnp.ones(b, jnp.int32), reward=jnp.zeros(b),
                   done=jnp.full(b, done))
        params = net.init(key, cur["obs"])
        target = params
        if cfg.hidden == ():  # E(s', 0) of the target network: 1 + shift
            kernel = params["params"]["e_head"]["kernel"].at[2 * n + 3, 0].add(shift)
            target = {"params": {**params["params"], "e_head": {"kernel": kernel}}}

        def body(p_o, _):
            p, o = p_o
            p, o, aux = dora.learn(p, target, o, c, 2, cur, nxt, e_train)
            return (p, o), (net.apply(p, cur["obs"][:1])[1][0], aux["bonus"][0],
                            net.apply(p, nxt["obs"][:1])[1][0])

        (p, _), out = jax.lax.scan(body, (params, dora.optimizer(c).init(params)), None, N_STEPS)
        return out + (p["params"]["q_head"]["kernel"],)

    args = (jax.random.PRNGKey(0),) + (jnp.zeros(()),) * 5
    return jax.jit(go).lower(*args).compile(run.INIT_COMPILER_OPTIONS)


def _learn_n(cfg, gamma_e=0.0, beta=1.0, done=False, e_train=1.0, shift=0.0):
    """(E of the visited cell, bonus `learn` used, E of the next cell) after each of N_STEPS
    `learn` calls, and the final Q head kernel."""
    base = dataclasses.replace(cfg, gamma_e=0.0, beta=0.0)
    vals = (gamma_e, beta, float(done), e_train, shift)
    out = _program(base)(jax.random.PRNGKey(0), *(jnp.asarray(v, jnp.float32) for v in vals))
    return tuple(map(np.asarray, out))


def test_e_value_is_a_counter_with_gamma_e_zero():
    """[1] Sec. 3.1 through `dora.learn`: gamma_E = 0, one-hot cells, a linear E head from 1,
    SGD with alpha = 0.1: after n visits of (s, a) E(s, a) = (1 - alpha)^n, the other
    action's E stays 1, the next cell's E is untouched; the bonus `learn` adds at visit n + 1
    is beta / sqrt(-log E) = beta / sqrt(-log(1 - alpha)) * n^(-1/2) (to 1e-6)."""
    n_steps = 20
    e, bonus, e_next, _ = (x[:n_steps] for x in _learn_n(TAB))
    n = np.arange(1, n_steps + 1)
    np.testing.assert_allclose(e[:, 1], (1 - ALPHA) ** n, rtol=1e-6)
    np.testing.assert_array_equal(e[:, 0], 1.0)
    np.testing.assert_array_equal(e_next, 1.0)
    # bonus[k] is computed before the k-th step, on E = (1 - alpha)^k (k >= 1)
    scaled = bonus[1:] * np.sqrt(n[:-1])
    np.testing.assert_allclose(scaled, 1.0 / np.sqrt(-np.log(1 - ALPHA)), rtol=1e-6)


def test_e_target_is_sarsa_with_gamma_e():
    """With gamma_E = 0.5 the target is gamma_E E(s', a') with a' the next row's action (the
    SARSA rule of [1] Sec. 3): the next cell is never visited, so E(s', a') = 1 and one step
    from E = 1 gives (1 - alpha) 1 + alpha 0.5 1 = 0.95; the fixed point is 0.5. With
    done = 1 the target is 0: E -> 0.9^200 (a target without (1 - d) would stay at 0.5)."""
    e, _, e_next, _ = _learn_n(TAB, gamma_e=0.5)
    np.testing.assert_allclose(e[0, 1], 1 - ALPHA + ALPHA * 0.5, rtol=1e-6)
    np.testing.assert_allclose(e[-1, 1], 0.5, rtol=1e-5)
    np.testing.assert_array_equal(e_next, 1.0)
    e_done = _learn_n(TAB, gamma_e=0.5, done=True)[0]
    assert e_done[-1, 1] < 1e-3, e_done[-1]


def test_e_target_takes_the_next_action_from_the_target_network():
    """The SARSA target reads E^-(s', a') of the target network at the next row's action:
    target E^-(s', 0) = 0.5, E^-(s', 1) = 1, online E(s', .) = 1, a' = 0, the action at s
    is 1; gamma_E = 0.5: one step gives 0.9 + 0.1 * 0.5 * 0.5 = 0.925. max over a', a' from
    the current row (1) or the online network's E(s') would each give 0.95."""
    e = _learn_n(TAB, gamma_e=0.5, shift=-0.5)[0]
    np.testing.assert_allclose(e[0, 1], 0.9 + 0.1 * 0.5 * 0.5, rtol=1e-6)


def test_bonus_reaches_the_q_target_and_is_bounded():
    """beta = 1 vs 0 through `learn`: the Q head's weights differ (the bonus enters the Q
    target); E = 1 gives beta / sqrt(0 + 0.01) = 10 beta (atari-rl's + 0.01), not 1000 beta."""
    np.testing.assert_allclose(dora.dora_bonus(jnp.ones(()), 1.0), 10.0, rtol=1e-3)
    assert np.abs(_learn_n(TAB, beta=1.0)[3] - _learn_n(TAB, beta=0.0)[3]).max() > 1e-3


def test_lll_selects_by_the_papers_formula():
    """[1] Alg. 1: a = argmax_a log f(a|s) - log log_{1-alpha} E(s, a), f epsilon-greedy on Q,
    through `dora.act` (what `update` runs), against the formula in numpy on random (Q, E)
    and on a hand case: Q = (1, 0), epsilon = 0.1, so log f(0)/f(1) = log 19 = 2.94:
    counters (30, 1) -> action 1 (log 30 = 3.40 > 2.94); counters (10, 1) -> action 0."""
    rng = np.random.default_rng(0)
    q = rng.normal(size=(500, 3)).astype(np.float32)
    e = rng.uniform(0.01, 0.99, size=(500, 3)).astype(np.float32)
    eps = 0.2
    f = np.full((500, 3), eps / 3) + (1 - eps) * np.eye(3)[q.argmax(1)]
    ref = np.argmax(np.log(f) - np.log(np.log(e) / np.log(1 - ALPHA)), 1)
    got = np.asarray(ACT(KEY, jnp.asarray(q), jnp.asarray(e), eps, TAB))
    np.testing.assert_array_equal(got, ref)
    assert 0.05 < (got != q.argmax(1)).mean() < 0.8  # the E term does change choices
    qq = jnp.array([[1.0, 0.0], [1.0, 0.0]])
    counts = np.array([[30, 1], [10, 1]])
    ee = jnp.asarray((1 - ALPHA) ** counts, jnp.float32)
    np.testing.assert_array_equal(ACT(KEY, qq, ee, 0.1, TAB), [1, 0])


def test_lll_softmax_is_argmax_q_minus_t_log_counter():
    """linapprox's DORA agent: a = argmax_a Q(s,a) - T log(-log E(s,a)), T = 0.5: on
    Q = (1, 0), E = (0.5, 0.9): 1 + 0.18 > 0 + 1.13 -> 0; E = (0.5, 0.99): 1.18 < 2.30 -> 1;
    and the numpy formula on random (Q, E)."""
    cfg = dataclasses.replace(TAB, action_selection="lll_softmax", temperature=0.5)
    rng = np.random.default_rng(1)
    q = np.concatenate([[[1.0, 0.0], [1.0, 0.0]], rng.normal(size=(300, 2))]).astype(np.float32)
    e = np.concatenate([[[0.5, 0.9], [0.5, 0.99]], rng.uniform(0.01, 0.99, size=(300, 2))])
    e = e.astype(np.float32)
    got = np.asarray(ACT(KEY, q, e, 0.3, cfg))
    np.testing.assert_array_equal(got, np.argmax(q - 0.5 * np.log(-np.log(e)), 1))
    np.testing.assert_array_equal(got[:2], [0, 1])


def test_epsilon_mode_ignores_e():
    """action_selection = epsilon: epsilon-greedy on Q, E unused (epsilon 0: argmax Q)."""
    cfg = dataclasses.replace(TAB, action_selection="epsilon")
    q = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    e = jnp.array([[0.01, 0.99], [0.99, 0.01]])
    np.testing.assert_array_equal(ACT(KEY, q, e, 0.0, cfg), [0, 1])


def test_e_head_starts_at_e_init_and_freeze_keeps_it():
    """E = sigmoid(logit(e_init) + 0) at init; one `learn` step on action 1 lowers E(s, 1)
    only (action 0's head weights are still zero, whatever the shared torso did); with
    `freeze_e` the E head's update is zeroed and E stays e_init."""
    e = _learn_n(SIG)[0]
    np.testing.assert_allclose(e[0, 0], 0.9, rtol=1e-6)  # zero head weights: no change
    assert e[0, 1] < 0.9 - 1e-4  # the visited action's E went down
    np.testing.assert_allclose(_learn_n(SIG, e_train=0.0)[0], 0.9, rtol=1e-6)
    assert [float(v) for v in dora.switches(dataclasses.replace(TAB, freeze_e=True))] == [1, 0]


def test_dora_finds_the_treasure_its_f_does_not(runs):
    """Behaviour ([1] Sec. 4-5): DeepSea N = 10, 150 episodes, the same 4 seeds and compiled
    run. Episodes to the first treasure (-1: never), measured on a loaded 2-core CPU:
        DORA, LLL on epsilon-greedy 0.3, linear E    80  78 110  -1   (3/4)
        f itself: epsilon-greedy 0.3 sampled         -1  -1  -1  -1   (0/4)
        the E head frozen (LLL = greedy Q)           -1  -1  -1  -1   (0/4)"""
    res, _, arms = runs
    d = np.asarray(res.state.first_success)
    print("dora", d, arms)
    assert int((d >= 0).sum()) >= 2, (d, arms)
    assert int((arms["egreedy"] >= 0).sum()) == 0, (d, arms)
    assert int((arms["frozen"] >= 0).sum()) == 0, (d, arms)


def test_train_is_pure_and_seeds_differ(runs):
    """The CLI run's recorded chunk, run again on its recorded input: bit-identical; the 4
    seeds differ; losses finite."""
    res, chunks, _ = runs
    assert len(chunks) == 1
    fn, states = chunks[0]
    again, m = fn(states)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), again.params, res.state.params)
    loss = np.asarray(m["losses/e"])
    assert np.isfinite(loss).all() and np.isfinite(np.asarray(m["losses/q"])).all()
    assert not np.array_equal(loss[0], loss[1])


def test_cli_run_and_help(runs, capsys):
    with pytest.raises(SystemExit):
        dora.main(["--help"])
    out = capsys.readouterr().out
    for fld in dataclasses.fields(dora.Config):
        assert "--" + fld.name.replace("_", "-") in out, fld.name
    res = runs[0]
    assert (res.run_dir / "metrics.jsonl").exists() and (res.run_dir / "summary.json").exists()
    assert res.history["losses/e"].shape == (SEEDS, TINY.num_updates)


def test_bad_values_fail_with_named_field(tmp_path):
    with pytest.raises(ValueError, match="action_selection='ucb'"):
        dora.main(["--action-selection", "ucb", "--run-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="e_init"):
        dora.main(["--e-init", "1.0", "--run-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="eps"):
        dora.main(["--eps-end", "0", "--eps-start", "0", "--run-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="beta"):
        dora.main(["--beta", "-1", "--run-dir", str(tmp_path)])


def test_every_config_field_is_read():
    assert unread_fields(dora) == []


def test_paper_preset_traces():
    """jax.eval_shape of init and one update under `paper` (DeepSea N = 20, MLP [50, 50] with
    atari-rl's E stream, 256 ReLU, on the shared torso, a 10,000-transition replay); the
    preset is atari-rl's deep agent: the bonus on (beta 0.05, + 0.01), epsilon-greedy, E = 0.5
    at init."""
    cfg, state, (after, metrics) = trace_paper(dora)
    assert cfg.beta == 0.05 and cfg.bonus_eps == 0.01 and cfg.action_selection == "epsilon"
    assert cfg.e_init == 0.5 and cfg.shared_torso and cfg.e_hidden == (256,)
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
    assert state.replay.data["obs"].shape == (10_000, 1, 20, 20)
    assert state.params["params"]["e_head"]["kernel"].shape == (256, 2)
