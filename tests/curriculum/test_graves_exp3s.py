"""Tests of curriculum/graves_exp3s.py: the repeat-copy generator, Exp3.S' weight update,
the quantile rescaling and the five progress signals on hand-computed cases (through the
functions `update` calls); a planted-reward bandit test against the broken sign-flipped
teacher; one compiled run of the CLI with Exp3.S, uniform, target-only and the broken
teacher side by side (behaviour, purity, CLI); the paper preset's trace."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curriculum import graves_exp3s as g
from tests.common.cli import cli_args
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# One tiny configuration shared by the module: 3 x 2 repeat-copy tasks, a 16-unit LSTM,
# the four teachers side by side in one compiled program.
TINY = g.Config(teachers=("exp3s", "uniform", "target", "anti"), max_length=3, max_repeats=2,
                num_bits=3, hidden_size=16, batch_size=8, lr=1e-2, eta=3e-2,
                history_size=100, eval_size=4, eval_every=10, total_steps=300)
EXP3S, ANTI = g.TEACHERS.index("exp3s"), g.TEACHERS.index("anti")
# The functions `update` calls, jitted once (configs are static: frozen dataclasses).
repeat_copy = jax.jit(g.repeat_copy, static_argnums=2)
exp3s_update = jax.jit(g.exp3s_update)
rescale = jax.jit(g.rescale)
teacher_policy = jax.jit(g.teacher_policy, static_argnums=2)
teacher_step = jax.jit(g.teacher_step, static_argnums=8)
reservoir_add = jax.jit(g.reservoir_add)
progress = jax.jit(g.progress, static_argnums=(0, 1))


def test_repeat_copy_sequences_by_hand():
    """Task k = (l - 1) max_repeats + (r - 1); task 3 of TINY is (l 2, r 2): the inputs are
    2 bit vectors then the delimiter (flag 1, repeat channel r / max_repeats = 1), the
    targets from step 3 on are the two vectors twice, then the end flag at step 7; the
    mask covers steps 3..7; tau = l + 1 + l r + 1 = 8. Task 5 (the target) is (3, 2)."""
    assert g.task_shape(3, 2) == (2, 2) and g.task_shape(5, 2) == (3, 2)
    assert g.task_cost(3, 2) == 8 and g.task_cost(5, 2) == 11 and TINY.seq_len == 11
    x, y, mask = (np.asarray(a) for a in repeat_copy(jax.random.PRNGKey(3),
                                                     jnp.array([3, 5]), TINY))
    assert x.shape == (2, 11, 5) and y.shape == (2, 11, 4) and mask.shape == (2, 11)
    bits = x[0, :2, :3]
    np.testing.assert_array_equal(x[0, 2], [0, 0, 0, 1, 1.0])  # delimiter, r / R = 2 / 2
    np.testing.assert_array_equal(x[0, 3:], 0)
    np.testing.assert_array_equal(y[0, 3:7, :3], np.concatenate([bits, bits]))
    np.testing.assert_array_equal(y[0, :, 3], np.eye(11)[7])
    np.testing.assert_array_equal(y[0, :3], 0)
    np.testing.assert_array_equal(mask[0], [0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(y[1, 4:10, :3], np.concatenate([x[1, :3, :3]] * 2))
    np.testing.assert_array_equal(mask[1], [0] * 4 + [1] * 7)
    np.testing.assert_allclose(x[1, 3, 3:], [1, 1.0])


def _exp3s_numpy(w, pi, k, r, t, eta, beta):
    """Exp3.S as the public numpy re-implementation of [1] Alg. 1 writes it (a loop)."""
    n = len(w)
    alpha = 1.0 / t
    tmp = np.exp(w + eta * ((r * (np.arange(n) == k)) + beta) / pi)
    return np.array([np.log((1 - alpha) * tmp[i] + alpha / (n - 1) * (tmp.sum() - tmp[i]))
                     for i in range(n)])


def test_exp3s_update_and_policy_by_hand():
    """pi = (1 - eps) softmax(w) + eps / N; r~_i = (r 1[i=k] + beta) / pi_i; the weight
    sharing mixes a_t = 1/t of every other arm in. By hand for w = 0, N = 4, k = 1, r = 1,
    eta 0.1, beta 0, t = 2: pi = 1/4, a = [0, 0.4, 0, 0], w_1 = log(0.5 e^0.4 + 0.5) =
    0.2199, w_0 = log(0.5 + 0.5 (e^0.4 + 2) / 3) = 0.0788. Fails with the importance weight
    removed (w_1 = 0.0512), the sharing term dropped (w_0 = 0) or a_t / N instead of
    a_t / (N - 1) (w_1 = 0.1141) (tried)."""
    w = jnp.zeros(4)
    pi = teacher_policy(w, EXP3S, dataclasses.replace(TINY, epsilon=0.05))
    np.testing.assert_allclose(pi, [0.25] * 4, rtol=1e-6)
    out = exp3s_update(w, pi, 1, 1.0, 2.0, 0.1, 0.0)
    np.testing.assert_allclose(out, [0.0788, 0.2199, 0.0788, 0.0788], atol=1e-4)
    # a general case against the loop: non-uniform weights, beta, several t (t = 1: all
    # weight is shared, a_t = 1)
    w = jnp.array([0.3, -1.0, 2.0, 0.5, 0.0])
    cfg = dataclasses.replace(TINY, epsilon=0.2)
    pi = np.asarray(teacher_policy(w, EXP3S, cfg))
    sm = np.exp(w) / np.exp(w).sum()
    np.testing.assert_allclose(pi, 0.8 * sm + 0.2 / 5, rtol=1e-6)
    for t, k, r, beta in ((1.0, 2, 0.7, 0.0), (4.0, 1, -0.5, 0.1), (50.0, 4, 1.0, 0.05)):
        np.testing.assert_allclose(exp3s_update(w, jnp.asarray(pi), k, r, t, 0.01, beta),
                                   _exp3s_numpy(np.asarray(w), pi, k, r, t, 0.01, beta),
                                   rtol=1e-5, atol=1e-6)
    # the baselines' policies and the broken teacher's (Exp3.S' policy, reward negated)
    np.testing.assert_allclose(teacher_policy(w, 1, cfg), [0.2] * 5)
    np.testing.assert_array_equal(teacher_policy(w, 2, cfg), [0, 0, 0, 0, 1])
    np.testing.assert_allclose(teacher_policy(w, ANTI, cfg), pi, rtol=1e-6)


def test_rescale_by_the_history_quantiles():
    """[1]: r = -1 below the 20th percentile q^lo of the history, +1 above the 80th q^hi,
    2 (r^ - q^lo) / (q^hi - q^lo) - 1 between; numpy's quantiles over the filled entries of
    the history only (fails if the unfilled zeros count: tried). One entry: 0."""
    hist = jnp.array([0.5, 0.1, 0.3, 0.9, 0.0, 0.0])  # 4 filled
    lo, hi = np.quantile([0.5, 0.1, 0.3, 0.9], [0.2, 0.8])  # 0.22, 0.66
    for raw, want in ((0.0, -1.0), (0.22, -1.0), (0.44, 0.0), (0.5, 2 * (0.5 - lo) / (hi - lo) - 1),
                      (0.66, 1.0), (5.0, 1.0)):
        np.testing.assert_allclose(rescale(raw, hist, 4, 0.2, 0.8), want, atol=1e-5)
    full = jnp.arange(6.0)  # a full reservoir (count > H): every entry counts
    np.testing.assert_allclose(rescale(2.5, full, 9, 0.2, 0.8), 0.0, atol=1e-6)
    np.testing.assert_allclose(rescale(1.5, full, 9, 0.2, 0.8),
                               2 * (1.5 - 1) / (4 - 1) - 1, atol=1e-6)
    assert float(rescale(3.0, jnp.array([3.0, 0, 0]), 1, 0.2, 0.8)) == 0.0
    # through teacher_step, as update calls it: at step 4 < H the reward fills slot 4, then
    # is rescaled with itself in the history; the broken teacher gets the negated reward
    cfg = dataclasses.replace(TINY, history_size=6)
    w = jnp.zeros(6)
    pi = jnp.full(6, 1 / 6)  # the policy of w = 0
    for teacher, sign in ((EXP3S, 1), (ANTI, -1)):
        w2, h2, r = teacher_step(w, hist, 0.5, 1, pi, teacher, jnp.asarray(4),
                                 jax.random.PRNGKey(0), cfg)
        np.testing.assert_allclose(h2, [0.5, 0.1, 0.3, 0.9, 0.5, 0.0])  # slot 4
        lo5, hi5 = np.quantile([0.5, 0.1, 0.3, 0.9, 0.5], [0.2, 0.8])  # 5 filled
        np.testing.assert_allclose(r, sign * (2 * (0.5 - lo5) / (hi5 - lo5) - 1), rtol=1e-5)
        np.testing.assert_allclose(w2, _exp3s_numpy(np.zeros(6), np.asarray(pi), 1, float(r),
                                                    5.0, cfg.eta, cfg.beta), atol=1e-6)
    # the baselines' weights stay put (the target-only one-hot pi gave 0/0 = NaN: tried)
    onehot = jnp.asarray(np.eye(6)[5])
    for teacher, p in ((g.TEACHERS.index("uniform"), pi), (g.TEACHERS.index("target"), onehot)):
        w2, _, _ = teacher_step(w, hist, 0.5, 5, p, teacher, jnp.asarray(4),
                                jax.random.PRNGKey(0), cfg)
        np.testing.assert_array_equal(w2, w)
    assert np.isfinite(exp3s_update(w, onehot, 5, 1.0, 5.0, 0.1, 0.0)).all()


def test_history_is_a_reservoir_sample():
    """[1]'s history keeps a uniform sample of ALL rewards seen (algorithm R): stream the
    rewards 0..99 through 10 slots, 2000 keys: the first 10 fill slots 0..9 in order and
    every reward is kept with probability 10 / 100 (measured 0.08-0.12). A ring buffer of
    the last 10 keeps 90..99 only (inclusion 0 / 1: tried, fails), and always overwriting
    a slot j ~ U{0..9} (no drop) keeps the late rewards (rewards 0..9 about 0, reward 99
    always: tried, fails)."""
    h = reservoir_add(jnp.zeros(3), 7.0, jnp.asarray(1), jax.random.PRNGKey(0))
    np.testing.assert_array_equal(h, [0, 7.0, 0])

    def run(key):
        def step(hist, xs):
            i, k = xs
            return g.reservoir_add(hist, i.astype(jnp.float32), i, k), None

        return jax.lax.scan(step, jnp.full(10, -1.0),
                            (jnp.arange(100), jax.random.split(key, 100)))[0]

    hs = np.asarray(jax.jit(jax.vmap(run))(jax.random.split(jax.random.PRNGKey(0), 2000)))
    kept = np.bincount(hs.astype(int).ravel(), minlength=100) / 2000
    assert kept.min() > 0.06 and kept.max() < 0.14, kept
    np.testing.assert_allclose(kept[:10].mean(), kept[90:].mean(), atol=0.02)


def test_progress_signals_on_a_linear_model():
    """[1] Table 1 on L(theta, (a, b)) = mean((a theta - b)^2), theta' = theta - 0.1 g:
    PG on x itself, GPG = ||g||^2 = 4 ||a^T (a theta - b)||^2 / B^2, SPG/TPG/MPG the loss
    change on x'; L2G ||theta'||^2 - ||theta||^2 = (0.5 + 7/30)^2 + (-0.5 + 1/3)^2 - 0.5
    = 0.0656 (fails with the sign flipped: tried). The task of x': SPG k, TPG the target
    N - 1, MPG uniform over N."""
    a = jnp.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    b = jnp.array([1.0, 0.0, 3.0])
    a2, b2 = jnp.array([[2.0, 1.0]]), jnp.array([-1.0])
    theta = jnp.array([0.5, -0.5])

    def loss_fn(th, batch):
        return ((batch[0] @ th - batch[1]) ** 2).mean()

    res = np.asarray(a @ theta - b)  # [-0.5, -1, -3]
    grad = 2 * np.asarray(a).T @ res / 3  # [-7/3, -10/3]
    theta_new = theta - 0.1 * grad
    x, x2 = (a, b), (a2, b2)
    L = lambda th, aa, bb: np.mean((np.asarray(aa) @ np.asarray(th) - np.asarray(bb)) ** 2)
    want = {"pg": L(theta, a, b) - L(theta_new, a, b),  # 3.4167 - 2.0344
            "gpg": (7 / 3) ** 2 + (10 / 3) ** 2,
            "spg": L(theta, a2, b2) - L(theta_new, a2, b2)}
    want["tpg"] = want["mpg"] = want["spg"]
    want["l2g"] = (0.5 + 7 / 30) ** 2 + (-0.5 + 1 / 3) ** 2 - 0.5
    for signal, v in want.items():
        got = progress(signal, loss_fn, theta, jnp.asarray(theta_new), jnp.asarray(grad), x, x2)
        np.testing.assert_allclose(got, v, rtol=1e-5, err_msg=signal)
    np.testing.assert_allclose(want["pg"], 3.41667 - 2.03444, rtol=1e-4)
    key = jax.random.PRNGKey(0)
    assert g.other_task("pg", key, 2, 6) is None and g.other_task("gpg", key, 2, 6) is None
    assert int(g.other_task("spg", key, 2, 6)) == 2 and int(g.other_task("tpg", key, 2, 6)) == 5
    draws = np.asarray(jax.jit(jax.vmap(lambda k: g.other_task("mpg", k, 2, 6)))(
        jax.random.split(key, 3000)))
    np.testing.assert_allclose(np.bincount(draws, minlength=6) / 3000, [1 / 6] * 6, atol=0.03)


def test_planted_reward_moves_the_mass_and_the_broken_teacher_does_not():
    """Behaviour of the teacher alone (teacher_policy + teacher_step, as update runs them):
    5 arms, arm 3 pays progress 1 + N(0, 0.1), the others N(0, 0.1); 400 steps, eta 0.01,
    4 seeds. Exp3.S' mass on arm 3 rises far above 1/5 (measured 0.78-0.80 after 400
    steps, reservoir history); the broken teacher (reward sign flipped) drives it toward
    the eps / N floor (0.05-0.07).
    Removing the importance weight keeps Exp3.S above 1/5 here (the equation test catches
    that one)."""
    cfg = dataclasses.replace(TINY, eta=0.01, history_size=100)

    def run(key, teacher):
        def step(carry, key):
            w, hist, t = carry
            k_pick, k_noise, k_hist = jax.random.split(key, 3)
            pi = g.teacher_policy(w, teacher, cfg)
            k = jax.random.categorical(k_pick, jnp.log(pi))
            raw = (k == 3) + 0.1 * jax.random.normal(k_noise)
            w, hist, _ = g.teacher_step(w, hist, raw, k, pi, teacher, t, k_hist, cfg)
            return (w, hist, t + 1), None

        init = (jnp.zeros(5), jnp.zeros(cfg.history_size), jnp.zeros((), jnp.int32))
        (w, _, _), _ = jax.lax.scan(step, init, jax.random.split(key, 400))
        return g.teacher_policy(w, teacher, cfg)[3]

    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    p3 = np.asarray(jax.jit(jax.vmap(jax.vmap(run, (0, None)), (None, 0)))(
        keys, jnp.array([EXP3S, ANTI])))
    print("p(arm 3): exp3s", p3[0], "anti", p3[1])
    assert p3[0].min() > 0.6 > 0.2 > 0.1 > p3[1].max(), p3


def test_bad_values_fail_with_named_field(tmp_path):
    bad = [(["--teachers", "oracle"], "teachers: 'oracle' must be one of"),
           (["--teachers", "exp3s", "exp3s"], "without repeats"),
           (["--signal", "vcg"], "signal='vcg' must be one of"),
           (["--epsilon", "1.5"], r"epsilon=1.5 must be in \[0, 1\]"),
           (["--eta", "0"], "eta=0.0 must be > 0"),
           (["--beta", "-0.1"], "beta=-0.1 must be >= 0"),
           (["--l2-coef", "-1"], "--l2-coef must be >= 0"),
           (["--eval-every", "50", "--total-steps", "10"], "eval_every=50 must be <= total_steps"),
           (["--quantile-lo", "0.9"], "quantile_lo < quantile_hi"),
           (["--max-length", "1", "--max-repeats", "1"], "must be >= 2"),
           (["--history-size", "0"], "--history-size must be >= 1"),
           (["--lr", "-1"], "--lr must be > 0")]
    for args, msg in bad:
        with pytest.raises(ValueError, match=msg):
            g.main(args + ["--run-dir", str(tmp_path / "x")])


# --- one compiled run of the CLI: Exp3.S, uniform, target-only and the broken teacher

SEEDS = 3
CHUNK = 100  # updates per compiled chunk; the purity rerun runs one chunk of the same program
ARGS = cli_args(TINY, g.Config()) + ["--num-seeds", str(SEEDS), "--log-every", str(CHUNK),
                                      "--no-progress"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return g.main(ARGS + ["--run-dir", str(tmp_path_factory.mktemp("graves"))])


def test_exp3s_moves_mass_to_where_the_student_progresses(tiny_run):
    """Behaviour ([1] Sec. 5) in seconds: 3 x 2 repeat-copy tasks, LSTM 16, 300 steps, PG
    per time step, 3 seeds, four students from the same initialisation in one program. The
    target task (3, 2) gives the most progress per step, so Exp3.S drills it. Measured
    (2-core CPU, jax 0.10.2), per seed:
        p(target task), steps 150-300     exp3s 0.38 0.33 0.34   uniform 1/6   anti 0.04 0.03 0.04
        target-loss auc (nats / sequence) exp3s 14.4 14.4 16.9   uniform 15.7 15.4 17.5
                                          target-only 10.6 11.8 12.7       anti 17.6 17.2 19.1
    The broken teacher fails the first and last asserts. Mutations of `update` that fail
    the first assert (tried): importance weight removed (exp3s p 0.21 0.22 0.21), the
    reward's sign flipped in `teacher_step` (0.04 0.04 0.04), zero reward (1/6)."""
    h, f = tiny_run.history, tiny_run.final
    half = TINY.total_steps // 2
    p = {t: h[f"charts/p_target_{t}"][:, half:].mean(1) for t in TINY.teachers}
    auc = {t: f[f"target_auc_{t}"] for t in TINY.teachers}
    print("p_target", p, "auc", auc)
    assert p["exp3s"].min() > 0.25 > 1 / 6 > 0.1 > p["anti"].max(), p
    np.testing.assert_allclose(p["uniform"], 1 / 6, rtol=1e-5)
    np.testing.assert_allclose(p["target"], 1.0)
    assert (auc["exp3s"] < auc["anti"]).all(), auc


