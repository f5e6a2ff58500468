"""Tests of exploration/curiosity_largescale.py: each feature space's phi (pixels the whitened
frame, random features never trained, IDF's inverse loss, VAE's ELBO), the reward as the
forward error with phi held fixed, the return-std normaliser, behaviour against PPO with no
reward, purity, CLI and the paper preset."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import run
from common.rl import RunningMeanStd
from exploration import curiosity_largescale as cls
from tests.common.compiled import compiled, main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# One tiny configuration: the quick preset (DeepSea-16 image, 16 envs x 32 steps x 32 updates).
TINY = cls.Config(**cls.PRESETS["quick"])


def _net(features):
    torso = cls.Torso(8 if features == "vae" else 4, atari=False, mlp_hidden=(8,), obs_ndim=2)
    net = cls.Curiosity(features, num_actions=3, torso=torso, obs_dim=6,
                        width=6 if features == "pixels" else 4, hidden=8, blocks=1)
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    x, x_next = jax.random.normal(k[0], (5, 2, 3)), jax.random.normal(k[1], (5, 2, 3))
    return net, net.init(k[2], x, jnp.zeros(5, jnp.int32)), x, x_next, jnp.array([0, 1, 2, 1, 0])


def test_losses_and_normaliser_by_hand():
    """forward error: phi_hat - phi' = [[1, 2], [0, -2]] -> mean over features [2.5, 2].
    inverse (IDF): logits [[0, ln 3], [ln 2, 0]], actions [1, 0] -> -ln 3/4, -ln 2/3.
    ELBO (VAE), one z and one pixel: q = N(1, 0.5), p(x|z) = N(0, 2) at x = 2:
        KL = (1 + 0.25 - 1) / 2 - ln 0.5 = 0.818147,  -log p = ln 2 + 0.5 ln 2 pi + 0.5.
    normaliser: gamma 0.5, r = [[1, 0], [2, 4]] (T = 2, N = 2) from R = [0, 0]:
        R = [[1, 0], [2.5, 4]], r / sqrt(var(R) + 1e-8) with var = var([1, 0, 2.5, 4])
        (the running moments start at var 1 with count 1e-4); R carried over: [2.5, 4]."""
    d = jnp.array([[1.0, 2.0], [0.0, -2.0]])
    np.testing.assert_allclose(cls.forward_error(d + 3.0, jnp.full((2, 2), 3.0)), [2.5, 2.0])
    logits = jnp.array([[0.0, np.log(3.0)], [np.log(2.0), 0.0]])
    np.testing.assert_allclose(cls.inverse_loss(logits, jnp.array([1, 0])),
                               [-np.log(0.75), -np.log(2 / 3)], rtol=1e-6)
    nelbo = cls.negative_elbo(jnp.array([[1.0]]), jnp.array([[0.5]]), jnp.array([[0.0]]),
                              jnp.array([[2.0]]), jnp.array([[2.0]]))
    kl = 0.125 - np.log(0.5)
    np.testing.assert_allclose(nelbo, [kl + np.log(2) + 0.5 * np.log(2 * np.pi) + 0.5],
                               rtol=1e-6)
    r = jnp.array([[1.0, 0.0], [2.0, 4.0]])
    got, rewems, rms = cls.normalize_reward(r, jnp.zeros(2), RunningMeanStd.create(), gamma=0.5)
    returns = np.array([1.0, 0.0, 2.5, 4.0])
    expect_var = (1e-4 * 1 + 4 * returns.var() + returns.mean() ** 2 * 1e-4 * 4 / 4.0001) / 4.0001
    np.testing.assert_allclose(rms.var, expect_var, rtol=1e-5)
    np.testing.assert_allclose(got, np.asarray(r) / np.sqrt(expect_var + 1e-8), rtol=1e-5)
    np.testing.assert_allclose(rewems, [2.5, 4.0])


def test_phi_reward_and_where_the_gradients_go():
    """Per feature space (one compiled program for all four): phi (pixels: the whitened
    frame itself); the reward equals the forward error of f(phi(s), a) against phi(s')
    composed from the pieces; L_f trains f and never phi (stop-gradient, issue #3); L_phi:
    none for pixels and rf (rf's phi gets no gradient at all), the inverse loss for idf,
    the negative ELBO for vae (both reach the encoder)."""
    nets = {f: _net(f) for f in cls.FEATURES}
    key = jax.random.PRNGKey(1)

    def pieces(all_params):
        out = {}
        for f, (net, _, x, x_next, action) in nets.items():
            params = all_params[f]
            phi = net.apply(params, x, method=cls.Curiosity.embed)
            phi_next = net.apply(params, x_next, method=cls.Curiosity.embed)
            phi_hat = net.apply(params, phi, action, method=cls.Curiosity.forward)
            r = cls.intrinsic_reward(params, net, x, x_next, action)

            def loss(p, i, net=net, x=x, x_next=x_next, action=action):
                return cls.curiosity_loss(p, net, x, x_next, action, x, key)[i]

            extra = {}
            if f == "idf":
                extra["logits"] = net.apply(params, phi, phi_next, method=cls.Curiosity.inverse)
            if f == "vae":
                extra["posterior"] = net.apply(params, x, method=cls.Curiosity.posterior)
            out[f] = (phi, phi_next, phi_hat, r, loss(params, 0), loss(params, 1),
                      jax.grad(loss)(params, 0)["params"], jax.grad(loss)(params, 1)["params"],
                      extra)
        return out

    results = compiled(pieces, {f: n[1] for f, n in nets.items()})

    def norm(tree):
        return float(sum(jnp.abs(v).sum() for v in jax.tree.leaves(tree)))

    for f, (phi, phi_next, phi_hat, r, l_f, l_phi, g_f, g_phi, extra) in results.items():
        net, params, x, _, action = nets[f]
        expect = ((np.asarray(phi_hat) - np.asarray(phi_next)) ** 2).mean(-1)
        np.testing.assert_allclose(r, expect, rtol=1e-5, err_msg=f)
        np.testing.assert_allclose(l_f, expect.mean(), rtol=1e-5, err_msg=f)
        assert (np.asarray(r) > 0).all() and norm(g_f["f_out"]) > 0, f
        if f == "pixels":
            np.testing.assert_array_equal(phi, np.asarray(x).reshape(5, 6))
            assert "torso" not in params["params"] and l_phi == 0.0
            continue
        assert norm(g_f["torso"]) == 0.0, f  # L_f does not reach phi
        if f == "rf":
            assert l_phi == 0.0 and norm(g_phi) == 0.0
        elif f == "idf":
            np.testing.assert_allclose(l_phi, cls.inverse_loss(extra["logits"], action).mean(),
                                       rtol=1e-5)
            assert norm(g_phi["torso"]) > 0 and norm(g_phi["f_out"]) == 0.0
        else:  # vae: phi is the posterior mean
            mean, scale = extra["posterior"]
            np.testing.assert_allclose(phi, mean)
            assert (np.asarray(scale) > 0).all() and np.isfinite(l_phi)
            assert norm(g_phi["torso"]) > 0 and norm(g_phi["dec"]) > 0


SEEDS = 8
RUN_ARGS = ["--preset", "quick", "--features", "rf", "--num-seeds", str(2 * SEEDS),
            "--log-every", "8", "--no-progress"]


def _run(run_dir):
    """The quick preset through `cls.main` with random features, 2 x SEEDS seeds in ONE
    compiled program: seeds SEEDS.. are PPO with no reward at all (int_coef 0, traced),
    each on the key of its curiosity twin."""
    keys = jax.random.split(jax.random.PRNGKey(0), 2 * SEEDS)  # the runner's seed keys
    real = cls.init

    def init(key, cfg):
        i = jnp.argmax(jnp.all(key == keys, -1))
        state = real(keys[i % SEEDS], cfg)
        return state.replace(int_coef=jnp.where(i >= SEEDS, 0.0, state.int_coef))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cls, "init", init)
        return main_recording_chunks(cls.main, RUN_ARGS + ["--run-dir", str(run_dir)])


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """(the run, its compiled chunks with their recorded inputs)"""
    return _run(tmp_path_factory.mktemp("cls"))


@pytest.fixture(scope="module")
def quick_run(recorded):
    return recorded[0]


def test_curiosity_explores_more_than_ppo_without_reward(quick_run):
    """Behaviour ([1] Sec. 3, coverage) on DeepSea-16 as an image (153 reachable cells, a
    random walk hugs the left edge), 16,384 steps, 8 seeds: random features trained on the
    curiosity reward only against the broken variant, the same PPO with no reward
    (int_coef 0, same keys, in the same compiled run). Distinct cells, measured on a
    loaded 2-core CPU (jax 0.10.2):
        rf    148 143 151 151 138 149 144 145   median 146.5, mean 146.1
        none  141 143 141 134 137 141 138 135   median 139.5, mean 138.75
    (DeepSea-20, same budget: rf 204, none 188 median.) The IDF arm is the slow test
    below (one more compiled program)."""
    rf, none = _arms(quick_run)
    print("rf", rf, "none", none)
    assert np.median(rf) >= np.median(none) + 3, (rf, none)
    assert rf.mean() >= none.mean() + 3, (rf, none)
    np.testing.assert_array_equal(quick_run.final["distinct_cells"],
                                  np.concatenate([rf, none]))


def _arms(quick_run):
    cells = quick_run.history["charts/distinct_cells"][:, -1]
    return cells[:SEEDS], cells[SEEDS:]


@pytest.mark.slow
def test_idf_explores_more_than_ppo_without_reward(quick_run):
    """The same gate for inverse-dynamics features, against the same no-reward seeds of the
    CLI run (IDF on their keys, its own compiled program). Measured (loaded 2-core CPU):
        idf   148 136 142 145 143 151 144 145   median 144.5, mean 144.25
        none  141 143 141 134 137 141 138 135   median 139.5, mean 138.75
    (DeepSea-20: idf 196.5 vs none 188 median.)"""
    _, none = _arms(quick_run)
    c = dataclasses.replace(TINY, features="idf")

    def train(key):
        state = cls.init(key, c)
        return jax.lax.scan(lambda s, _: cls.update(s, c), state, None, c.num_updates)[1]

    keys = jax.random.split(jax.random.PRNGKey(0), 2 * SEEDS)[:SEEDS]
    idf = np.asarray(jax.jit(jax.vmap(train))(keys)["charts/distinct_cells"][:, -1])
    print("idf", idf, "none", none)
    assert np.median(idf) >= np.median(none) + 3, (idf, none)
    assert idf.mean() >= none.mean() + 3, (idf, none)


def test_train_is_pure_and_random_features_stay_fixed(recorded):
    """The runner's last compiled chunk again on its recorded input gives bit-identical
    params and metrics; different seeds differ; the no-reward seeds see no curiosity in
    the trained reward. rf's encoder is exactly its initial draw after 32 updates, while
    f trained."""
    quick_run, chunks = recorded
    h = quick_run.history
    for k in ("losses/forward", "charts/intrinsic_reward", "losses/entropy"):
        assert np.isfinite(h[k]).all() and h[k].shape == (2 * SEEDS, TINY.num_updates), k
    np.testing.assert_array_equal(quick_run.state.int_coef, [1.0] * SEEDS + [0.0] * SEEDS)
    assert not np.array_equal(h["losses/forward"][0], h["losses/forward"][1])
    assert len(chunks) == 4
    first = chunks[0][1].params["curiosity"]["params"]
    last = quick_run.state.params["curiosity"]["params"]
    jax.tree.map(np.testing.assert_array_equal, first["torso"], last["torso"])
    assert not np.array_equal(first["f_out"]["kernel"], last["f_out"]["kernel"])
    state, metrics = jax.device_get(chunks[-1][0](chunks[-1][1]))
    jax.tree.map(np.testing.assert_array_equal, quick_run.state.params, state.params)
    np.testing.assert_array_equal(h["losses/forward"][:, -8:], metrics["losses/forward"])


def test_cli_run_writes_its_files(quick_run, capsys):
    """`--help` documents every field; the quick run wrote its files."""
    with pytest.raises(SystemExit):
        cls.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(cls.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out
    assert (quick_run.run_dir / "metrics.jsonl").exists()


def test_cli_flags_reach_the_tested_functions(monkeypatch):
    """Flags parsed as the CLI parses them reach the traced `update` (spies; jax.eval_shape,
    nothing compiles): --features vae reaches `curiosity_loss` (the ELBO), --gamma reaches
    the normaliser and GAE."""
    calls: dict[str, list] = {}
    for name in ("curiosity_loss", "normalize_reward", "gae"):
        real = getattr(cls, name)

        def wrapped(*args, _real=real, _name=name, **kwargs):
            calls.setdefault(_name, []).append((args, kwargs))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, name, wrapped)
    cfg, _ = run.parse(cls.Config, cls.PRESETS, [
        "--preset", "quick", "--features", "vae", "--gamma", "0.9", "--gae-lambda", "0.8"])
    state = jax.eval_shape(lambda k: cls.init(k, cfg), jax.random.PRNGKey(0))
    jax.eval_shape(lambda s: cls.update(s, cfg), state)
    assert calls["curiosity_loss"] and all(a[1].features == "vae"
                                           for a, _ in calls["curiosity_loss"])
    assert [kw for _, kw in calls["normalize_reward"]] == [{"gamma": 0.9}]
    assert [a[4:] for a, _ in calls["gae"]] == [(0.9, 0.8)]


def test_bad_values_fail_with_named_field(tmp_path):
    with pytest.raises(ValueError, match="features='icm' must be one of"):
        cls.main(["--preset", "quick", "--features", "icm", "--run-dir", str(tmp_path)])
    for flag, value in (("--num-minibatches", "3"), ("--gamma", "1.5"), ("--int-coef", "-1")):
        with pytest.raises(ValueError, match=flag[2:].replace("-", "[-_]")):
            cls.main(["--preset", "quick", flag, value, "--run-dir", str(tmp_path)])


def test_every_config_field_is_read():
    """No flag that lies: each Config field is read by code that runs (AST, not text)."""
    assert unread_fields(cls) == []


def test_paper_preset_traces():
    """jax.eval_shape of init and one update under the `paper` preset (Breakout through
    envpool, 84x84 grey, 4 frames, 128 envs x 128 steps, random features): nothing runs."""
    cfg, state, (after, metrics) = trace_paper(cls)
    assert (cfg.num_envs, cfg.num_steps, cfg.num_epochs, cfg.num_minibatches) == (128, 128, 3, 8)
    assert (cfg.lr, cfg.gamma, cfg.gae_lambda, cfg.ent_coef, cfg.ext_coef) == (
        1e-4, 0.99, 0.95, 0.001, 0.0)
    assert state.obs.shape == (128, 4, 84, 84) and state.ob_mean.shape == (4, 84, 84)
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
    assert state.params["curiosity"]["params"]["f_out"]["kernel"].shape == (512 + 4, 512)
