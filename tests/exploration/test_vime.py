"""Tests of exploration/vime.py: the BNN's KLs, Hessian and likelihood by hand, the
closed-form one-step KL ([1] Eq. 16-17) against an explicit update, the median
normaliser and the replay pool, the first iterations' normaliser and `reward` on a
hand-built state against Eq. 17 by hand, the information gain on unseen vs seen
transitions, behaviour against PPO without the bonus, purity, CLI and the paper trace."""

import dataclasses
import types

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from common import envs
from exploration import vime
from tests.common.compiled import compiled, main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

QUICK = vime.Config(**vime.PRESETS["quick"])
SIZES = (3, 4, 2)  # a tiny BNN: 3 inputs, 4 hidden, 2 outputs


def _tiny():
    """A tiny BNN with its rhos spread, so the Hessian's rho entries differ."""
    phi = vime.bnn_init(jax.random.PRNGKey(0), SIZES, 0.5)
    return [
        dict(
            layer,
            rho=layer["rho"]
            + 0.3 * jax.random.normal(jax.random.PRNGKey(i + 7), layer["rho"].shape),
        )
        for i, layer in enumerate(phi)
    ]


CLOSED = dataclasses.replace(QUICK, num_samples=3, step_lambda=0.01)
XS = (
    jax.random.normal(jax.random.PRNGKey(3), (5, 3)),
    jax.random.normal(jax.random.PRNGKey(4), (5, 2)),
)


@pytest.fixture(scope="module")
def maths():
    """The equation tests' values in ONE compiled program: the tiny BNN; the KLs and the
    likelihood by hand; the autodiff Hessian of the KL and the file's inverse_hessian;
    information_gain on 5 transitions with the per-transition gradients (same noise), and
    in bfloat16 (a smoke check of --dtype)."""
    x1, y1 = jnp.array([[0.5, -1.0, 2.0]]), jnp.array([[1.0, -2.0]])

    def go():
        phi = _tiny()
        rho = vime.softplus_inv(0.5)
        at_prior = [
            dict(
                mu=layer["mu"] * 0,
                b_mu=layer["b_mu"] * 0,
                rho=layer["rho"] * 0 + rho,
                b_rho=layer["b_rho"] * 0 + rho,
            )
            for layer in phi
        ]
        moved = [dict(at_prior[0], mu=at_prior[0]["mu"].at[0, 0].set(1.0)), at_prior[1]]
        sharp = [
            dict(layer, rho=layer["rho"] * 0 - 30.0, b_rho=layer["b_rho"] * 0 - 30.0)
            for layer in phi
        ]
        values = (
            vime.gaussian_kl(1.0, 1.0, 0.0, 2.0),
            vime.kl_q_prior(at_prior, 0.5),
            vime.kl_q_prior(moved, 0.5),
            vime.bnn_apply(sharp, x1, jax.random.PRNGKey(1)),
            vime.log_likelihood(sharp, x1, y1, jax.random.PRNGKey(2), 3, 5.0),
        )
        flat, unravel = jax.flatten_util.ravel_pytree(phi)
        hess = jax.hessian(lambda w: vime.kl_q_q(unravel(w), phi))(flat)
        inv = jax.flatten_util.ravel_pytree(vime.inverse_hessian(phi))[0]
        one = vime.inverse_hessian(
            [dict(mu=jnp.zeros(1), rho=jnp.full(1, 0.3), b_mu=jnp.zeros(1), b_rho=jnp.full(1, 0.3))]
        )[0]
        x, y = XS
        key = jax.random.PRNGKey(5)
        nll = lambda p, xi, yi, k: -vime.log_likelihood(p, xi[None], yi[None], k, 3, 5.0)
        closed = vime.information_gain(phi, x, y, key, CLOSED)
        bf16 = vime.information_gain(phi, x, y, key, dataclasses.replace(CLOSED, dtype="bfloat16"))
        grads = jax.vmap(jax.grad(nll), (None, 0, 0, 0))(phi, x, y, jax.random.split(key, 5))
        return dict(
            phi=phi, values=values, hess=hess, inv=inv, one=one, closed=closed, g=grads, bf16=bf16
        )

    return jax.device_get(compiled(go))


