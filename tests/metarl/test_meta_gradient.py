"""Tests of metarl/meta_gradient.py: the lambda-return against its n-step mixture, the
actor-critic loss by hand, the meta-gradient through one TD(lambda) update of a linear value
on the 19-state random walk against its hand derivation, the meta-gradient of a 2-action
control case (MLP, eta embedding) against finite differences and its acting policy against
a replay, the direction gamma moves (and the sign-flipped variant, the other way), purity,
CLI, paper preset.

Mutations tried (each made its test fail, then was taken out): lambda and 1 - lambda swapped
in the recursion (lambda-return test); targets not stop-gradiented in theta (loss by hand);
gamma, lambda stop-gradiented in f, the eta step's sign flipped, J' with eta instead of
eta_bar, J' on the training batch tau instead of tau' (meta-gradient by hand); eta mask
ignored (behaviour: the fixed arm moves); in the control case, J' conditioned on eta_k
instead of eta_bar (update -3.08 / -3.12 against finite differences -3.94 / -3.89), the
rollout acting with theta_{k-1} instead of theta_k (actions differ from the replay) and
stop_gradient on the conditioning eta in f (update -2.46 / -2.32); init ignoring its key
(purity: seeds equal); rms_eps, or meta_vf_coef, not read (Config fields); paper preset
meta_batch 64 (paper trace); the rms_decay and cnn-on-random-walk checks removed (bad
values); plot not saved (plot)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import run
from metarl import meta_gradient as mg
from tests.common.cli import cli_args
from tests.common.compiled import compiled, main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# ONE tiny configuration for the whole module: the 19-state random walk (prediction), a
# linear value on one-hot states, TD(lambda) by SGD, gamma and lambda from 0.5, eta_bar =
# (0.99, 1); 400 batches of 16 x 20 steps.
TINY = mg.Config(
    env_id="RandomWalk-19",
    torso="linear",
    embed_dim=0,
    optimizer="sgd",
    lr=0.008,
    anneal_lr=False,
    max_grad_norm=1000.0,
    num_envs=16,
    num_steps=20,
    meta_batch=8,
    gamma_init=0.5,
    lambda_init=0.5,
    gamma_ref=0.99,
    lambda_ref=1.0,
    meta_lr=0.05,
    total_timesteps=16 * 20 * 400,
)


def test_lambda_return_is_the_mixture_of_n_step_returns():
    """[1] Eq. (6)-(7) on a 5-step trajectory with an episode end at t = 2 (gamma_t = 0
    there): the recursion equals (1 - lambda) sum_n lambda^{n-1} G^(n) with the remaining
    weight lambda^{T-t-1} on the longest return G^(T-t), which bootstraps on v(S_T)."""
    rng = np.random.default_rng(0)
    t_len, gamma, lam = 5, 0.9, 0.7
    r, v = rng.normal(size=t_len), rng.normal(size=t_len)
    boot = 0.3
    disc = gamma * np.array([1.0, 1.0, 0.0, 1.0, 1.0])
    v_next = np.append(v[1:], boot)

    def n_step(t, n):
        g, scale = 0.0, 1.0
        for k in range(n):
            g += scale * r[t + k]
            scale *= disc[t + k]
        return g + scale * v_next[t + n - 1]

    want = [
        sum((1 - lam) * lam ** (n - 1) * n_step(t, n) for n in range(1, t_len - t))
        + lam ** (t_len - t - 1) * n_step(t, t_len - t)
        for t in range(t_len)
    ]
    got, one = compiled(
        lambda r, d, v: [
            mg.lambda_returns(r, d, v, jnp.array([boot]), x)[:, 0] for x in (lam, 0.0)
        ],
        *(jnp.asarray(x, jnp.float32)[:, None] for x in (r, disc, v)),
    )
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(one, r + disc * v_next, atol=1e-6)  # lambda = 0: TD(0)


class Stub:
    """net.apply(params, obs, cond) -> (logits, v): logits = params["l"] (every step), v =
    params["w"] obs + cond[0] (the conditioning enters the value)."""

    @staticmethod
    def apply(params, obs, cond):
        logits = jnp.broadcast_to(params["l"], obs.shape + (2,))
        return logits, params["w"] * obs + cond[0]


def test_actor_critic_loss_by_hand():
    """One env, 2 steps: obs (1, 2), actions (0, 1), rewards (1, 0), no episode end, last obs
    0, w = 0.5, cond = (0.1, *), pi = (0.25, 0.75), gamma = 0.9, lambda = 0.5:
    v = (0.6, 1.1), v(S_T) = 0.1; G_1 = 0 + 0.9 (0.5 * 0.1 + 0.5 * 0.1) = 0.09,
    G_0 = 1 + 0.9 (0.5 * 1.1 + 0.5 * 0.09) = 1.5355; A = (0.9355, -1.01);
    pg = -(0.9355 log 0.25 - 1.01 log 0.75); value = 1/2 (0.9355^2 + 1.01^2) (sums, as [2]);
    H = 2 * 0.5623. The policy gradient treats A as a constant in theta (dpg/dw = 0 with
    vf_coef 0), yet the loss still moves with the conditioning (through the targets)."""
    params = {"l": jnp.log(jnp.array([0.25, 0.75])), "w": jnp.array(0.5)}
    traj = dict(
        obs=jnp.array([[1.0], [2.0]]),
        action=jnp.array([[0], [1]]),
        reward=jnp.array([[1.0], [0.0]]),
        done=jnp.zeros((2, 1)),
    )
    cond = jnp.array([0.1, 0.0])

    def everything(params, traj, cond):  # one compiled program
        loss = lambda p, c, vf, ent: mg.actor_critic_loss(
            p, Stub, traj, jnp.array([0.0]), 0.9, 0.5, c, vf, ent
        )
        return (
            loss(params, cond, 0.5, 0.01),
            jax.grad(lambda p: loss(p, cond, 0.0, 0.0)[0])(params),
            jax.grad(lambda c: loss(params, c, 0.5, 0.01)[0])(cond),
        )

    (loss, m), g, d_cond = compiled(everything, params, traj, cond)
    a = np.array([0.9355, -1.01])
    pg = -(a[0] * np.log(0.25) + a[1] * np.log(0.75))
    value = 0.5 * (a**2).sum()
    ent = -2 * (0.25 * np.log(0.25) + 0.75 * np.log(0.75))
    np.testing.assert_allclose(loss, pg + 0.5 * value - 0.01 * ent, rtol=1e-5)
    np.testing.assert_allclose(
        [m["losses/policy"], m["losses/entropy"]], [pg / 2, ent / 2], rtol=1e-5
    )
    assert g["w"] == 0.0  # the advantage is a constant in theta
    np.testing.assert_allclose(
        g["l"],
        -(a[0] * (np.array([1, 0]) - [0.25, 0.75]) + a[1] * (np.array([0, 1]) - [0.25, 0.75])),
        rtol=1e-5,
    )
    assert abs(d_cond[0]) > 0.1


def _lambda_return_and_grads(r, disc_mask, v, boot, gamma, lam):
    """numpy [T, N]: G, dG/dgamma, dG/dlambda of the recursion, by hand."""
    g, dg, dl = boot.copy(), np.zeros_like(boot), np.zeros_like(boot)
    out = np.zeros((3,) + r.shape)
    v_next = np.concatenate([v[1:], boot[None]], 0)
    for t in reversed(range(r.shape[0])):
        m = disc_mask[t]
        mix = (1 - lam) * v_next[t] + lam * g
        dg = m * mix + gamma * m * lam * dg
        dl = gamma * m * (g - v_next[t] + lam * dl)
        g = r[t] + gamma * m * mix
        out[:, t] = g, dg, dl
    return out


def test_meta_gradient_through_one_td_lambda_update_by_hand():
    """The exact case of [1] Sec. 1.2 on the random walk, through two calls of `update`:
    v_theta(s) = w' phi(s) + b (phi one-hot, x = (phi, 1)), inner SGD on c/2 sum (G_eta - v)^2
    (semi-gradient), so
        theta' = theta + alpha c sum_t (G_t - v_t) x_t,
        d theta'/d eta_g = alpha c sum_t dG_t/d gamma x_t * gamma (1 - gamma)   (sigmoid),
        dJ'/d theta' = -c sum_t' (G'_t - v'_t) x'_t  over tau' (the first 8 of 16 envs),
    and the meta-gradient is their product; dG/d gamma and dG/d lambda by the recursion
    differentiated by hand. `update` must give theta', this meta-gradient for gamma and
    lambda, and a first Adam step of -beta sign(meta-gradient) on eta."""
    cfg = TINY
    state0 = compiled(lambda k: mg.init(k, cfg), jax.random.PRNGKey(3))
    step = jax.jit(lambda s: mg.update(s, cfg)).lower(state0).compile(run.INIT_COMPILER_OPTIONS)
    s1, _ = step(state0)
    s2, metrics = step(s1)
    s1, s2, metrics = jax.device_get((s1, s2, metrics))
    p = s1.params["params"]["Dense_1"]  # the value head (Dense_0 is the 1-action policy)
    w, b = np.float64(p["kernel"][:, 0]), np.float64(p["bias"][0])
    gamma, lam = 1 / (1 + np.exp(-np.float64(s1.eta)))
    alpha, c = cfg.lr, cfg.vf_coef

    def value(w, b, obs):
        return obs @ w + b

    tau = s1.prev
    v0 = value(w, b, tau["obs"])
    g0, dg0, dl0 = _lambda_return_and_grads(
        tau["reward"], 1 - tau["done"], v0, value(w, b, tau["last_obs"]), gamma, lam
    )
    err = g0 - v0
    w1, b1 = w + alpha * c * np.einsum("tn,tns->s", err, tau["obs"]), b + alpha * c * err.sum()
    q = s2.params["params"]["Dense_1"]
    np.testing.assert_allclose(q["kernel"][:, 0], w1, atol=1e-5)
    np.testing.assert_allclose(q["bias"][0], b1, atol=1e-5)
    grad_norm = c * np.sqrt((np.einsum("tn,tns->s", err, tau["obs"]) ** 2).sum() + err.sum() ** 2)
    assert grad_norm < cfg.max_grad_norm  # no clipping in this case

    val = {k: s2.prev[k][:, :8] for k in ("obs", "reward", "done")}
    v1 = value(w1, b1, val["obs"])
    g1, _, _ = _lambda_return_and_grads(
        val["reward"], 1 - val["done"], v1, value(w1, b1, s2.prev["last_obs"][:8]), 0.99, 1.0
    )
    dj_w = -c * np.einsum("tn,tns->s", g1 - v1, val["obs"])
    dj_b = -c * (g1 - v1).sum()
    want = []
    for dg, dsig in ((dg0, gamma * (1 - gamma)), (dl0, lam * (1 - lam))):
        df_w = alpha * c * np.einsum("tn,tns->s", dg, tau["obs"])
        df_b = alpha * c * dg.sum()
        want.append((dj_w @ df_w + dj_b * df_b) * dsig)
    got = [metrics["meta/grad_gamma"], metrics["meta/grad_lambda"]]
    print("meta-gradient (gamma, lambda): ours", got, "by hand", want)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-7)
    assert min(abs(x) for x in want) > 1e-5
    np.testing.assert_allclose(s2.eta - s1.eta, -cfg.meta_lr * np.sign(want), rtol=1e-3)


# A control case for the terms TINY leaves out (one action, no eta embedding): CartPole, an
# MLP torso, eta embedded in 4 units, RMSProp, and (gamma, lambda) = (0.5, 0.5) far from
# eta_bar = (0.99, 1) so that conditioning on one or the other differs.
CONTROL = dataclasses.replace(
    TINY,
    env_id="CartPole-v1",
    torso="mlp",
    hidden=16,
    embed_dim=4,
    optimizer="rmsprop",
    lr=0.01,
    num_envs=8,
    num_steps=10,
    meta_batch=4,
    total_timesteps=8 * 10 * 10,
)


def test_control_meta_gradient_against_finite_differences_and_acting_policy():
    """Two calls of `update` on CONTROL, then, written out again from `inner_update` and
    `actor_critic_loss` called by hand: theta'(eta), the inner step on tau from
    theta_{k-1} with the network conditioned on eta, by central finite differences in
    eta_gamma and eta_lambda (eps 1e-2, float32), times dJ'(tau', theta', eta_bar)/d theta'
    (the semi-gradient `update` uses: targets constant in theta', network conditioned on
    eta_bar), must give `update`'s meta-gradient; and the actions of tau' must be those of a
    replay of the rollout with theta_k (= s2.params), conditioned on eta_k, on the same key.
    (Finite differences of the loss J' itself would include the targets' derivative: they
    gave -2.51 / -2.46 against the semi-gradient's -3.94 / -3.89.)"""
    from common.rl import rollout

    cfg = CONTROL
    env = mg.make_env(cfg)
    net = mg.network(cfg, env)
    state0 = compiled(lambda k: mg.init(k, cfg), jax.random.PRNGKey(1))
    step = jax.jit(lambda s: mg.update(s, cfg)).lower(state0).compile(run.INIT_COMPILER_OPTIONS)
    s1, _ = step(state0)
    s2, metrics = step(s1)
    eps = 1e-2

    def check(s1, s2):
        shifts = eps * jnp.array([[1.0, 0], [-1, 0], [0, 1], [0, -1]])
        thetas = jax.vmap(
            lambda d: mg.inner_update(s1.eta + d, s1.params, s1.opt_state, s1.prev, net, cfg)[0]
        )(shifts)
        ref = jnp.array([cfg.gamma_ref, cfg.lambda_ref])
        val = jax.tree.map(lambda x: x[:, : cfg.meta_batch], s2.prev)
        val["last_obs"] = s2.prev["last_obs"][: cfg.meta_batch]
        dj = jax.grad(
            lambda p: mg.actor_critic_loss(
                p,
                net,
                val,
                val["last_obs"],
                ref[0],
                ref[1],
                ref,
                cfg.meta_vf_coef,
                cfg.meta_ent_coef,
            )[0]
        )(s2.params)
        dot = lambda a, b: sum(
            jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        )
        dtheta = lambda i, k: jax.tree.map(lambda t: (t[i] - t[k]) / (2 * eps), thetas)
        fd = jnp.array([dot(dj, dtheta(0, 1)), dot(dj, dtheta(2, 3))])

        cond = mg.eta_values(s1.eta)
        act = lambda obs, k: (jax.random.categorical(k, net.apply(s2.params, obs, cond)[0]), {})
        _, traj = rollout(
            env, act, s1.env_state, s1.obs, jax.random.split(s1.key)[1], cfg.num_steps
        )
        return fd, traj["action"]

    fd, replay = jax.device_get(compiled(check, s1, s2))
    got = np.array([metrics["meta/grad_gamma"], metrics["meta/grad_lambda"]])
    print("meta-gradient (gamma, lambda): update", got, "finite differences", fd)
    np.testing.assert_allclose(got, fd, rtol=1e-3)
    assert np.abs(fd).min() > 1e-2
    acted = np.asarray(s2.prev["action"])
    np.testing.assert_array_equal(acted, replay)
    assert 0 < acted.mean() < 1  # both actions taken


def test_bad_values_fail_with_named_field(tmp_path):
    """Each bad value on top of TINY (so that a check taken out would train TINY, not the
    paper preset) fails before compiling, naming the field."""
    bad = [
        (["--torso", "resnet"], "torso='resnet'"),
        (["--torso", "cnn"], "torso='cnn' needs image observations"),
        (["--meta-params", "alpha"], "meta_params"),
        (["--gamma-init", "1.0"], r"--gamma-init must be in \(0, 1\)"),
        (["--meta-batch", "64"], "meta_batch=64 exceeds num_envs=16"),
        (["--meta-lr", "0"], "--meta-lr must be > 0"),
        (["--dtype", "fp8"], "dtype='fp8'"),
        (["--rms-decay", "1.0"], r"--rms-decay must be in \[0, 1\)"),
    ]
    for args, msg in bad:
        with pytest.raises(ValueError, match=msg):
            mg.main(cli_args(TINY, mg.Config()) + args + ["--run-dir", str(tmp_path)])


SEEDS = 2
ARMS = {"meta": (1.0, 1.0), "fixed": (0.0, 0.0), "sign_flipped": (-1.0, -1.0)}
RUN_ARGS = cli_args(TINY, mg.Config()) + [
    "--num-seeds",
    str(len(ARMS) * SEEDS),
    "--log-every",
    str(TINY.num_updates),
    "--no-progress",
    "--fast-compile",
]


def _run(run_dir):
    """TINY through `mg.main`, 3 x SEEDS seeds in ONE compiled program: seeds 0, 1 learn
    (gamma, lambda) by the meta-gradient, 2, 3 keep them fixed (the baseline), 4, 5 step
    along +dJ'/d eta (the sign-flipped variant); each arm on the keys of seeds 0, 1."""
    keys = jax.random.split(jax.random.PRNGKey(0), len(ARMS) * SEEDS)  # the runner's keys
    masks = jnp.repeat(jnp.array(list(ARMS.values())), SEEDS, 0)
    real = mg.init

    def init(key, cfg):
        i = jnp.argmax(jnp.all(key == keys, -1))
        return real(keys[i % SEEDS], cfg).replace(eta_mask=masks[i])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mg, "init", init)
        return main_recording_chunks(mg.main, RUN_ARGS + ["--run-dir", str(run_dir)])


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """(the run, its compiled chunks with their recorded inputs)"""
    return _run(tmp_path_factory.mktemp("meta_gradient"))