def test_weights_stay_finite_and_the_fresh_batch_is_independent(tiny_run):
    """Every teacher's Exp3.S weights are finite after the tiny run (the target-only
    teacher's one-hot pi gave 0/0 = NaN before the fix: tried, fails), and the baselines'
    stay 0. Through learner_step from the run's final state: SPG draws x' from the same task
    as x, so with an independent key its progress differs from PG's on x; drawing x' with
    x's key k_x makes x' = x and SPG = PG (tried, fails)."""
    w = np.asarray(tiny_run.state.learners.w)  # [seeds, teachers, N]
    assert np.isfinite(w).all(), w
    for t in ("uniform", "target"):
        np.testing.assert_array_equal(w[:, TINY.teachers.index(t)], 0.0)
    state = jax.tree.map(lambda v: v[0], tiny_run.state)
    ln = jax.tree.map(lambda v: v[0], state.learners)

    @jax.jit
    def both(key):
        return [g.learner_step(ln, EXP3S, key, state.step, state,
                               dataclasses.replace(TINY, signal=s))[1]["progress"]
                for s in ("pg", "spg")]

    pg, spg = both(jax.random.PRNGKey(5))
    print("progress pg", pg, "spg", spg)
    assert abs(float(pg) - float(spg)) > 1e-4 * (abs(float(pg)) + 1e-3), (pg, spg)