def test_gaussian_kl_prior_kl_and_likelihood_by_hand(maths):
    """KL[N(1, 1) || N(0, 2^2)] = log 2 + (1 + 1) / 8 - 1/2 = 0.4431; q at the prior
    (mu 0, sigma 0.5) has KL 0 to it, and moving one weight's mu to 1 costs
    1 / (2 * 0.25) = 2. With sigma ~ 0 the BNN is deterministic: relu(x W1 + b1) W2 + b2,
    and the likelihood is the Gaussian log-density summed over outputs (sd 5)."""
    kl_1, kl_prior, kl_moved, out, ll = maths["values"]
    phi = maths["phi"]
    x, y = np.array([[0.5, -1.0, 2.0]]), np.array([[1.0, -2.0]])
    np.testing.assert_allclose(kl_1, np.log(2) + 0.25 - 0.5, rtol=1e-6)
    np.testing.assert_allclose(kl_prior, 0.0, atol=1e-5)
    np.testing.assert_allclose(kl_moved, 2.0, rtol=1e-5)
    h = np.maximum(x @ phi[0]["mu"] + phi[0]["b_mu"], 0)
    pred = h @ phi[1]["mu"] + phi[1]["b_mu"]
    np.testing.assert_allclose(out, pred, rtol=1e-5)
    expect = (-np.log(5.0) - 0.5 * np.log(2 * np.pi) - (y - pred) ** 2 / 50).sum()
    np.testing.assert_allclose(ll, expect, rtol=1e-5)


def test_inverse_hessian_is_the_inverse_of_the_kl_hessian_at_the_origin(maths):
    """[1] Eq. 16: the Hessian of phi' -> KL[q_phi' || q_phi] at phi' = phi (autodiff of the
    file's kl_q_q) is diagonal, and its diagonal is 1 / inverse_hessian: 1/sigma^2 for mu,
    2 sigmoid(rho)^2 / sigma^2 for rho. By hand for rho = 0.3: sigma = log(1 + e^0.3) =
    0.85436, sigmoid = 0.57444, H^-1 = 0.72993 / (2 * 0.32998) = 1.10603."""
    hess, inv, one = maths["hess"], maths["inv"], maths["one"]
    np.testing.assert_allclose(np.diag(hess), 1 / inv, rtol=1e-4)
    np.testing.assert_allclose(hess - np.diag(np.diag(hess)), 0.0, atol=1e-5)
    np.testing.assert_allclose(one["rho"], [1.10603], rtol=1e-4)
    np.testing.assert_allclose(one["mu"], [np.log1p(np.exp(0.3)) ** 2], rtol=1e-6)


def test_closed_form_kl_equals_the_kl_of_an_explicit_one_step_update(maths):
    """[1] Eq. 17 through the function `update` runs (information_gain): for each of 5
    transitions, the explicit second-order step phi' = phi - lambda H^-1 grad (grad of
    -log p(s' | s, a) with the same noise) and the exact KL[q_phi' || q_phi] between the
    factorised Gaussians agree with 1/2 lambda^2 grad^T H^-1 grad to 2% at lambda = 0.01
    (measured: within 0.1%). Without the 1/2 (the released code's form) the ratio is 2."""
    closed, g = maths["closed"], maths["g"]
    sp = lambda r: np.logaddexp(0.0, r)  # softplus, float64
    exact = np.zeros(5)
    for layer, gl in zip(maths["phi"], g, strict=True):
        for m, r in (("mu", "rho"), ("b_mu", "b_rho")):
            mu, rho = np.float64(layer[m]), np.float64(layer[r])
            sd, sig = sp(rho), 1 / (1 + np.exp(-rho))
            mu_new = mu - CLOSED.step_lambda * sd**2 * gl[m]  # H^-1 of [1] Eq. 16
            sd_new = sp(rho - CLOSED.step_lambda * sd**2 / (2 * sig**2) * gl[r])
            kl = np.log(sd / sd_new) + (sd_new**2 + (mu_new - mu) ** 2) / (2 * sd**2) - 0.5
            exact += kl.reshape(5, -1).sum(1)
    print("closed / exact", np.asarray(closed) / exact, "bf16 / f32", maths["bf16"] / closed)
    assert (exact > 0).all()
    np.testing.assert_allclose(closed, exact, rtol=0.02)
    np.testing.assert_allclose(maths["bf16"], closed, rtol=0.05)  # measured < 1%