@pytest.fixture(scope="module")
def tiny_run(recorded):
    return recorded[0]


def test_gamma_rises_toward_the_reference_and_the_flipped_sign_falls(tiny_run):
    """Directional and behaviour test ([1] Sec. 1.2, prediction): from gamma = lambda = 0.5
    with eta_bar = (0.99, 1), 400 batches, 2 seeds per arm. Measured (CPU, jax 0.10.2):
                    final gamma    mean gamma, first -> last quarter   RMS error of v vs v^0.99
        meta-grad   0.944 0.984    0.538 -> 0.908, 0.554 -> 0.982     0.267 0.085
        fixed       0.5   0.5      0.5 -> 0.5                         0.380 0.378
        flipped     0.135 0.051    0.445 -> 0.151, 0.441 -> 0.056     0.406 0.409
    The meta-gradient moves gamma up (a short discount makes the TD targets miss the
    far-sighted validation returns) and the value error falls below the fixed-gamma
    baseline's; the same gradient with its sign flipped drives gamma down."""
    f, h = tiny_run.final, tiny_run.history["meta/gamma"]
    n = h.shape[1] // 4
    first, last = h[:, :n].mean(1), h[:, -n:].mean(1)
    print(
        "final gamma",
        f["final_gamma"],
        "first/last quarter",
        first,
        last,
        "value rmse",
        f["value_rmse"],
    )
    meta, fixed, flipped = (slice(i * SEEDS, (i + 1) * SEEDS) for i in range(3))
    assert (f["final_gamma"][meta] > 0.8).all() and (last[meta] > first[meta] + 0.2).all()
    np.testing.assert_array_equal(h[fixed], 0.5)
    assert (f["final_gamma"][flipped] < 0.3).all() and (last[flipped] < first[flipped] - 0.1).all()
    assert f["value_rmse"][meta].max() < f["value_rmse"][fixed].min(), f["value_rmse"]
    assert f["value_rmse"][fixed].max() < f["value_rmse"][flipped].min() + 0.05


