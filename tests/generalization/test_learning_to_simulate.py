"""Tests of generalization/learning_to_simulate.py: the REINFORCE gradient of the Gaussian
policy against its analytic score function, the simulator's moments, the policy learning the
hidden mixture against the same run with the reward's sign flipped (behaviour), purity, CLI,
paper preset, every Config field read.

Mutations tried (each made the named test fail, then was taken out): exp(+log sigma) for
exp(-log sigma) in `log_prob`, and sigma's gradient kept when it is fixed (test_reinforce...);
labels m // 2 for m mod 2, and data_std ignored in `generate` (test_generator...); sigma
ignored in `sample_xi` (test_policy_samples...); gradient descent instead of ascent on J in
`update` (behaviour: distance 8.8 / 8.1, accuracy 0.34 / 0.30); no baseline, A = R
(behaviour: distance 4.07 / 7.10, accuracy 0.67 / 0.60: accuracy is always positive, so
every sampled xi is pushed up); the seed key ignored in `init` (test_train_is_pure...: the
seeds' mu equal); the num_train check dropped (test_bad_values...)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import run
from generalization import learning_to_simulate as lts
from tests.common.cli import cli_args
from tests.common.compiled import compiled, jit0, main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# 40 policy iterations of K = 8 datasets of 64 points, 40 Adam steps of a 16-unit MLP each.
TINY = lts.Config(num_iterations=40, num_samples=8, train_steps=40, num_train=64, num_val=256,
                  hidden=16, lr=0.2)
SEEDS = 2


def test_reinforce_grad_is_the_score_function():
    """psi: mu = (1, -2), sigma = (0.5, 2); K = 3 samples with advantages A = (1, -0.5, 2).
    grad_mu = 1/K sum_k A_k (xi_k - mu) / sigma^2, grad_log_sigma = 1/K sum_k A_k ((xi_k -
    mu)^2 / sigma^2 - 1) (0 when sigma is fixed); log_prob = the Gaussian log density."""
    mu, sigma = np.array([1.0, -2.0]), np.array([0.5, 2.0])
    psi = {"mu": jnp.asarray(mu, jnp.float32), "log_sigma": jnp.log(jnp.asarray(sigma))}
    xis = np.array([[1.5, -2.0], [0.0, 1.0], [1.25, -4.0]])
    adv = np.array([1.0, -0.5, 2.0])
    xs, a = jnp.asarray(xis, jnp.float32), jnp.asarray(adv, jnp.float32)
    g, fixed, lp_ours = compiled(lambda p, x, a: (
        lts.reinforce_grad(p, x, a, True), lts.reinforce_grad(p, x, a, False),
        lts.log_prob(p, x[0])), psi, xs, a)
    z = (xis - mu) / sigma
    np.testing.assert_allclose(g["mu"], (adv[:, None] * z / sigma).mean(0), rtol=1e-5)
    np.testing.assert_allclose(g["log_sigma"], (adv[:, None] * (z**2 - 1)).mean(0), rtol=1e-5)
    # by hand, sample 1: z = (1, 0): grad_mu += 1 * (2, 0), grad_log_sigma += 1 * (0, -1)
    np.testing.assert_allclose(g["mu"][0], (1 * 2 + -0.5 * -4 + 2 * 1) / 3, rtol=1e-5)
    np.testing.assert_array_equal(fixed["log_sigma"], 0.0)
    np.testing.assert_allclose(fixed["mu"], g["mu"])
    lp = -0.5 * z[0] ** 2 - np.log(sigma) - 0.5 * np.log(2 * np.pi)
    np.testing.assert_allclose(lp_ours, lp.sum(), rtol=1e-5)


def test_generator_matches_the_moments_of_xi():
    """8000 points from xi = (1, 2, -3, 0.5, 0, -1, 4, 4), data_std 0.5: each component m holds
    n / M points of label m mod 2, mean xi[2m:2m+2] and covariance 0.25 I."""
    cfg = dataclasses.replace(TINY, data_std=0.5)
    xi = jnp.array([1.0, 2.0, -3.0, 0.5, 0.0, -1.0, 4.0, 4.0])
    x, y = compiled(lambda k, xi: lts.generate(k, xi, 8000, cfg), jax.random.key(0), xi)
    m = np.arange(8000) % 4
    np.testing.assert_array_equal(y, m % 2)
    for c in range(4):
        pts = np.asarray(x)[m == c]
        assert len(pts) == 2000
        np.testing.assert_allclose(pts.mean(0), xi[2 * c: 2 * c + 2], atol=0.035)
        np.testing.assert_allclose(np.cov(pts.T), 0.25 * np.eye(2), atol=0.025)


def test_policy_samples_have_the_policy_moments():
    """xi_k = mu + sigma eps: 20000 samples have mean mu and std sigma."""
    psi = {"mu": jnp.array([1.0, -1.0]), "log_sigma": jnp.log(jnp.array([0.5, 2.0]))}
    xi = compiled(lambda k, p: lts.sample_xi(k, p, 20000), jax.random.key(1), psi)
    np.testing.assert_allclose(xi.mean(0), [1.0, -1.0], atol=0.04)
    np.testing.assert_allclose(xi.std(0), [0.5, 2.0], rtol=0.03)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """TINY through the CLI: 2 seeds, one chunk of 40 iterations (recorded for the rerun)."""
    return main_recording_chunks(lts.main, cli_args(TINY, lts.Config()) + [
        "--num-seeds", str(SEEDS), "--log-every", str(TINY.num_iterations), "--no-progress",
        "--fast-compile", "--run-dir", str(tmp_path_factory.mktemp("lts"))])


def test_policy_finds_real_mixture_and_flipped_reward_does_not(tiny_run, monkeypatch):
    """Behaviour ([1]'s toy): in 40 iterations ||mu - xi_real|| shrinks from 4.58 by > 40% in
    both seeds, and the model trained at xi = mu scores (mean of the last 10 iterations) above
    the models trained at uniform random xi, in the same program. Broken variant, same seeds:
    the reward's sign flipped (R = -accuracy): the distance grows and accuracy stays low.
    Measured (seeds 0 / 1, loaded 2-core CPU): distance 4.58 -> 1.28 / 2.21 (flipped 8.77 /
    8.13); accuracy at mu 0.90 / 0.91 vs random xi 0.50 / 0.48 (flipped 0.34 / 0.30)."""
    h = tiny_run[0].history
    d, acc, rand = (h[k] for k in ("charts/dist_to_real", "charts/acc_policy_mean",
                                    "charts/acc_random_xi"))
    monkeypatch.setattr(lts, "reward_of", lambda acc, loss, cfg: -acc)
    train = jit0(lambda keys: jax.vmap(lambda k: jax.lax.scan(
        lambda s, _: lts.update(s, TINY), lts.init(k, TINY), None, TINY.num_iterations)[1])(
        keys))
    broken = train(run.seed_keys(0, SEEDS))
    bd, bacc = np.asarray(broken["charts/dist_to_real"]), np.asarray(
        broken["charts/acc_policy_mean"])
    print("dist", d[:, 0], "->", d[:, -1], "| flipped ->", bd[:, -1])
    print("acc at mu", acc[:, -10:].mean(1), "random xi", rand.mean(1), "| flipped",
          bacc[:, -10:].mean(1))
    assert (d[:, -1] < 0.6 * d[:, 0]).all(), d[:, -1]
    assert (acc[:, -10:].mean(1) > rand.mean(1) + 0.15).all()
    assert (acc[:, -10:].mean(1) > 0.75).all()
    assert (bd[:, -1] > 0.9 * bd[:, 0]).all(), bd[:, -1]
    assert (bacc[:, -10:].mean(1) < 0.6).all()


def test_train_is_pure_and_cli_writes_its_files(tiny_run, capsys):
    """The CLI trains 2 seeds in one vmapped program; its compiled chunk rerun on the same
    input states gives bit-identical policy and metrics; the seeds differ; --help documents
    every field."""
    first, chunks = tiny_run
    assert len(chunks) == 1
    chunk, states = chunks[0]
    again, metrics = chunk(jax.tree.map(jnp.copy, states))
    metrics = jax.device_get(metrics)
    for k, v in metrics.items():
        np.testing.assert_array_equal(first.history[k], v, err_msg=k)
    np.testing.assert_array_equal(first.state.psi["mu"], again.psi["mu"])
    assert not np.array_equal(first.state.psi["mu"][0], first.state.psi["mu"][1])
    assert not np.array_equal(first.state.val_x[0], first.state.val_x[1])
    assert first.history["charts/dist_to_real"].shape == (SEEDS, TINY.num_iterations)
    assert (first.run_dir / "metrics.jsonl").exists()
    with pytest.raises(SystemExit):
        lts.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(lts.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out


def test_bad_values_fail_with_named_field(tmp_path):
    for flags, msg in ((["--xi-real", "1.0"], "xi_real="), (["--num-train", "65"], "num_train"),
                       (["--reward", "acc"], "reward='acc'"),
                       (["--baseline-decay", "1.0"], "baseline_decay"),
                       (["--num-components", "1"], "num_components")):
        with pytest.raises(ValueError, match=msg):
            lts.main(flags + ["--run-dir", str(tmp_path)])


def test_every_config_field_is_read():
    assert unread_fields(lts) == []


def test_paper_preset_traces():
    """eval_shape of init and one policy iteration under the paper preset (K = 16 datasets of
    256 points, 100 Adam steps each, the 4-component XOR mixture)."""
    cfg, state, (after, metrics) = trace_paper(lts)
    assert cfg.num_samples == 16 and state.psi["mu"].shape == (8,)
    assert state.val_x.shape == (cfg.num_val, 2)
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
