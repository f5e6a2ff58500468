"""Tests of exploration/disagreement.py: the bonus and the ensemble loss by hand, the
noisy-TV stochasticity test (disagreement vs prediction error on the same data), purity,
CLI and the paper preset's trace."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import envs
from exploration import disagreement as dis
from tests.common.compiled import main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

QUICK = dis.Config(**dis.PRESETS["quick"])
TINY = dataclasses.replace(QUICK, total_timesteps=256, num_envs=4, num_steps=32,
                           feature_dim=16, model_hidden=32, hidden=(32, 32))


def test_disagreement_error_and_ensemble_loss_by_hand():
    """K = 2 models, F = 2 features.
        preds = [[0, 2], [2, 2]]: variance over models [1, 0] -> disagreement 0.5
        target [1, 1]: squared errors per model [1, 1] -> prediction error 1
    The ensemble loss: per-sample errors per model [[1, 4], [0, 1]] (B = 2), keep
    [[1.25, 0], [1.25, 1.25]] (the 1/0.8 scale of the kept) -> mean over B per model
    [0.625, 0.625], summed 1.25 (no keep: 2.5 + 0.5 = 3)."""
    preds = jnp.array([[[0.0, 2.0]], [[2.0, 2.0]]])  # [K, B=1, F]
    np.testing.assert_allclose(dis.disagreement(preds), [0.5])
    np.testing.assert_allclose(dis.prediction_error(preds, jnp.array([[1.0, 1.0]])), [1.0])
    preds = jnp.array([[[1.0, 1.0], [2.0, 2.0]], [[0.0, 0.0], [1.0, 1.0]]])  # [K, B=2, F]
    keep = jnp.array([[1.25, 0.0], [1.25, 1.25]])
    np.testing.assert_allclose(dis.ensemble_loss(preds, jnp.zeros((2, 2)), keep), 1.25)
    np.testing.assert_allclose(dis.ensemble_loss(preds, jnp.zeros((2, 2)), jnp.ones((2, 2))),
                               3.0)
    rewems, ret = dis.forward_filter(jnp.array([2.0]), jnp.array([[1.0], [0.0]]), 0.5)
    np.testing.assert_allclose(ret[:, 0], [2.0, 1.0])  # 0.5 * 2 + 1, 0.5 * 2 + 0


def _transitions(key, n_envs=32, steps=64):
    """Random-policy transitions of the uncontrollable noisy-TV FourRooms [steps, n_envs]."""
    env = envs.make("GridMaze-FourRooms-NoisyTV", n_envs, max_steps=100)

    def step(carry, k):
        s, obs = carry
        k_a, k_s = jax.random.split(k)
        a = jax.random.randint(k_a, (n_envs,), 0, env.num_actions)
        nxt, s, _, done, _ = env.step(s, a, k_s)
        return (s, nxt), dict(obs=obs, action=a, next_obs=nxt, done=done)

    k0, k1 = jax.random.split(key)
    obs, s = env.reset(k0)
    return env, jax.lax.scan(step, (s, obs), jax.random.split(k1, steps))[1]


@pytest.fixture(scope="module")
def stochasticity():
    """One ensemble (the file's make_bonus: its init and loss) trained on 2,048 random
    transitions of the noisy-TV FourRooms, 300 Adam steps on the full batch, then both
    bonuses' `reward` (variance and error: the loss is the same for both) on 2,048 fresh
    transitions, averaged over those that land on the TV and those that do not."""
    cfg = dataclasses.replace(TINY, num_models=5, feature_dim=16, model_hidden=32)

    def fit_and_score(key):
        env, train = _transitions(jax.random.fold_in(key, 0))
        _, test = _transitions(jax.random.fold_in(key, 1))
        _, phi_net, model = dis.networks(cfg, env)
        bonuses = {kind: dis.make_bonus(dataclasses.replace(cfg, bonus=kind), phi_net, model)
                   for kind in ("variance", "error")}
        bonus = bonuses["variance"]
        params, stats = bonus.init(jax.random.fold_in(key, 2), train["obs"][0])
        flat = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), train)
        tx = optax.adam(1e-3)

        def step(carry, k):
            p, s = carry
            g = jax.grad(lambda p: bonus.loss(p, stats, flat, k)[0])(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)),
                                      jax.random.split(jax.random.fold_in(key, 3), 300))
        tv = (test["next_obs"][..., 2:] != 0).any(-1) & ~test["done"]
        off = ~tv & ~test["done"]
        out = {}
        for kind, b in bonuses.items():
            r, _ = b.reward(params, stats, test)
            out[kind] = (jnp.where(tv, r, 0).sum() / tv.sum(),
                         jnp.where(off, r, 0).sum() / off.sum(), tv.sum())
        return out

    return jax.device_get(jax.jit(fit_and_score)(jax.random.PRNGKey(0)))


def test_disagreement_is_far_less_drawn_to_the_noisy_tv_than_prediction_error(stochasticity):
    """[1] Sec. 3-4, the stochasticity test. Unpredictable noise on the TV keeps each
    model's prediction error high there for ever (aleatoric), but the models all learn the
    same mean, so their disagreement there falls as data accumulate. The bonus on TV
    transitions over the bonus elsewhere, same networks and data, measured (2-core CPU):
    error 42.3, variance 8.1 (173 TV transitions). The broken variant, `--bonus error` in place of
    the variance, has the error's ratio and fails the second assert. At this scale (2,048
    transitions, 300 steps) the disagreement is still above its off-TV level: the
    catalogue's "within 1.5x after 50k transitions" is a slow-tier size."""
    err_tv, err_off, n_tv = stochasticity["error"]
    var_tv, var_off, _ = stochasticity["variance"]
    r_err, r_var = err_tv / err_off, var_tv / var_off
    print("TV transitions", n_tv, "error ratio", r_err, "variance ratio", r_var)
    assert n_tv >= 50
    assert r_err > 3.0, (err_tv, err_off)
    assert r_var < r_err / 3, (r_var, r_err)