def test_median_normaliser_and_replay_pool_by_hand():
    """The released use_kl_ratio_q: KLs [1, 2, 9, (invalid) 100] have median 2; a queue
    holding one earlier median 4 then means (2 + 4) / 2 = 3, so the KLs become /3. The
    pool writes only valid rows, wraps around its capacity and keeps its size at most
    the capacity."""
    kl = jnp.array([1.0, 2.0, 9.0, 100.0])
    valid = jnp.array([True, True, True, False])
    r, queue, count = jax.jit(vime.median_normalise)(kl, valid, jnp.array([4.0, 0.0, 0.0]), 1)
    np.testing.assert_allclose(queue, [2.0, 4.0, 0.0])
    assert int(count) == 2
    np.testing.assert_allclose(r[:3], [1 / 3, 2 / 3, 3.0], rtol=1e-6)
    pool = dict(x=jnp.zeros((3, 1)), y=jnp.zeros((3, 1)), top=jnp.array(2), size=jnp.array(2))
    v = jnp.array([[1.0], [2.0], [3.0]])
    pool = jax.jit(vime.pool_add)(pool, v, -v, jnp.array([True, False, True]))
    np.testing.assert_allclose(pool["x"][:, 0], [3.0, 0.0, 1.0])
    np.testing.assert_allclose(pool["y"][:, 0], [-3.0, 0.0, -1.0])
    assert int(pool["top"]) == 1 and int(pool["size"]) == 3


# A hand-built rollout for the reward-level tests: T = 3 steps x N = 4 envs (T != N, so a
# transposed reshape shows), 2-d observations, 3 discrete actions, two episode ends.
T, N = 3, 4
ENV = types.SimpleNamespace(observation_shape=(2,), num_actions=3)
SMALL = dataclasses.replace(
    QUICK,
    num_envs=N,
    num_steps=T,
    num_samples=3,
    bnn_updates=3,
    bnn_batch_size=4,
    pool_size=32,
    min_pool_size=1,
    kl_queue=4,
    step_lambda=3.0,
)
FILLED = 10  # pool rows holding transitions; rows FILLED.. hold junk the BNN must not see


def _batch(key):
    k_o, k_n, k_a = jax.random.split(key, 3)
    done = jnp.zeros((T, N), bool).at[1, 2].set(True).at[2, 0].set(True)
    return dict(
        obs=jax.random.normal(k_o, (T, N, 2)),
        next_obs=2.0 * jax.random.normal(k_n, (T, N, 2)) + 1.0,
        action=jax.random.randint(k_a, (T, N), 0, 3),
        done=done,
    )


@pytest.fixture(scope="module")
def rewards():
    """One compiled program: (a) `reward` twice on one batch from the bonus's init (a
    scan); (b) `reward` from a hand-built state (a pool of
    FILLED rows and junk behind them, a queue holding medians 2 and 3, eta 0.5), again with
    other junk, and with every target s' mapped to 3 s' - 4 (pool and batch), vmapped."""
    b = _batch(jax.random.PRNGKey(1))

    def go():
        bonus = vime.make_bonus(SMALL, ENV)
        _, s0 = bonus.init(jax.random.PRNGKey(2), b["obs"][0])
        s2, (r12, counts) = jax.lax.scan(
            lambda s, _: (lambda r, s: (s, (r, s["count"])))(*bonus.reward({}, s, b)), s0, None, 2
        )

        _, s = bonus.init(jax.random.PRNGKey(3), b["obs"][0])
        kx, ky = jax.random.split(jax.random.PRNGKey(4))
        rows = jnp.arange(SMALL.pool_size)[:, None] < FILLED
        pool = dict(
            x=jnp.where(rows, jax.random.normal(kx, (SMALL.pool_size, 5)) + 0.5, 50.0),
            y=jnp.where(rows, 2.0 * jax.random.normal(ky, (SMALL.pool_size, 2)), -50.0),
            top=jnp.array(FILLED),
            size=jnp.array(FILLED),
        )
        before = dict(
            s, pool=pool, queue=jnp.array([2.0, 3.0, 0.0, 0.0]), count=jnp.array(2), eta=0.5
        )
        junk = dict(before, pool=dict(pool, x=jnp.where(rows, pool["x"], -7.0)))
        affine = dict(before, pool=dict(pool, y=3.0 * pool["y"] - 4.0))
        b_affine = dict(b, next_obs=3.0 * b["next_obs"] - 4.0)
        stack = lambda *t: jax.tree.map(lambda *v: jnp.stack(v), *t)
        out = jax.vmap(lambda st, bt: bonus.reward({}, st, bt))(
            stack(before, junk, affine), stack(b, b, b_affine)
        )
        # the expected KLs: [1] Eq. 17 per transition with the phi and the pool moments of
        # BEFORE the call, clipped to [0, 1000] (the same keys as the file's draws)
        k_kl = jax.random.split(before["key"], 3)[1]
        act = jax.nn.one_hot(b["action"], 3)
        x = jnp.concatenate([b["obs"], act], -1).reshape(T * N, 5)  # [T*N, D], T-major
        y = b["next_obs"].reshape(T * N, 2)
        xm, xs = pool["x"][:FILLED].mean(0), pool["x"][:FILLED].std(0)
        ym, ys = pool["y"][:FILLED].mean(0), pool["y"][:FILLED].std(0)
        raw = jax.vmap(vime.one_step_kl, (None, 0, 0, 0, None))(
            before["phi"], (x - xm) / xs, (y - ym) / ys, jax.random.split(k_kl, T * N), SMALL
        )
        return (r12, counts), out, raw, before["phi"]

    return b, jax.device_get(compiled(go))


