"""Tests of transformers/act.py: halting distribution, N <= M, scan == Python loop, the ponder
cost and its gradient, the parity data, purity, CLI and behaviour (ACT vs no pondering)."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import parallel, run
from tests.common import preset
from tests.common.compiled import compiled
from tests.common.config_fields import unread_fields
from tests.transformers import tiny_run as tiny_run_module
from transformers import act

TINY = act.Config(bits=8, seq_len=3, hidden=16, max_steps=6, batch_size=8, total_updates=3,
                  eval_size=16)
# every equation test runs these jitted programs on TINY's shapes (one compile each): the
# forward pass at M = 6 and at the cap cases M = 2, M = 1, and d rho / d b_h; they are small,
# so they compile at XLA's lowest backend optimisation level (the runner's init options)
O0 = dict(compiler_options=run.INIT_COMPILER_OPTIONS)
_forward = jax.jit(act.forward, static_argnums=2, **O0)


@functools.partial(jax.jit, **O0)
def _d_rho_d_bias(params, x):
    """d rho / d b_h of sequence 0 (rho = N + R summed over its steps), at TINY."""
    def cost(bias):
        p = {"params": {**params["params"], "w_h": {**params["params"]["w_h"], "bias": bias}}}
        _, s, r, _ = act.forward(p, x[:1], TINY)
        return act.ponder_cost(s, r)[0]

    return jax.grad(cost)(params["params"]["w_h"]["bias"])


@functools.cache
def _init_params(key):
    return compiled(lambda k_: act.init(k_, TINY), jax.random.PRNGKey(key)).params


def _params(key=0, halt_bias=None, zero_kernel=False):
    """TINY's initial parameters; `halt_bias` replaces b_h (the same as initialising with
    halt_bias_init = halt_bias: b_h starts at that constant); `zero_kernel` zeroes W_h, so
    that h = sigmoid(b_h) at every step."""
    params = _init_params(key)
    w_h = dict(params["params"]["w_h"])
    if halt_bias is not None:
        w_h["bias"] = jnp.full_like(w_h["bias"], halt_bias)
    if zero_kernel:
        w_h["kernel"] = jnp.zeros_like(w_h["kernel"])
    return {"params": {**params["params"], "w_h": w_h}}


_parity = jax.jit(act.parity_batch, static_argnums=(1, 2, 3), **O0)


def _x(key=1):
    return _parity(jax.random.PRNGKey(key), TINY.batch_size, TINY.seq_len, TINY.bits)


def test_halting_probabilities_sum_to_one_and_steps_within_m():
    """[1] Eq. 10-12 on random weights (halting bias -1 so N varies): sum_n p = 1,
    1 <= N <= M, p = 0 after the halting step, R = p at step N, and eps < R <= 1."""
    cfg = TINY
    x, _ = _x()
    _, steps, rem, p = _forward(_params(halt_bias=-1.0), x, cfg)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-6)
    assert steps.min() >= 1 and steps.max() <= cfg.max_steps
    assert len(np.unique(np.asarray(steps))) > 1  # the test covers several N
    idx = np.arange(cfg.max_steps)
    assert (np.where(idx >= np.asarray(steps)[..., None], np.asarray(p), 0) == 0).all()
    np.testing.assert_allclose(np.take_along_axis(np.asarray(p), np.asarray(steps)[..., None]
                                                  - 1, -1)[..., 0], rem, atol=0)
    assert (rem > cfg.eps - 1e-6).all() and (rem <= 1 + 1e-6).all()


def test_constant_halting_probability_by_hand():
    """h = 0.3 at every step, eps = 0.01: cumulative 0.3, 0.6, 0.9, 1.2 >= 0.99, so N = 4,
    R = 1 - 0.9 = 0.1, p = (0.3, 0.3, 0.3, 0.1), rho = N + R = 4.1 per input step. With M = 2
    the cap wins: N = 2, R = 0.7. d rho / d b_h = -sum_{n<N} h(1-h) = -3 * 0.21 per input
    step (N has no gradient), over the 3 steps of a sequence 3 * -0.63."""
    b = float(np.log(0.3 / 0.7))
    x, _ = _x()
    params = _params(halt_bias=b, zero_kernel=True)
    _, steps, rem, p = _forward(params, x, TINY)
    np.testing.assert_array_equal(steps, 4)
    np.testing.assert_allclose(rem, 0.1, atol=1e-6)
    np.testing.assert_allclose(p[0, 0], [0.3, 0.3, 0.3, 0.1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(act.ponder_cost(steps, rem), 3 * 4.1, atol=1e-5)
    np.testing.assert_allclose(_d_rho_d_bias(params, x), [3 * -3 * 0.3 * 0.7], rtol=1e-5)
    capped = dataclasses.replace(TINY, max_steps=2)
    _, steps2, rem2, _ = _forward(params, x, capped)
    np.testing.assert_array_equal(steps2, 2)
    np.testing.assert_allclose(rem2, 0.7, atol=1e-6)


def test_large_halting_bias_is_one_plain_rnn_step():
    """b_h -> +inf: h ~ 1 >= 1 - eps at n = 1, so N = 1, R = 1 and the output is one plain RNN
    step on [x ; 1]; b_h -> -inf: N = M. max_steps = 1 is the same plain RNN, and so is the
    traced cap ponder_cap = 1 (the behaviour test's broken variant) at M = 6 and any b_h."""
    x, _ = _x()
    params = _params(halt_bias=50.0)
    y, steps, rem, _ = _forward(params, x, TINY)
    W = {k: np.asarray(v["kernel"]) for k, v in params["params"].items()}
    s = np.tanh(np.concatenate([x[:, 0], np.ones((TINY.batch_size, 1))], -1) @ W["w_x"]
                + params["params"]["w_x"]["bias"])  # s^1 = S(s_0 = 0, [x_1 ; 1])
    np.testing.assert_allclose(y[:, 0], (s @ W["w_y"])[:, 0] + params["params"]["w_y"]["bias"],
                               atol=1e-5)
    np.testing.assert_array_equal(steps, 1)
    np.testing.assert_allclose(rem, 1.0)
    y1, _, _, _ = _forward(params, x, dataclasses.replace(TINY, max_steps=1))
    np.testing.assert_allclose(y1, y, atol=1e-6)
    _, steps_m, _, _ = _forward(_params(halt_bias=-50.0), x, TINY)
    np.testing.assert_array_equal(steps_m, TINY.max_steps)
    y_cap, steps_cap, rem_cap, _ = _forward(_params(halt_bias=-50.0), x, TINY, jnp.asarray(1))
    np.testing.assert_array_equal(steps_cap, 1)
    np.testing.assert_allclose(rem_cap, 1.0)
    np.testing.assert_allclose(y_cap, y1, atol=1e-6)


def _python_loop_reference(params, x, cfg):
    """[1] Sec. 2 written directly in numpy: per sequence, per input step, a dynamic while
    loop over s^n = tanh(W_x [x ; flag] + b + W_s s^{n-1}), h = sigmoid(W_h s + b_h),
    y = W_y s + b_y."""
    P = jax.tree.map(np.asarray, params["params"])

    def step(s, x_aug):
        return np.tanh(x_aug @ P["w_x"]["kernel"] + P["w_x"]["bias"] + s @ P["w_s"]["kernel"])

    def halt(s):
        return float(1 / (1 + np.exp(-(s @ P["w_h"]["kernel"] + P["w_h"]["bias"])[0])))

    def output(s):
        return float((s @ P["w_y"]["kernel"] + P["w_y"]["bias"])[0])

    ys, ns, rs = [], [], []
    for b in range(x.shape[0]):
        s_prev = np.zeros(cfg.hidden, np.float32)
        for t in range(x.shape[1]):
            s_n, total, n, s_mean, y_mean = s_prev, 0.0, 0, 0.0, 0.0
            while True:
                n += 1
                flag = np.array([1.0 if n == 1 else 0.0], np.float32)
                s_n = step(s_n, np.concatenate([np.asarray(x[b, t]), flag]))
                h = halt(s_n)
                if total + h >= 1 - cfg.eps or n == cfg.max_steps:
                    p = 1.0 - total  # the remainder R(t)
                    s_mean, y_mean = s_mean + p * s_n, y_mean + p * output(s_n)
                    break
                s_mean, y_mean = s_mean + h * s_n, y_mean + h * output(s_n)
                total += h
            ys.append(y_mean)
            ns.append(n)
            rs.append(p)
            s_prev = s_mean
    shape = x.shape[:2]
    return np.reshape(ys, shape), np.reshape(ns, shape), np.reshape(rs, shape)


def test_scan_equals_python_loop_reference():
    """The jitted fixed-M masked scan equals a dynamic Python loop (3-step sequences, so the
    mean-field state is handed from t to t+1)."""
    x, _ = _x()
    params = _params(key=3, halt_bias=-0.5)
    y, steps, rem, _ = _forward(params, x, TINY)
    y_ref, n_ref, r_ref = _python_loop_reference(params, x, TINY)
    np.testing.assert_array_equal(steps, n_ref)
    assert len(np.unique(n_ref)) > 1
    np.testing.assert_allclose(rem, r_ref, atol=1e-5)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)