SEEDS = 2
RUN_ARGS = ["--preset", "quick", "--total-timesteps", "256", "--num-envs", "4",
            "--num-steps", "32", "--feature-dim", "16", "--model-hidden", "32", "--hidden",
            "32", "32", "--num-seeds", str(SEEDS), "--log-every", "2", "--no-progress"]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    return main_recording_chunks(dis.main,
                                 RUN_ARGS + ["--run-dir", str(tmp_path_factory.mktemp("dis"))])


def test_train_is_pure_and_cli_writes_its_files(recorded, capsys):
    """The runner's compiled chunk (the whole run) again on its recorded input gives
    bit-identical params and metrics (no tracing, no compiling); seeds differ; the run wrote
    its files; `--help` documents every field; the normaliser folded in T x N = 128 returns
    per update."""
    tiny_run, chunks = recorded
    with pytest.raises(SystemExit):
        dis.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(dis.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert (tiny_run.run_dir / "metrics.jsonl").exists()
    h = tiny_run.history
    for k in ("losses/dynamics", "charts/disagreement", "charts/intrinsic_reward"):
        assert np.isfinite(h[k]).all() and h[k].shape == (SEEDS, 2), k
    assert not np.array_equal(h["losses/dynamics"][0], h["losses/dynamics"][1])
    np.testing.assert_allclose(tiny_run.state.bonus_stats["rew_norm"].count,
                               [2 * 128 + 1e-4] * SEEDS, rtol=1e-6)
    assert len(chunks) == 1
    state, metrics = jax.device_get(chunks[0][0](chunks[0][1]))
    jax.tree.map(np.testing.assert_array_equal, tiny_run.state.params, state.params)
    np.testing.assert_array_equal(h["losses/dynamics"], metrics["losses/dynamics"])


def test_bad_values_fail_with_named_field(tmp_path):
    with pytest.raises(ValueError, match="bonus='mean' must be"):
        dis.main(["--bonus", "mean", "--run-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="num_models=1"):
        dis.main(["--num-models", "1", "--run-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="keep_prob=0"):
        dis.main(["--keep-prob", "0", "--run-dir", str(tmp_path)])


def test_every_config_field_is_read():
    assert unread_fields(dis) == []


def test_paper_preset_traces():
    """jax.eval_shape of init and one update under the `paper` preset (Breakout through
    envpool, 84x84 frames, 5 models on 512 random features), with 8 envs instead of 128."""
    _, state, (after, metrics) = trace_paper(dis, num_envs=8)
    assert state.obs.shape == (8, 4, 84, 84)
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert jax.tree.leaves(state.params["bonus"])[0].shape[0] == 5  # K stacked models
