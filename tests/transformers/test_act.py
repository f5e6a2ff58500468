"""Tests of transformers/act.py: halting distribution, N <= M, scan == Python loop, the ponder
cost and its gradient, the parity data, purity, CLI and behaviour (ACT vs no pondering)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import run
from tests.common import preset
from tests.common.compiled import compiled
from tests.common.config_fields import unread_fields
from tests.transformers import tiny_run as tiny_run_module
from transformers import act

TINY = act.Config(bits=8, seq_len=3, hidden=16, max_steps=6, batch_size=8, total_updates=3,
                  eval_size=16)


_forward = jax.jit(act.forward, static_argnums=2)


def _params(cfg, key=0, halt_bias=None):
    params = compiled(lambda k_: act.init(k_, cfg), jax.random.PRNGKey(key)).params
    if halt_bias is not None:  # a constant halting probability h = sigmoid(halt_bias)
        w_h = params["params"]["w_h"]
        params = {"params": {**params["params"], "w_h": {
            "kernel": jnp.zeros_like(w_h["kernel"]), "bias": jnp.full_like(w_h["bias"],
                                                                            halt_bias)}}}
    return params


def _x(cfg, key=1, batch=5):
    return act.parity_batch(jax.random.PRNGKey(key), batch, cfg.seq_len, cfg.bits)


def test_halting_probabilities_sum_to_one_and_steps_within_m():
    """[1] Eq. 10-12 on random weights (halting bias 0 so N varies): sum_n p = 1, 1 <= N <= M,
    p = 0 after the halting step, R = p at step N, and eps < R <= 1."""
    cfg = dataclasses.replace(TINY, halt_bias_init=-1.0)
    x, _ = _x(cfg, batch=64)
    _, steps, rem, p = _forward(_params(cfg), x, cfg)
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
    R = 1 - 0.9 = 0.1, p = (0.3, 0.3, 0.3, 0.1), rho = N + R = 4.1. With M = 2 the cap wins:
    N = 2, R = 0.7. d rho / d b_h = -sum_{n<N} h(1-h) = -3 * 0.21 (N has no gradient)."""
    b = float(np.log(0.3 / 0.7))
    cfg = dataclasses.replace(TINY, seq_len=1)
    x, _ = _x(cfg, batch=2)
    _, steps, rem, p = _forward(_params(cfg, halt_bias=b), x, cfg)
    np.testing.assert_array_equal(steps, 4)
    np.testing.assert_allclose(rem, 0.1, atol=1e-6)
    np.testing.assert_allclose(p[0, 0], [0.3, 0.3, 0.3, 0.1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(act.ponder_cost(steps, rem), 4.1, atol=1e-6)
    capped = dataclasses.replace(cfg, max_steps=2)
    _, steps2, rem2, _ = _forward(_params(capped, halt_bias=b), x, capped)
    np.testing.assert_array_equal(steps2, 2)
    np.testing.assert_allclose(rem2, 0.7, atol=1e-6)

    def cost(bias):
        params = _params(cfg, halt_bias=b)
        params["params"]["w_h"]["bias"] = jnp.full((1,), bias)
        _, s, r, _ = _forward(params, x[:1], cfg)
        return act.ponder_cost(s, r)[0]

    np.testing.assert_allclose(jax.grad(cost)(b), -3 * 0.3 * 0.7, rtol=1e-5)


def test_large_halting_bias_is_one_plain_rnn_step():
    """b_h -> +inf: h ~ 1 >= 1 - eps at n = 1, so N = 1, R = 1 and the output is one plain RNN
    step on [x ; 1]; b_h -> -inf: N = M. max_steps = 1 is the same plain RNN."""
    cfg = dataclasses.replace(TINY, seq_len=1)
    x, _ = _x(cfg)
    params = _params(cfg, halt_bias=50.0)
    y, steps, rem, _ = _forward(params, x, cfg)
    net = act.RNN(cfg.hidden)
    s = net.apply(params, jnp.zeros((5, cfg.hidden)), jnp.concatenate(
        [x[:, 0], jnp.ones((5, 1))], -1), method=act.RNN.step)
    np.testing.assert_allclose(y[:, 0], net.apply(params, s, method=act.RNN.output), atol=1e-6)
    np.testing.assert_array_equal(steps, 1)
    np.testing.assert_allclose(rem, 1.0)
    y1, _, _, _ = _forward(params, x, dataclasses.replace(cfg, max_steps=1))
    np.testing.assert_allclose(y1, y, atol=1e-6)
    _, steps_m, _, _ = _forward(_params(cfg, halt_bias=-50.0), x, cfg)
    np.testing.assert_array_equal(steps_m, cfg.max_steps)


def _python_loop_reference(params, x, cfg):
    """[1] Sec. 2 written directly: per sequence, per input step, a dynamic while loop."""
    net = act.RNN(cfg.hidden)
    call = lambda m, *a: np.asarray(net.apply(params, *a, method=getattr(act.RNN, m)))  # noqa
    ys, ns, rs = [], [], []
    for b in range(x.shape[0]):
        s_prev = np.zeros((1, cfg.hidden), np.float32)
        for t in range(x.shape[1]):
            s_n, total, n, s_mean, y_mean = s_prev, 0.0, 0, 0.0, 0.0
            while True:
                n += 1
                flag = np.array([[1.0 if n == 1 else 0.0]], np.float32)
                s_n = call("step", s_n, np.concatenate([np.asarray(x[b:b + 1, t]), flag], -1))
                h = float(call("halt", s_n)[0])
                if total + h >= 1 - cfg.eps or n == cfg.max_steps:
                    p = 1.0 - total  # the remainder R(t)
                    s_mean, y_mean = s_mean + p * s_n, y_mean + p * float(call("output", s_n)[0])
                    break
                s_mean, y_mean = s_mean + h * s_n, y_mean + h * float(call("output", s_n)[0])
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
    cfg = dataclasses.replace(TINY, halt_bias_init=-0.5)
    x, _ = _x(cfg, batch=4)
    params = _params(cfg, key=3)
    y, steps, rem, _ = jax.jit(act.forward, static_argnums=2)(params, x, cfg)
    y_ref, n_ref, r_ref = _python_loop_reference(params, x, cfg)
    np.testing.assert_array_equal(steps, n_ref)
    assert len(np.unique(n_ref)) > 1
    np.testing.assert_allclose(rem, r_ref, atol=1e-6)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)


def test_parity_data():
    """[1] Sec. 3.1: 1..bits nonzero entries of +-1, target = parity of the number of +1."""
    x, y = act.parity_batch(jax.random.PRNGKey(0), 4096, 1, 64)
    x, y = np.asarray(x), np.asarray(y)
    nonzero = (x != 0).sum(-1)
    assert set(np.unique(x)) == {-1.0, 0.0, 1.0}
    assert nonzero.min() == 1 and nonzero.max() >= 60
    np.testing.assert_array_equal(y, (x == 1).sum(-1) % 2)
    assert 0.45 < y.mean() < 0.55


# the one run of the CLI, purity and short behaviour tests: 6-bit parity, 32 tanh units,
# ACT with M = 8, 300 updates of 128, Adam 3e-3, 2 seeds, chunks of 100
RUN = act.Config(bits=6, hidden=32, max_steps=8, lr=3e-3, total_updates=300, eval_size=512)
CHUNK = 100


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """RUN through the command line, in-process, once."""
    return tiny_run_module.run_cli(act, RUN, tmp_path_factory.mktemp("run"), CHUNK)


def test_train_is_pure_and_seeded(tiny_run):
    """The runner's first chunk, rerun on the same initial states, gives the same metrics;
    the two seeds differ."""
    tiny_run_module.assert_pure(act, RUN, tiny_run, CHUNK)
    assert tiny_run.history["losses/loss"].shape == (2, RUN.num_updates)


def test_cli_runs_and_documents_every_field(tiny_run, tmp_path, capsys):
    with pytest.raises(SystemExit):
        act.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(act.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out
    assert (tiny_run.run_dir / "metrics.jsonl").exists()
    assert tiny_run.history["charts/accuracy"].shape == (2, RUN.num_updates)
    summary = json.loads((tiny_run.run_dir / "summary.json").read_text())
    assert len(summary["eval/accuracy"]) == 2 and np.isfinite(summary["eval/accuracy"]).all()
    with pytest.raises(ValueError, match="eps must be in"):
        act.main(["--eps", "1.5", "--run-dir", str(tmp_path)])


def test_act_learns_6_bit_parity_better_than_no_pondering_short(tiny_run):
    """Short behaviour test (the slow one below is [1]'s 8-bit setting): the CLI run of RUN
    (6-bit parity, 32 tanh units, ACT with M = 8, 300 updates of 128, Adam 3e-3; held-out
    accuracy, mean of 2 seeds) against the same RNN without pondering (M = 1, one seed).
    Measured (2-core CPU): ACT 0.742 / 0.670 held-out accuracy (2.3 / 2.6 ponder steps; the
    run's 2 seeds) vs 0.586 without pondering (seed 0 alone gave ACT 0.775)."""
    acc_act, steps_act = (np.asarray(tiny_run.final[k]) for k in ("eval/accuracy",
                                                                  "eval/ponder_steps"))
    cfg = dataclasses.replace(RUN, max_steps=1)
    state, _ = jax.jit(run.make_train(act.init, act.update, cfg))(jax.random.PRNGKey(0))
    ev = jax.jit(lambda s: act.evaluate(s, cfg))(state)
    acc_rnn, steps_rnn = float(ev["eval/accuracy"]), float(ev["eval/ponder_steps"])
    print(f"ACT {acc_act} ({steps_act} steps) vs no pondering {acc_rnn:.3f}")
    assert steps_rnn == 1.0 and (steps_act > 1.5).all()
    assert acc_act.mean() > 0.66, acc_act
    assert acc_act.mean() > acc_rnn + 0.06, (acc_act, acc_rnn)


@pytest.mark.slow
def test_act_learns_parity_better_than_no_pondering():
    """Behaviour ([1] Sec. 3.1, Fig. 4): 8-bit parity, 64 tanh units, batch 128, Adam 3e-3,
    2000 updates, same seed. ACT (M = 10, tau = 1e-3) against the identical RNN without
    pondering (M = 1: one step per input, i.e. a one-hidden-layer net).
    Measured on a 2-core CPU (held-out accuracy, seed 0): ACT 1.000 (9.7 ponder steps on
    average) vs 0.637 without pondering."""
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
