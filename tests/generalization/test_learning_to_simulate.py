"""Tests of generalization/learning_to_simulate.py: the REINFORCE gradient of the Gaussian
policy against its analytic score function, the simulator's moments, the baseline, advantage,
fixed / learned sigma and neg_loss reward through two real `update`s, the policy learning the
hidden mixture against the same run with the reward's sign flipped (behaviour), purity, CLI,
paper preset (float32 and bfloat16), every Config field read.

Mutations tried (each made the named test fail, then was taken out): exp(+log sigma) for
exp(-log sigma) in `log_prob`, and sigma's gradient kept when it is fixed (test_reinforce...);
labels m // 2 for m mod 2, data_std ignored in `generate`, and sigma ignored in `sample_xi`
(test_generator_and_policy...); gradient descent instead of ascent on J in `update` (behaviour:
distance 8.8 / 8.1, accuracy 0.34 / 0.30); no baseline, A = R (behaviour: distance 4.07 / 7.10,
accuracy 0.67 / 0.60: accuracy is always positive, so every sampled xi is pushed up); the seed
key ignored in `init` (test_train_is_pure...: the seeds' mu equal; sigma learned when fixed:
its history moves); the num_train check dropped (test_bad_values...). test_update_baseline...:
beta and 1 - beta swapped in the baseline's update (s2.baseline wrong); b including the current
rewards (iteration 2's b != mean R_1); b_0 = 0 (iteration 1's b != mean R_1); log sigma clipped
to log min_std when fixed (sigma 0.05, not 0.01: the bug this test came with); neg_loss giving
the accuracy (R != -loss); sigma never learned (log sigma unmoved). The init_std >= min_std
check dropped (test_bad_values...); the model's logit left in bfloat16 (test_paper_preset...:
the bf16 metrics not float32)."""

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
FLIPPED_ITERATIONS = 20  # the broken arm's run (its distance grows fast)


def test_reinforce_grad_is_the_score_function():
    """phi: mu = (1, -2), sigma = (0.5, 2); K = 3 samples with advantages A = (1, -0.5, 2).
    grad_mu = 1/K sum_k A_k (xi_k - mu) / sigma^2, grad_log_sigma = 1/K sum_k A_k ((xi_k -
    mu)^2 / sigma^2 - 1) (0 when sigma is fixed); log_prob = the Gaussian log density."""
    mu, sigma = np.array([1.0, -2.0]), np.array([0.5, 2.0])
    phi = {"mu": jnp.asarray(mu, jnp.float32), "log_sigma": jnp.log(jnp.asarray(sigma))}
    xis = np.array([[1.5, -2.0], [0.0, 1.0], [1.25, -4.0]])
    adv = np.array([1.0, -0.5, 2.0])
    xs, a = jnp.asarray(xis, jnp.float32), jnp.asarray(adv, jnp.float32)
    g, fixed, lp_ours = compiled(lambda p, x, a: (
        lts.reinforce_grad(p, x, a, True), lts.reinforce_grad(p, x, a, False),
        lts.log_prob(p, x[0])), phi, xs, a)
    z = (xis - mu) / sigma
    np.testing.assert_allclose(g["mu"], (adv[:, None] * z / sigma).mean(0), rtol=1e-5)
    np.testing.assert_allclose(g["log_sigma"], (adv[:, None] * (z**2 - 1)).mean(0), rtol=1e-5)
    # by hand, sample 1: z = (1, 0): grad_mu += 1 * (2, 0), grad_log_sigma += 1 * (0, -1)
    np.testing.assert_allclose(g["mu"][0], (1 * 2 + -0.5 * -4 + 2 * 1) / 3, rtol=1e-5)
    np.testing.assert_array_equal(fixed["log_sigma"], 0.0)
    np.testing.assert_allclose(fixed["mu"], g["mu"])
    lp = -0.5 * z[0] ** 2 - np.log(sigma) - 0.5 * np.log(2 * np.pi)
    np.testing.assert_allclose(lp_ours, lp.sum(), rtol=1e-5)