def test_parity_data():
    """[1] Sec. 3.1: 1..bits nonzero entries of +-1, target = parity of the number of +1."""
    x, y = _parity(jax.random.PRNGKey(0), 4096, 1, 64)
    x, y = np.asarray(x), np.asarray(y)
    nonzero = (x != 0).sum(-1)
    assert set(np.unique(x)) == {-1.0, 0.0, 1.0}
    assert nonzero.min() == 1 and nonzero.max() >= 60
    np.testing.assert_array_equal(y, (x == 1).sum(-1) % 2)
    assert 0.45 < y.mean() < 0.55


# the one run of the CLI, purity and short behaviour tests: 6-bit parity, 32 tanh units,
# ACT with M = 8, 300 updates of 128, Adam 3e-3, chunks of 100; 2 x SEEDS seeds in one
# compiled program, seeds SEEDS.. the broken variant (no pondering: ponder_cap = 1)
RUN = act.Config(bits=6, hidden=32, max_steps=8, lr=3e-3, total_updates=300, eval_size=512)
CHUNK = 100
SEEDS = tiny_run_module.SEEDS
KEYS = jax.random.split(jax.random.PRNGKey(0), 2 * SEEDS)  # the runner's keys (--seed 0)
_INIT = act.init  # the file's own (the fixture patches act.init)