def test_first_iterations_median_normaliser_divides_by_the_filled_queue(rewards):
    """The released code appends a KL median only from the 2nd iteration on (itr > 0): the
    1st call of `reward` pays 0 and leaves the queue and its count alone, the 2nd divides
    by its own median only, so a constant model gives a median reward of exactly eta = 1.
    The bug of counting the 1st call (a left-over 0 in the mean) gave 2.0."""
    b, (((r1, r2), (c1, c2)), _, _, _) = rewards
    valid = ~np.asarray(b["done"])
    print("first", r1[valid], "second", r2[valid], "counts", c1, c2)
    assert (r1 == 0).all() and int(c1) == 0 and int(c2) == 1
    np.testing.assert_allclose(np.median(r2[valid]), 1.0, rtol=1e-6)


def test_reward_is_eta_times_the_normalised_kl_of_the_model_before_the_fit(rewards):
    """`reward` on a hand-built state against Eq. 17 by hand: the KL of each transition
    with the BNN and the pool's whitening moments of before the call (not after the fit or
    after adding the batch), clipped at 1000 (lambda 3 puts some KLs above it), zero on
    episode ends, divided by the mean of (this batch's median, 2, 3), times eta = 0.5, in
    the rollout's [T, N] order. The BNN fits (phi moves), draws only from the pool's filled
    rows (other junk behind them: the same phi) and whitens its targets with their own
    moments (s' -> 3 s' - 4 everywhere: the same rewards and phi)."""
    b, (_, (rs, afters), raw, phi0) = rewards
    r, r_junk, r_aff = rs
    after, after_junk, after_aff = (jax.tree.map(lambda v: v[i], afters) for i in range(3))
    valid = ~np.asarray(b["done"]).reshape(-1)
    kl = np.where(valid, np.clip(raw, 0.0, 1000.0), 0.0)
    print("raw KLs", np.round(raw, 1))
    assert (raw[valid] > 1000).any() and (raw[valid] < 1000).any()
    expect = 0.5 * kl / np.mean([np.median(kl[valid]), 2.0, 3.0])
    np.testing.assert_allclose(r, expect.reshape(T, N), rtol=1e-5)
    assert (r[np.asarray(b["done"])] == 0).all()
    assert int(after["count"]) == 3 and int(after["pool"]["size"]) == FILLED + valid.sum()
    moved = jax.tree.leaves(jax.tree.map(lambda a, c: np.abs(a - c).max(), after["phi"], phi0))
    assert min(moved) > 1e-4, moved
    jax.tree.map(np.testing.assert_array_equal, after_junk["phi"], after["phi"])
    np.testing.assert_array_equal(r_junk, r)
    np.testing.assert_allclose(r_aff, r, rtol=1e-4)
    diff = jax.tree.leaves(
        jax.tree.map(lambda a, c: np.abs(a - c).max(), after_aff["phi"], after["phi"])
    )
    print("affine targets: max phi difference", max(diff))
    assert max(diff) < 1e-5, diff