def test_generator_and_policy_samples_have_their_moments():
    """Generator: 8000 points from xi = (1, 2, -3, 0.5, 0, -1, 4, 4), data_std 0.5: each
    component m holds n / M points of label m mod 2, mean xi[2m:2m+2] and covariance 0.25 I.
    Policy: xi_k = mu + sigma eps: 20000 samples have mean mu and std sigma. (One program.)"""
    cfg = dataclasses.replace(TINY, data_std=0.5)
    xi = jnp.array([1.0, 2.0, -3.0, 0.5, 0.0, -1.0, 4.0, 4.0])
    phi = {"mu": jnp.array([1.0, -1.0]), "log_sigma": jnp.log(jnp.array([0.5, 2.0]))}
    (x, y), xis = compiled(lambda k, xi, p: (lts.generate(k, xi, 8000, cfg), lts.sample_xi(
        jax.random.fold_in(k, 1), p, 20000)), jax.random.key(0), xi, phi)
    m = np.arange(8000) % 4
    np.testing.assert_array_equal(y, m % 2)
    for c in range(4):
        pts = np.asarray(x)[m == c]
        assert len(pts) == 2000
        np.testing.assert_allclose(pts.mean(0), xi[2 * c: 2 * c + 2], atol=0.035)
        np.testing.assert_allclose(np.cov(pts.T), 0.25 * np.eye(2), atol=0.025)
    np.testing.assert_allclose(xis.mean(0), [1.0, -1.0], atol=0.04)
    np.testing.assert_allclose(xis.std(0), [0.5, 2.0], rtol=0.03)