def _twin_init(key, cfg):
    """act.init, where seed SEEDS + i is seed i's twin (same key: same initial parameters
    and batches) without pondering (the traced ponder_cap = 1)."""
    i = jnp.argmax(jnp.all(key == KEYS, -1))
    state = _INIT(KEYS[i % SEEDS], cfg)
    return state.replace(ponder_cap=jnp.where(i >= SEEDS, 1, state.ponder_cap))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """RUN through the command line, in-process, once, with its 2 x SEEDS seeds."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(act, "init", _twin_init)
        return tiny_run_module.run_cli(act, RUN, tmp_path_factory.mktemp("run"), CHUNK,
                                       extra=("--num-seeds", str(2 * SEEDS)))


def test_train_is_pure_and_seeded(tiny_run):
    """The runner's first chunk, rerun on the same initial states (the same compiled
    program), gives the run's first logged rows bit for bit; the seeds differ; losses are
    finite."""
    n = 2 * SEEDS
    states = run.initial_states(_twin_init, RUN, 0, n)
    step = run.make_chunk(act.update, RUN, CHUNK, parallel.seed_sharding(n), n)
    state, metrics = jax.device_get(step(states))
    for k in tiny_run.history:
        np.testing.assert_array_equal(tiny_run.history[k][:, :CHUNK], metrics[k], err_msg=k)
    assert not np.array_equal(state.params["params"]["w_s"]["kernel"][0],
                              state.params["params"]["w_s"]["kernel"][1])
    loss = tiny_run.history["losses/loss"]
    assert loss.shape == (n, RUN.num_updates) and np.isfinite(loss).all()
    assert not np.array_equal(loss[0], loss[1])
    np.testing.assert_array_equal(tiny_run.state.ponder_cap, [8] * SEEDS + [1] * SEEDS)


def test_cli_runs_and_documents_every_field(tiny_run, tmp_path, capsys):
    with pytest.raises(SystemExit):
        act.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(act.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out
    assert (tiny_run.run_dir / "metrics.jsonl").exists()
    assert tiny_run.history["charts/accuracy"].shape == (2 * SEEDS, RUN.num_updates)
    summary = json.loads((tiny_run.run_dir / "summary.json").read_text())
    assert len(summary["eval/accuracy"]) == 2 * SEEDS
    assert np.isfinite(summary["eval/accuracy"]).all()
    with pytest.raises(ValueError, match="eps must be in"):
        act.main(["--eps", "1.5", "--run-dir", str(tmp_path)])


def test_act_learns_6_bit_parity_better_than_no_pondering_short(tiny_run):
    """Short behaviour test (the slow one below is [1]'s 8-bit setting): the CLI run of RUN
    (6-bit parity, 32 tanh units, ACT with M = 8, 300 updates of 128, Adam 3e-3; held-out
    accuracy of each of 2 seeds) against the same RNN without pondering (the traced
    ponder_cap = 1: N = 1, R = 1, one plain RNN step; each seed's twin, same keys), in the
    same compiled run. Measured (2-core CPU): ACT 0.742 / 0.670 held-out accuracy (2.3 /
    2.6 ponder steps) vs 0.592 / 0.582 without pondering. Fails when `update` ignores the
    traced cap (the twins then train with ACT)."""
    acc, steps = (np.asarray(tiny_run.final[k]) for k in ("eval/accuracy",
                                                          "eval/ponder_steps"))
    acc_act, acc_rnn = acc[:SEEDS], acc[SEEDS:]
    print(f"ACT {acc_act} ({steps[:SEEDS]} steps) vs no pondering {acc_rnn} ({steps[SEEDS:]})")
    assert (steps[SEEDS:] == 1.0).all() and (steps[:SEEDS] > 1.5).all()
    # the twins trained without pondering too (not only evaluated so)
    assert (tiny_run.history["charts/ponder_steps"][SEEDS:] == 1.0).all()
    assert acc_act.mean() > 0.66, acc_act
    assert acc_act.mean() > acc_rnn.mean() + 0.06, (acc_act, acc_rnn)
    assert (acc_act > acc_rnn).all(), (acc_act, acc_rnn)


@pytest.mark.slow
def test_act_learns_parity_better_than_no_pondering():
    """Behaviour ([1] Sec. 3.1, Fig. 4): 8-bit parity, 64 tanh units, batch 128, Adam 3e-3,
    2000 updates, same seed. ACT (M = 10, tau = 1e-3) against the identical RNN without
    pondering (M = 1: one step per input, i.e. a one-hidden-layer net).
    Measured on a 2-core CPU (held-out accuracy, seed 0): ACT 0.998 (8.18 ponder steps on
    average) vs 0.637 without pondering (the same numbers before and after State.ponder_cap
    was added)."""
    base = act.Config(bits=8, hidden=64, max_steps=10, lr=3e-3, total_updates=2000,
                      eval_size=1024)

    def accuracy(cfg):
        state, _ = jax.jit(run.make_train(act.init, act.update, cfg))(jax.random.PRNGKey(0))
        ev = jax.jit(lambda s: act.evaluate(s, cfg))(state)
        return float(ev["eval/accuracy"]), float(ev["eval/ponder_steps"])

    (acc_act, steps_act), (acc_rnn, steps_rnn) = accuracy(base), accuracy(
        dataclasses.replace(base, max_steps=1))
    print(f"ACT {acc_act:.3f} ({steps_act:.2f} steps) vs no pondering {acc_rnn:.3f}")
    assert steps_rnn == 1.0 and steps_act > 1.5
    assert acc_act > 0.9, acc_act
    assert acc_act > acc_rnn + 0.15, (acc_act, acc_rnn)


def test_every_config_field_is_read():
    assert unread_fields(act) == []


def test_paper_preset_traces():
    """jax.eval_shape of init and one update under the paper preset (nothing runs)."""
    cfg, state, after = preset.trace_paper(act)
    assert jax.tree.structure(after[0]) == jax.tree.structure(state)