@pytest.fixture(scope="module")
def novelty():
    """The file's bonus (QUICK, 400 BNN steps) on random-policy transitions of FourRooms
    (32 envs x 64 steps): `reward` on those of the start room only (rows and columns <= 6;
    the rest marked as episode ends, so they neither enter the pool nor pay), which fills
    the pool and fits the BNN, then `reward` on all of them with the fitted BNN and with
    the untrained one (the same pool, so the same whitening), vmapped: the median reward
    elsewhere over the median reward in the room for each."""
    cfg = dataclasses.replace(QUICK, num_envs=32, num_steps=64, bnn_updates=400)
    env = envs.make("GridMaze-FourRooms", 32, max_steps=100)
    bonus = vime.make_bonus(cfg, env)

    def go(key):
        def step(c, k):
            s, obs = c
            ka, ks = jax.random.split(k)
            a = jax.random.randint(ka, (32,), 0, 4)
            nxt, s, _, done, _ = env.step(s, a, ks)
            return (s, nxt), dict(obs=obs, action=a, next_obs=nxt, done=done)

        obs, s = env.reset(key)
        _, b = jax.lax.scan(step, (s, obs), jax.random.split(key, 64))  # [T, N, ...]
        seen = (b["obs"][..., 0] * 12 <= 6) & (b["obs"][..., 1] * 12 <= 6) & ~b["done"]
        other = ~seen & ~b["done"]
        _, stats = bonus.init(key, obs)
        _, fitted = bonus.reward({}, stats, dict(b, done=~seen))
        untrained = dict(fitted, phi=stats["phi"])
        both = jax.tree.map(lambda u, f: jnp.stack([u, f]), untrained, fitted)
        r = jax.vmap(lambda st: bonus.reward({}, st, b)[0])(both)

        def med(m):
            return jnp.nanmedian(jnp.where(m, r, jnp.nan).reshape(2, -1), 1)

        return med(other) / med(seen), seen.sum(), fitted["pool"]["size"]

    return jax.device_get(compiled(go, jax.random.PRNGKey(0)))


def test_information_gain_is_larger_on_transitions_the_bnn_has_not_seen(novelty):
    """[1] Sec. 2: after the BNN's fit on the start room's transitions (through the
    bonus's `reward`), a transition elsewhere moves the posterior more than one in the
    room: median reward elsewhere over median reward in the room, measured 3.58 untrained
    and 6.25 fitted (loaded 2-core CPU). Bar: fitted > 1.5 x untrained; the broken
    variant, a BNN that never trains (bnn_updates 0), scores the untrained ratio and fails."""
    (untrained, fitted), n_seen, size = novelty
    print("untrained ratio", untrained, "fitted", fitted, "seen", n_seen, "pool", size)
    assert n_seen >= 200 and size == n_seen
    assert fitted > 1.5 * untrained, (fitted, untrained)


SEEDS = 8
RUN_ARGS = [
    "--preset",
    "quick",
    "--num-seeds",
    str(2 * SEEDS),
    "--log-every",
    "4",
    "--no-progress",
    "--fast-compile",
]


def _run(run_dir):
    """The quick preset through `vime.main`, 2 x SEEDS seeds in ONE compiled program: seeds
    SEEDS.. are the broken variant, the same PPO with the bonus off (eta = 0, a traced
    statistic of the Bonus; the BNN still trains), each on the key of its VIME twin.
    `--fast-compile` (no XLA backend optimisation) gives the same cells and saves ~15 CPU-s."""
    keys = jax.random.split(jax.random.PRNGKey(0), 2 * SEEDS)  # the runner's seed keys
    real = vime.init

    def init(key, cfg):
        i = jnp.argmax(jnp.all(key == keys, -1))
        state = real(keys[i % SEEDS], cfg)
        stats = dict(state.bonus_stats, eta=jnp.where(i >= SEEDS, 0.0, state.bonus_stats["eta"]))
        return state.replace(bonus_stats=stats)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vime, "init", init)
        return main_recording_chunks(vime.main, RUN_ARGS + ["--run-dir", str(run_dir)])


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """(the run, its compiled chunks with their recorded inputs)"""
    return _run(tmp_path_factory.mktemp("vime"))


def test_vime_explores_more_than_ppo(recorded):
    """Behaviour ([1] Sec. 3, coverage in place of the sparse-reward return) in seconds:
    FourRooms (104 floor cells, start in one corner room, the only reward in the opposite
    one), the quick preset's 8 envs x 32 steps x 8 updates = 2048 steps, 8 seeds. VIME
    (eta = 1) against the broken variant, the same PPO with the bonus off (eta = 0, same
    keys), in one compiled run of the CLI. Distinct cells visited, measured after the
    KL-queue fix (loaded 2-core CPU, jax 0.10.2; before it VIME's were 58 97 100 102 64 90
    66 58):
        VIME  58 97 102 102 62 90 66 58   median 78.0, mean 79.4
        PPO   58 95  60  93 42 71 69 55   median 64.5, mean 67.9
    Paired gaps 0 2 42 9 20 19 -3 3; the bars (+6 on median and mean) are unchanged: the
    re-measured run supports them, but they are weak (without the +42 seed the mean gap is
    7.1). The broken variant (eta = 0 in both halves) fails both asserts (gaps 0)."""
    run_ = recorded[0]
    cells = run_.history["charts/distinct_cells"][:, -1]
    on, off = cells[:SEEDS], cells[SEEDS:]
    print("VIME", on, "PPO", off)
    assert np.median(on) >= np.median(off) + 6, (on, off)
    assert on.mean() >= off.mean() + 6, (on, off)
    np.testing.assert_array_equal(run_.final["distinct_cells"], cells)


