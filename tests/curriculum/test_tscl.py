"""Tests of curriculum/tscl.py: the addition task's encoding, the four teachers' progress
estimates and the bandit policies (hand-computed, through the functions `update` calls),
the behaviour of a teacher against uniform sampling and a broken teacher in one compiled
run of the CLI, purity, CLI and the paper preset."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curriculum import tscl
from tests.common.cli import cli_args
from tests.common.compiled import main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# One tiny configuration shared by the module: 3-digit addition, a small LSTM.
TINY = tscl.Config(max_digits=3, hidden_size=32, batch_size=64, train_size=128, val_size=96,
                   lr=1e-2, total_steps=150)
WINDOW, UNIFORM, ANTI = (tscl.TEACHERS.index(t) for t in ("window", "uniform", "anti"))
# The functions `update` calls, jitted once for the equation tests (eager dispatch of their
# small ops compiles far more on CPU); configs are static (frozen dataclasses).
encode = jax.jit(tscl.encode, static_argnums=(2, 3))
problems = jax.jit(tscl.problems, static_argnums=(2, 3))
window_slope = jax.jit(tscl.window_slope)
sampling_values = jax.jit(tscl.sampling_values, static_argnums=3)
teacher_probs = jax.jit(tscl.teacher_probs, static_argnums=4)
teacher_observe = jax.jit(tscl.teacher_observe, static_argnums=5)
egreedy = jax.jit(tscl.egreedy)


def _text(tokens):
    return ["".join(tscl.VOCAB[i] for i in row) for row in np.asarray(tokens)]


def test_encode_is_the_released_generator_s_padded_reversed_strings():
    """addition_rnn_model.generate_data for max_digits 3: the query 'a+b' padded with spaces
    to 7 characters and reversed (invert), the answer str(a+b) padded to 4 characters."""
    a, b = jnp.array([12, 5, 0, 999]), jnp.array([345, 7, 0, 999])
    q, y = encode(a, b, 3, False)
    assert _text(q) == ["12+345 ", "5+7    ", "0+0    ", "999+999"]
    assert _text(y) == ["357 ", "12  ", "0   ", "1998"]
    q_inv, y_inv = encode(a, b, 3, True)
    assert _text(q_inv) == [" 543+21", "    7+5", "    0+0", "999+999"]
    np.testing.assert_array_equal(y_inv, y)
    # Operands of L random digits, leading zeros allowed (int('07') = 7, as in the code).
    lengths = jnp.array([1, 2, 3] * 300)
    q, y = problems(jax.random.PRNGKey(0), lengths, 3, False)
    texts = _text(q)
    a_len = np.array([len(t.split("+")[0]) for t in texts])
    assert (a_len <= np.asarray(lengths)).all() and (a_len == np.asarray(lengths)).mean() > 0.8
    for t, ans in zip(texts[:50], _text(y[:50]), strict=True):
        x1, x2 = t.strip().split("+")
        assert int(x1) + int(x2) == int(ans)


def test_window_slope_by_hand_over_the_ring_s_valid_entries():
    """[1] Alg. 3: least-squares slope of the last K (t, x) pairs. K=4, six epochs written,
    so the ring's slots hold epochs [4, 5, 2, 3]:
        task 0: x = 0.1, 0.3, 0.5, 0.7 at t = 2..5   slope 0.2
        task 1: x = 0.9, 0.8, 0.6, 0.3 at t = 2..5   slope -0.2 (forgetting)
    By hand for task 1: t_mean 3.5, sum dt^2 = 5, sum dt dx = -1 -> -0.2 (np.polyfit agrees).
    With three entries only the valid slots count; with fewer than two the slope is 1."""
    times = jnp.array([4.0, 5.0, 2.0, 3.0])
    scores = jnp.array([[0.5, 0.6], [0.7, 0.3], [0.1, 0.9], [0.3, 0.8]])
    s = window_slope(scores, times, jnp.asarray(6))
    np.testing.assert_allclose(s, [0.2, -0.2], rtol=1e-5)
    np.testing.assert_allclose(s[1], np.polyfit([2, 3, 4, 5], [0.9, 0.8, 0.6, 0.3], 1)[0],
                               rtol=1e-5)
    # three written (slots 0..2: t = 0, 1, 2 with x = 0, 0.5, 0.6), slot 3 is stale
    times3 = jnp.array([0.0, 1.0, 2.0, 9.0])
    scores3 = jnp.array([[0.0], [0.5], [0.6], [5.0]])
    np.testing.assert_allclose(window_slope(scores3, times3, jnp.asarray(3)),
                               [np.polyfit([0, 1, 2], [0, 0.5, 0.6], 1)[0]], rtol=1e-5)
    np.testing.assert_array_equal(window_slope(scores3, times3, jnp.asarray(1)), [1.0])


def _cfg(**kw):
    return dataclasses.replace(TINY, **kw)


def test_online_teacher_is_an_ema_of_the_score_change_and_naive_a_slope_per_round():
    """[1] Alg. 1 by hand through `teacher_observe`, alpha 0.1, from x_{-1} = 0:
        epoch 0: x = [0.5, 0.2]  r = [0.5, 0.2]    Q = 0.1 r            = [0.05, 0.02]
        epoch 1: x = [0.6, 0.1]  r = [0.1, -0.1]   Q += 0.1 (r - Q)     = [0.055, 0.008]
    [1] Alg. 2 (Naive, K = 2): Q moves only at a round's end, toward the round's slope
        epoch 0: Q = [0, 0]; epoch 1: slope [0.1, -0.1] -> Q = [0.01, -0.01]."""
    cfg = _cfg(window_size=2, bandit_lr=0.1)
    p = jnp.full(2, 0.5)
    online, naive = jnp.asarray(0), jnp.asarray(1)
    ts_o = ts_n = tscl.teacher_init(2, 2)
    for t, x in enumerate([jnp.array([0.5, 0.2]), jnp.array([0.6, 0.1])]):
        ts_o = teacher_observe(ts_o, x, p, online, jnp.asarray(t), cfg)
        ts_n = teacher_observe(ts_n, x, p, naive, jnp.asarray(t), cfg)
        if t == 0:
            np.testing.assert_allclose(ts_o.q, [0.05, 0.02], rtol=1e-6)
            np.testing.assert_array_equal(ts_n.q, [0.0, 0.0])
    np.testing.assert_allclose(ts_o.q, [0.055, 0.008], rtol=1e-5)
    np.testing.assert_allclose(ts_n.q, [0.01, -0.01], rtol=1e-5)
    np.testing.assert_allclose(ts_o.prev, [0.6, 0.1])
    np.testing.assert_allclose(ts_o.deltas, [[0.5, 0.2], [0.1, -0.1]], rtol=1e-6)


def test_naive_holds_its_distribution_for_a_round_of_k_epochs():
    """[1] Alg. 2: the policy is applied at the start of each K-epoch round only (K = 10)."""
    ts = tscl.teacher_init(3, 10).replace(q=jnp.array([0.0, 0.2, 0.0]),
                                          p_round=jnp.array([1.0, 0.0, 0.0]))
    key, naive = jax.random.PRNGKey(0), jnp.asarray(1)
    np.testing.assert_allclose(teacher_probs(key, ts, naive, jnp.asarray(20), TINY),
                               [0.1 / 3, 0.9 + 0.1 / 3, 0.1 / 3], rtol=1e-6)  # round starts
    np.testing.assert_array_equal(teacher_probs(key, ts, naive, jnp.asarray(21), TINY),
                                  [1, 0, 0])  # mid-round: the held distribution


def test_sampling_teacher_draws_one_stored_change_per_task():
    """[1] Alg. 4: Thompson draws, independently per task, one of the min(count, K) stored
    score changes (uniformly); the non-Thompson variant takes their mean; empty: 1. Through
    teacher_probs too (fails if the Sampling row reads another teacher's values, or if
    Thompson is ignored there: both tried)."""
    deltas = jnp.array([[0.1, -0.3], [0.2, -0.4], [9.0, 9.0]])  # slot 2 not written yet
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: tscl.sampling_values(
        k, deltas, jnp.asarray(2), True)))(keys))
    np.testing.assert_allclose(np.unique(draws[:, 0]), [0.1, 0.2], rtol=1e-6)
    np.testing.assert_allclose(np.unique(draws[:, 1]), [-0.4, -0.3], rtol=1e-6)
    assert abs((draws[:, 0] == np.float32(0.1)).mean() - 0.5) < 0.05
    both = (draws[:, 0] == np.float32(0.1)) & (draws[:, 1] == np.float32(-0.3))
    assert abs(both.mean() - 0.25) < 0.04  # independent per task
    np.testing.assert_allclose(sampling_values(keys[0], deltas, jnp.asarray(2), False),
                               [0.15, -0.35], rtol=1e-6)
    np.testing.assert_array_equal(sampling_values(keys[0], deltas, jnp.asarray(0), True),
                                  [1.0, 1.0])
    np.testing.assert_allclose(sampling_values(keys[0], deltas, jnp.asarray(7), False),
                               [(0.1 + 0.2 + 9) / 3, (-0.7 + 9) / 3], rtol=1e-6)  # full ring
    # through teacher_probs, as update calls it (teacher index 3): stored changes
    # [0.5, -0.5] and [0, 0.2] have means 0 < 0.1, so without Thompson task 1 is the greedy
    # pick every time; Thompson's independent draws make task 0 the pick half the time
    ts = tscl.teacher_init(2, 10).replace(
        deltas=jnp.zeros((10, 2)).at[:2].set(jnp.array([[0.5, 0.0], [-0.5, 0.2]])),
        count=jnp.asarray(2))
    sampling = jnp.asarray(tscl.TEACHERS.index("sampling"))
    for exploration, share in (("egreedy", 0.0), ("thompson", 0.5)):
        cfg = _cfg(exploration=exploration, epsilon=0.0, abs_progress=False)
        picks = [int(np.argmax(teacher_probs(k, ts, sampling, jnp.asarray(5), cfg)))
                 for k in keys[:200]]
        assert abs(np.mean(np.array(picks) == 0) - share) < 0.1, (exploration, picks[:20])


def test_policies_boltzmann_egreedy_and_abs_progress():
    """Boltzmann by hand: tau 0.0004, Q = [0, tau ln 2, tau ln 4] -> p = [1, 2, 4] / 7.
    eps-greedy: 0.9 on argmax + 0.1 / 3 each; ties broken at random. abs ([1] Sec. 3): a
    task being forgotten (Q = -0.05) beats one learnt slowly (0.02); without abs the
    slow one wins."""
    tau = 0.0004
    ts = tscl.teacher_init(3, 10)
    # Window's slopes from a ring of scores rising by [0, tau ln 2, tau ln 4] per epoch
    slope = jnp.array([0.0, tau * np.log(2), tau * np.log(4)])
    ring = ts.replace(scores=jnp.zeros((10, 3)).at[:3].set(jnp.stack([0 * slope, slope,
                                                                       2 * slope])),
                      times=jnp.zeros(10).at[:3].set(jnp.array([0.0, 1.0, 2.0])),
                      count=jnp.asarray(3))
    p = tscl.boltzmann(window_slope(ring.scores, ring.times, ring.count), tau)
    np.testing.assert_allclose(p, [1 / 7, 2 / 7, 4 / 7], rtol=1e-3)
    p = teacher_probs(jax.random.PRNGKey(0), ring, jnp.asarray(WINDOW), jnp.asarray(3),
                      _cfg(exploration="boltzmann", temperature=tau))  # what update calls
    np.testing.assert_allclose(p, [1 / 7, 2 / 7, 4 / 7], rtol=1e-3)
    np.testing.assert_allclose(tscl.boltzmann(jnp.array([0.0, 1.0]), 1.0),
                               [1 / (1 + np.e), np.e / (1 + np.e)], rtol=1e-6)

    q = ts.replace(q=jnp.array([0.02, -0.05, 0.0]))
    online = jnp.asarray(0)
    p_abs = teacher_probs(jax.random.PRNGKey(0), q, online, jnp.asarray(5),
                               _cfg(abs_progress=True))
    p_raw = teacher_probs(jax.random.PRNGKey(0), q, online, jnp.asarray(5),
                               _cfg(abs_progress=False))
    np.testing.assert_allclose(p_abs, [0.1 / 3, 0.9 + 0.1 / 3, 0.1 / 3], rtol=1e-6)
    np.testing.assert_allclose(p_raw, [0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3], rtol=1e-6)
    ties = np.stack([egreedy(k, jnp.array([1.0, 0.0, 1.0]), 0.1)
                     for k in jax.random.split(jax.random.PRNGKey(1), 40)])
    assert set(ties.argmax(1)) == {0, 2}
    # uniform ignores everything; the broken anti teacher reads Window's slopes
    # [0, tau ln 2, tau ln 4] and picks the least progress, with or without abs
    np.testing.assert_allclose(teacher_probs(jax.random.PRNGKey(0), q,
                                                  jnp.asarray(UNIFORM), jnp.asarray(5),
                                                  _cfg()), [1 / 3] * 3)
    for abs_progress in (True, False):
        p_anti = teacher_probs(jax.random.PRNGKey(0), ring, jnp.asarray(ANTI),
                                    jnp.asarray(3), _cfg(abs_progress=abs_progress))
        np.testing.assert_allclose(p_anti, [0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3], rtol=1e-6)


def test_bad_values_fail_with_named_field(tmp_path):
    bad = [(["--teacher", "oracle"], "teacher='oracle' must be one of"),
           (["--exploration", "thompson"], "needs teacher='sampling'"),
           (["--max-digits", "10"], r"max_digits=10 must be in \[1, 9\]"),
           (["--train-size", "1000"], "not divisible by batch_size=4096"),
           (["--window-size", "1"], "window_size=1 must be >= 2"),
           (["--epsilon", "1.5"], r"epsilon=1.5 must be in \[0, 1\]"),
           (["--temperature", "0"], "temperature=0.0 must be > 0"),
           (["--bandit-lr", "0"], "--bandit-lr must be > 0")]
    for args, msg in bad:
        with pytest.raises(ValueError, match=msg):
            tscl.main(args + ["--run-dir", str(tmp_path / "x")])


# --- one compiled run of the CLI: the teacher, uniform and the broken teacher side by side

SEEDS = 3
CHUNK = 50  # updates per compiled chunk: the purity rerun runs one chunk of the same program
ARGS = cli_args(TINY, tscl.Config()) + ["--num-seeds", str(3 * SEEDS), "--log-every",
                                        str(CHUNK), "--no-progress"]


def _run(run_dir, extra=(), args=ARGS, seeds=SEEDS):
    """`args` through `tscl.main`, 3 x seeds seeds in ONE compiled program: seeds 0.. use the
    Window teacher (abs, eps-greedy), seeds.. uniform sampling, 2 seeds.. the broken anti
    teacher, each group on the same keys (the teacher id is traced in the state)."""
    keys = jax.random.split(jax.random.PRNGKey(0), 3 * seeds)  # the runner's seed keys
    real = tscl.init

    def init(key, cfg):
        i = jnp.argmax(jnp.all(key == keys, -1))
        state = real(keys[i % seeds], cfg)
        return state.replace(teacher=jnp.array([WINDOW, UNIFORM, ANTI])[i // seeds])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tscl, "init", init)
        return tscl.main(list(args) + list(extra) + ["--run-dir", str(run_dir)])


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """(the run, the runner's compiled chunks with their recorded inputs)"""
    run_dir = tmp_path_factory.mktemp("tscl")
    return main_recording_chunks(lambda _: _run(run_dir), None)


@pytest.fixture(scope="module")
def quick_run(recorded):
    return recorded[0]


def test_window_teacher_beats_the_broken_teacher_and_keeps_up_with_uniform(quick_run):
    """Behaviour ([1] Sec. 4) in seconds: 3-digit addition, LSTM 32, 150 epochs of 128
    problems, 3 seeds per teacher, in one compiled run of the CLI. Mean validation accuracy
    over training (auc) and the mass on 1-digit sums, measured on CPU (jax 0.10.2):
        Window abs  0.109 0.078 0.056   p(1 digit) 0.80 0.75 0.76
        uniform     0.046 0.048 0.028               1/3
        anti        0.016 0.015 0.014               0.08 0.14 0.13   (broken)
    The broken teacher fails the last three asserts; so does a Window teacher when `update`
    ignores the traced teacher id (mutation: every seed runs Window, the groups tie)."""
    auc = quick_run.final["auc"]
    win, uni, bad = auc[:SEEDS], auc[SEEDS:2 * SEEDS], auc[2 * SEEDS:]
    p1 = quick_run.history["charts/p_1digit"].mean(1)
    print("window", win, "uniform", uni, "anti", bad, "p(1 digit)", p1)
    assert win.mean() >= uni.mean() - 0.02, (win, uni)  # keeps up with uniform
    assert win.mean() >= bad.mean() + 0.04, (win, bad)
    assert win.min() > bad.max(), (win, bad)
    # [1] Fig. 4's start: the 1-digit sums progress first, so Window drills them; the broken
    # teacher avoids them (uniform: 1/3)
    assert p1[:SEEDS].min() > 0.5 > 0.2 > p1[2 * SEEDS:].max(), p1


def test_train_is_pure_and_cli_writes_its_files(recorded, capsys):
    """The runner's first compiled chunk again on its recorded input (no tracing, no
    compiling) gives bit-identical metrics; seeds differ; the teacher's
    distributions sum to 1; the run wrote its files; `--help` documents every field."""
    quick_run, chunks = recorded
    with pytest.raises(SystemExit):
        tscl.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(tscl.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out
    assert (quick_run.run_dir / "metrics.jsonl").exists()
    h = quick_run.history
    assert h["losses/student"].shape == (3 * SEEDS, TINY.total_steps)
    assert not np.array_equal(h["losses/student"][0], h["losses/student"][1])
    np.testing.assert_array_equal(quick_run.state.step, [TINY.total_steps] * 3 * SEEDS)
    p = np.stack([h[f"charts/p_{i + 1}digit"] for i in range(TINY.max_digits)])
    np.testing.assert_allclose(p.sum(0), 1.0, rtol=1e-5)
    assert set(quick_run.final) == {"epochs_to_target", "val_accuracy", "auc"}
    np.testing.assert_allclose(quick_run.final["auc"], h["charts/val_accuracy"].mean(1), rtol=1e-5)
    # the first chunk again, on its recorded input: bit-identical metrics
    assert len(chunks) == TINY.total_steps // CHUNK
    _, metrics = jax.device_get(chunks[0][0](chunks[0][1]))
    for k in ("losses/student", "charts/val_accuracy", "charts/p_2digit"):
        np.testing.assert_array_equal(h[k][:, :CHUNK], metrics[k])


@pytest.mark.slow
def test_window_teacher_on_the_quick_preset(tmp_path):
    """The `quick` preset (3-digit addition, LSTM 64, 600 epochs of 512 problems), 2 seeds
    per teacher in one program. Measured through the CLI, one teacher a run (2-core CPU,
    jax 0.10.2): auc Window 0.505, 0.521; uniform 0.587, 0.601; anti (broken) 0.379, 0.351.
    This test's own run gives the same auc to 3 decimals, and 2-digit accuracy over epochs
    250-300 of Window 0.87, 0.89 (it drilled 1 then 2 digits), uniform 0.84, 0.78, anti
    0.18, 0.20 (492 s on a 2-core CPU under load). Uniform sampling is ahead at this scale
    (the post's warning), so the gate asks Window to stay within 0.15 of it; the broken
    teacher fails the other two asserts."""
    res = _run(tmp_path, args=["--preset", "quick", "--num-seeds", "6", "--log-every", "100",
                               "--no-progress"], seeds=2)
    auc, h = res.final["auc"], res.history
    acc2 = h["charts/acc_2digit"][:, 250:300].mean(1)
    print("auc", auc, "2-digit at 250-300", acc2)
    win, uni, bad = auc[:2], auc[2:4], auc[4:]
    assert win.min() > bad.max() + 0.06, auc
    assert win.mean() > uni.mean() - 0.15, auc
    assert acc2[:2].min() > 0.7 > 0.5 > acc2[4:].max(), acc2


def test_every_config_field_is_read():
    """No flag that lies: each Config field is read by code that runs (AST, not text)."""
    assert unread_fields(tscl) == []


def test_paper_preset_traces():
    """jax.eval_shape of init and one update under the `paper` preset (9 digits, LSTM 128,
    batch 4096, 40960 problems per epoch): nothing runs."""
    cfg, state, (after, metrics) = trace_paper(tscl)
    assert state.val_x.shape == (4096, 19) and state.val_y.shape == (4096, 10)
    assert state.params["params"]["KerasLSTM_0"]["recurrent_kernel"].shape == (128, 512)
    assert state.teacher.shape == () and cfg.teacher == "window"
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
    assert "charts/p_9digit" in metrics
    bf16 = dataclasses.replace(cfg, dtype="bfloat16")
    jax.eval_shape(lambda s: tscl.update(s, bf16), state)