def test_train_is_pure_and_cli_writes_its_files(recorded, capsys):
    """The runner's compiled chunk (the whole run) again on its recorded input: bit-identical
    params and metrics (no tracing, no compiling); seeds differ; the run wrote its files;
    --help documents every field."""
    tiny_run, chunks = recorded
    with pytest.raises(SystemExit):
        mg.main(["--help"])
    out = capsys.readouterr().out
    for fld in dataclasses.fields(mg.Config):
        assert "--" + fld.name.replace("_", "-") in out, fld.name
    assert (tiny_run.run_dir / "metrics.jsonl").exists()
    h = tiny_run.history["losses/value"]
    assert h.shape == (len(ARMS) * SEEDS, TINY.num_updates) and np.isfinite(h).all()
    assert not np.array_equal(h[0], h[1])
    assert len(chunks) == 1
    state, metrics = jax.device_get(chunks[0][0](chunks[0][1]))
    jax.tree.map(np.testing.assert_array_equal, tiny_run.state.params, state.params)
    np.testing.assert_array_equal(tiny_run.history["meta/gamma"], metrics["meta/gamma"])


def test_every_config_field_is_read():
    assert unread_fields(mg) == []


def test_paper_preset_traces():
    """jax.eval_shape of init and one update under `paper` (MinAtar Breakout, conv torso,
    32 x 20 steps, eta embedding 16): builds its env, shapes and state without running."""
    cfg, state, (after, metrics) = trace_paper(mg)
    assert state.obs.shape == (32, 10, 10, 4) and state.prev["obs"].shape == (20, 32, 10, 10, 4)
    assert state.params["params"]["Dense_1"]["kernel"].shape == (2, 16)  # e_eta = W (gamma, lambda)
    assert cfg.num_updates == 50_000_000 // 640
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))


def test_plot_writes_the_trajectories(tiny_run, tmp_path):
    out = mg.plot_run(
        tiny_run.history,
        str(tmp_path / "a.png"),
        ("fixed", tiny_run.history["charts/episodic_return"]),
    )
    assert (tmp_path / "a.png").stat().st_size > 1000 and out.endswith("a.png")