def test_plot_curriculum_writes_a_png(tiny_run, tmp_path):
    out = g.plot_curriculum(tiny_run.run_dir, tmp_path / "curriculum.png")
    assert (tmp_path / "curriculum.png").stat().st_size > 1000, out


def test_train_is_pure_and_cli_writes_its_files(tiny_run, tmp_path, capsys):
    """The same keys give bit-identical results a second time; seeds differ; the policy
    sums to 1 over lengths and over repeats; the run wrote its files; `--help` documents
    every field."""
    with pytest.raises(SystemExit):
        g.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(g.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out
    assert (tiny_run.run_dir / "metrics.jsonl").exists()
    h = tiny_run.history
    assert h["losses/student_exp3s"].shape == (SEEDS, TINY.total_steps)
    assert not np.array_equal(h["losses/student_exp3s"][0], h["losses/student_exp3s"][1])
    p_len = sum(h[f"charts/p_length{i + 1}"] for i in range(TINY.max_length))
    p_rep = sum(h[f"charts/p_repeats{i + 1}"] for i in range(TINY.max_repeats))
    np.testing.assert_allclose(p_len, 1.0, rtol=1e-5)
    np.testing.assert_allclose(p_rep, 1.0, rtol=1e-5)
    np.testing.assert_array_equal(tiny_run.state.step, [TINY.total_steps] * SEEDS)
    again = g.main(ARGS + ["--num-updates", str(CHUNK), "--run-dir", str(tmp_path)])
    for k in ("losses/student_exp3s", "charts/target_loss_uniform", "charts/reward"):
        np.testing.assert_array_equal(h[k][:, :CHUNK], again.history[k])


def test_every_config_field_is_read():
    """No flag that lies: each Config field is read by code that runs (AST, not text)."""
    assert unread_fields(g) == []


def test_paper_preset_traces():
    """jax.eval_shape of init and one update under the `paper` preset (13 x 13 repeat-copy
    tasks, 8 bits, LSTM 512, batch 32): nothing runs; bfloat16 traces too."""
    cfg, state, (after, metrics) = trace_paper(g)
    assert cfg.num_tasks == 169 and cfg.seq_len == 184
    assert state.learners.w.shape == (3, 169)
    assert state.learners.params["params"]["wh"].shape == (3, 512, 2048)
    assert state.eval_batch[0].shape == (169 * 8, 184, 10)
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
    assert "charts/p_length13" in metrics and "charts/target_loss_target" in metrics
    bf16 = dataclasses.replace(cfg, dtype="bfloat16")
    jax.eval_shape(lambda s: g.update(s, bf16), state)