def test_update_baseline_advantage_and_sigma(monkeypatch):
    """Two real `update`s with the main-model training replaced by one reward per iteration
    (u_t ~ U(0, 1) from the iteration's init key, the same for all K + 3 models; loss = -2 u_t).
    Iteration 1: b = mean R_1, A = R - b = 0, so the gradient is 0 and phi does not move;
    iteration 2: b = mean R_1 (not including R_2), A = R_2 - b != 0, phi moves, and after it
    b = beta mean R_1 + (1 - beta) mean R_2. Arm "fixed": reward = accuracy, sigma fixed at
    init_std = 0.01 < min_std: sigma stays 0.01. Arm "learned": reward = neg_loss (R = -loss),
    sigma learned: it moves at iteration 2."""
    monkeypatch.setattr(lts, "train_and_score", lambda xi, k_init, *_: (
        jax.random.uniform(k_init) + 0 * xi[0], -2 * jax.random.uniform(k_init) + 0 * xi[0]))
    fixed = dataclasses.replace(TINY, init_std=0.01)
    learned = dataclasses.replace(TINY, learn_std=True, reward="neg_loss")

    def two(cfg):  # init, then 2 updates (one trace of `update` in a scan)
        s0 = lts.init(jax.random.key(3), cfg)
        s2, (phi, m) = jax.lax.scan(lambda s, _: (lambda n, m: (n, (n.phi, m)))(
            *lts.update(s, cfg)), s0, None, 2)
        return s0.phi, phi, s2.baseline, m

    arms = compiled(lambda: (two(fixed), two(learned)))
    for cfg, (phi0, phi, b2, m) in zip((fixed, learned), arms, strict=True):
        phis = [phi0] + [jax.tree.map(lambda x, i=i: x[i], phi) for i in (0, 1)]
        m1, m2 = ({k: v[i] for k, v in m.items()} for i in (0, 1))
        r1, r2, beta = m1["charts/reward_mean"], m2["charts/reward_mean"], cfg.baseline_decay
        assert abs(r1 - r2) > 0.05, (r1, r2)  # the baseline's two terms are told apart
        np.testing.assert_allclose(m1["charts/baseline"], r1, rtol=1e-6)
        np.testing.assert_allclose(m2["charts/baseline"], r1, rtol=1e-6)
        np.testing.assert_allclose(b2, beta * r1 + (1 - beta) * r2, rtol=1e-6)
        assert m1["losses/grad_norm"] == 0 and m2["losses/grad_norm"] > 0
        np.testing.assert_array_equal(phis[1]["mu"], phis[0]["mu"])
        assert not np.allclose(phis[2]["mu"], phis[1]["mu"])
        if cfg.reward == "accuracy":
            np.testing.assert_allclose(r2, m2["charts/acc_samples"], rtol=1e-6)
            for phi in phis:
                np.testing.assert_allclose(np.exp(phi["log_sigma"]), 0.01, rtol=1e-5)
        else:  # R = -loss
            np.testing.assert_allclose(r2, -m2["losses/val_loss_samples"], rtol=1e-6)
            np.testing.assert_array_equal(phis[1]["log_sigma"], phis[0]["log_sigma"])
            assert np.abs(phis[2]["log_sigma"] - phis[1]["log_sigma"]).min() > 1e-3


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
    The model at mu also comes within 0.05 of the oracle trained at xi_real. The flipped arm
    runs FLIPPED_ITERATIONS = 20 iterations. Measured (seeds 0 / 1, loaded 2-core CPU):
    distance 4.58 -> 1.28 / 2.21 (flipped, 20 iterations: 7.03 / 7.40); accuracy at mu 0.900
    / 0.913, oracle 0.932 / 0.938, random xi 0.50 / 0.48 (flipped 0.38 / 0.40)."""
    h = tiny_run[0].history
    d, acc, rand, oracle = (h[k] for k in ("charts/dist_to_real", "charts/acc_policy_mean",
                                            "charts/acc_random_xi", "charts/acc_real_xi"))
    monkeypatch.setattr(lts, "reward_of", lambda acc, loss, cfg: -acc)
    train = jit0(lambda keys: jax.vmap(lambda k: jax.lax.scan(
        lambda s, _: lts.update(s, TINY), lts.init(k, TINY), None, FLIPPED_ITERATIONS)[1])(
        keys))
    broken = train(run.seed_keys(0, SEEDS))
    bd, bacc = np.asarray(broken["charts/dist_to_real"]), np.asarray(
        broken["charts/acc_policy_mean"])
    print("dist", d[:, 0], "->", d[:, -1], "| flipped ->", bd[:, -1])
    print("acc at mu", acc[:, -10:].mean(1), "oracle", oracle[:, -10:].mean(1), "random xi",
          rand.mean(1), "| flipped", bacc[:, -10:].mean(1))
    assert (d[:, -1] < 0.6 * d[:, 0]).all(), d[:, -1]
    assert (acc[:, -10:].mean(1) > rand.mean(1) + 0.15).all()
    assert (acc[:, -10:].mean(1) > 0.75).all()
    assert (acc[:, -10:].mean(1) > oracle[:, -10:].mean(1) - 0.05).all()  # mu ~ the oracle
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
    np.testing.assert_array_equal(first.state.phi["mu"], again.phi["mu"])
    assert not np.array_equal(first.state.phi["mu"][0], first.state.phi["mu"][1])
    assert not np.array_equal(first.state.val_x[0], first.state.val_x[1])
    assert first.history["charts/dist_to_real"].shape == (SEEDS, TINY.num_iterations)
    np.testing.assert_allclose(first.history["charts/sigma_mean"], TINY.init_std, rtol=1e-6)
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
                       (["--num-components", "1"], "num_components"),
                       (["--learn-std", "--init-std", "0.01"], "init_std=0.01")):
        with pytest.raises(ValueError, match=msg):
            lts.main(flags + ["--run-dir", str(tmp_path)])


def test_every_config_field_is_read():
    assert unread_fields(lts) == []


def test_paper_preset_traces():
    """eval_shape of init and one policy iteration under the paper preset (K = 16 datasets of
    256 points, 100 Adam steps each, the 4-component XOR mixture), in float32 and bfloat16."""
    cfg, state, (after, metrics) = trace_paper(lts)
    assert cfg.num_samples == 16 and state.phi["mu"].shape == (8,)
    assert state.val_x.shape == (cfg.num_val, 2)
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
    bf16 = trace_paper(lts, dtype="bfloat16")[2][1]  # the bf16 model's metrics stay float32
    assert all(m.dtype == jnp.float32 for m in jax.tree.leaves(bf16)), bf16