def test_train_is_pure_and_cli_writes_its_files(recorded, capsys):
    """The runner's first compiled chunk (4 of the 8 updates) again on its recorded input
    gives the second chunk's input params and its metrics bit for bit (no tracing, no
    compiling); seeds differ; eta = 0 seeds get no bonus; the BNN fits from the first
    rollout on (min_pool_size 256); `--help` documents every field."""
    run_, chunks = recorded
    with pytest.raises(SystemExit):
        vime.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(vime.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out
    assert (run_.run_dir / "metrics.jsonl").exists()
    h = run_.history
    for k in ("losses/bnn_elbo", "charts/kl", "charts/intrinsic_reward"):
        assert np.isfinite(h[k]).all() and h[k].shape == (2 * SEEDS, 8), k
    assert (h["charts/intrinsic_reward"][SEEDS:] == 0).all()  # eta = 0: no bonus
    assert (h["charts/intrinsic_reward"][:SEEDS, 1:] > 0).all()
    assert (h["charts/intrinsic_reward"][:, 0] == 0).all()  # no KL in the first iteration
    assert (h["losses/bnn_elbo"] > 0).all()  # 256 transitions per rollout: fits from the 1st
    # every transition but the episode ends entered the pool (2048 < its 4096 slots)
    np.testing.assert_array_equal(
        run_.state.bonus_stats["pool"]["size"], 2048 - h["charts/episodes"].sum(1)
    )
    assert not np.array_equal(h["charts/kl"][0], h["charts/kl"][1])
    assert len(chunks) == 2
    state, metrics = jax.device_get(chunks[0][0](jax.tree.map(jnp.copy, chunks[0][1])))
    after = chunks[1][1]
    jax.tree.map(np.testing.assert_array_equal, after.params, state.params)
    jax.tree.map(
        np.testing.assert_array_equal, after.bonus_stats["phi"], state.bonus_stats["phi"]
    )
    np.testing.assert_array_equal(h["charts/kl"][:, :4], metrics["charts/kl"])


def test_bad_values_fail_with_named_field(tmp_path):
    """Bad values stop before compiling, naming the field: among them a pool the BNN could
    never train from (min_pool_size above its capacity) and one smaller than a rollout
    (its write slots would collide)."""
    for args, msg in (
        (["--prior-sd", "0"], "prior_sd=0"),
        (["--step-lambda", "-1"], "step_lambda=-1"),
        (["--dtype", "float16"], "dtype='float16'"),
        (["--num-samples", "0"], "num-samples must be >= 1"),
        (["--preset", "quick", "--min-pool-size", "5000"], "min_pool_size=5000 exceeds"),
        (["--min-pool-size", "5000", "--pool-size", "4096"], "min_pool_size=5000 exceeds"),
        (
            ["--preset", "quick", "--pool-size", "200", "--min-pool-size", "100"],
            "pool_size=200 is less than a rollout 256",
        ),
    ):
        with pytest.raises(ValueError, match=msg):
            vime.main([*args, "--run-dir", str(tmp_path)])


def test_every_config_field_is_read():
    """No flag that lies: each Config field is read by code that runs (AST, not text)."""
    assert unread_fields(vime) == []


def test_paper_preset_traces():
    """jax.eval_shape of init and one update under the `paper` preset (gymnax
    MountainCarContinuous, 10 envs x 500 steps, the released defaults' 100k-transition
    pool and 500 BNN steps, a (32,) policy): nothing runs."""
    cfg, state, (after, metrics) = trace_paper(vime)
    assert state.obs.shape == (10, 2)
    assert state.bonus_stats["pool"]["x"].shape == (100_000, 3)  # (s, a): 2 + 1
    assert [layer["mu"].shape for layer in state.bonus_stats["phi"]] == [(3, 32), (32, 2)]
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
