"""Tests of generalization/active_dr.py: the SVPG update with its RBF kernel and median
heuristic against numpy, the particle returns and moves, the discriminator reward, the
behaviour of the discriminator-rewarded particles (against the reward sign flipped),
purity, CLI, paper preset."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from generalization import active_dr as adr
from tests.common.cli import cli_args
from tests.common.compiled import compiled, main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# CartPole with the pole length in [1, 4] x nominal, so the reference (x = 0) sits at one
# end of the box; 4 particles x 5 instances x 16 steps. The particles learn fast (lr 3e-2,
# alpha 0.1, moves of 0.2) so that the behaviour test sees them move in 40 updates.
# One chunk of 8 updates (the CLI run), rerun for purity and behaviour.
TINY = adr.Config(env_id="CartPole-v1", params=("length",), multiplier_min=(1.0,),
                  multiplier_max=(4.0,), target=(6.0,), num_particles=4, num_steps=16,
                  total_timesteps=8 * 4 * 5 * 16, hidden=(16,), particle_hidden=16,
                  disc_hidden=16, disc_batch=32, disc_iterations=8, num_epochs=1,
                  num_minibatches=2, particle_lr=3e-2, temperature=0.1, max_step_length=0.2,
                  density_bins=4, eval_episodes=2, eval_grid=(1.0, 4.0))
SEEDS, CHUNK = 2, 8


def numpy_svpg(theta, grad_j, alpha):
    """[2] Eq. 8 with the released code's bandwidth, written out pair by pair."""
    n = len(theta)
    d2 = np.array([[np.sum((a - b) ** 2) for b in theta] for a in theta])
    h2 = 0.5 * np.median(d2) / np.log(n + 1)
    phi = np.zeros_like(theta)
    for i in range(n):
        for j in range(n):
            k = np.exp(-np.sum((theta[j] - theta[i]) ** 2) / (2 * h2))
            phi[i] += k * grad_j[j] / alpha + k * (theta[i] - theta[j]) / h2  # d k / d theta_j
    return phi / n, h2


def test_svpg_direction_and_kernel_against_numpy():
    """3 particles in R^2 at (0, 0), (1, 0), (0, 2), grad J = (1, 0), (0, 1), (1, 1), alpha
    = 10. Squared distances 1, 4, 5 (each twice, and three zeros): median 1, h^2 =
    0.5 / log 4 = 0.3607; phi against a pair-by-pair numpy loop. The kernel term repels:
    with zero grads, particle 0's phi points away from the others (both components < 0).
    Fails with the released code's sign of the kernel term or with log n for log(n + 1)."""
    theta = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], np.float32)
    grad = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32)
    (phi, h2), (phi0, _), (k, dk, _) = compiled(lambda t, g: (
        adr.svpg_direction(t, g, 10.0), adr.svpg_direction(t, 0 * g, 10.0),
        adr.rbf_kernel(t)), theta, grad)
    want, want_h2 = numpy_svpg(theta, grad, 10.0)
    np.testing.assert_allclose(h2, 0.5 / np.log(4), rtol=1e-5)
    np.testing.assert_allclose(h2, want_h2, rtol=1e-5)
    np.testing.assert_allclose(phi, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.diag(k), 1.0)
    np.testing.assert_allclose(k[0, 1], np.exp(-1 / (2 * want_h2)), rtol=1e-5)
    assert (np.asarray(phi0[0]) < 0).all()
    np.testing.assert_allclose(dk.sum(0), 0.0, atol=1e-5)  # pairwise terms cancel


class Scale:  # a "network" whose logit is params x first feature
    def apply(self, params, x):
        return params * x[..., 0]


def test_particle_returns_moves_and_discriminator_reward():
    """A2C of one particle with V = 0: rewards (1, 2, 3), restart after step 1, gamma 0.99,
    bootstrap V(x_last) = 0: R = (1 + 0.99 * 2, 2, 3) = (2.98, 2, 3); value loss 0.5 mean
    R^2 = 3.3467; policy loss -mean(log N(0; 0, 1) A) = 0.5 log(2 pi) mean R = 2.4444 (the
    sign flipped fails). BCE with logits 2 (randomized, label 1) and -1 (reference, label
    0): softplus(-2) + softplus(-1) = 0.4402 (labels swapped: 3.44, fails). Moves: d = 1
    clips a to [-1, 1] x 0.05; d = 2 scales to unit norm. The discriminator reward
    c (log(mean D) - log 0.5): D = sigmoid(0) -> 0; D = (1, 1, 0), c = 2 -> 2 log(4/3)
    (every transition counts, the episode-ending ones too). Proposals (always a = +1, moves
    of 0.05): from x = 0.5 after 23 moves it moves to 0.55, then reaches the horizon of 25
    and restarts at a uniform x (count back to 1, so 4 after the 5 proposals); a particle
    at x = 1 cannot move and restarts at once."""
    zero = lambda x: jnp.zeros(x.shape[:-1])
    actor = lambda x: (jnp.zeros(x.shape), jnp.zeros(x.shape[-1:]))
    up = lambda x: (jnp.full(x.shape, 5.0), jnp.full(x.shape, -10.0))  # a = +1 (clipped)
    cfg1 = dataclasses.replace(TINY, max_step_length=0.05)
    cfg2 = dataclasses.replace(cfg1, params=("length", "masspole"))
    key = jax.random.PRNGKey(0)

    def cases():  # one program
        return (adr.particle_losses(TINY, actor, zero, jnp.zeros((3, 1)), jnp.zeros((3, 1)),
                                    jnp.array([False, True, False]),
                                    jnp.array([1.0, 2.0, 3.0]), jnp.zeros(1)),
                adr.move(cfg1, jnp.array([3.0])), adr.move(cfg2, jnp.array([3.0, 4.0])),
                adr.disc_reward(jnp.zeros(3), 1.0),
                adr.disc_reward(jnp.array([30.0, 30.0, -30.0]), 2.0),
                adr.propose(cfg1, up, key, jnp.array([0.5]), jnp.array(23)),
                adr.propose(cfg1, up, key, jnp.array([1.0]), jnp.array(0))[1][2],
                adr.disc_loss(2.0, Scale(), jnp.array([[1.0]]), jnp.array([[-0.5]])))

    (pl, vl), m1, m2, r0, r1, ((_, t_next), (x_seen, _, restart)), restart_top, bce = \
        compiled(cases)
    np.testing.assert_allclose(vl, 0.5 * np.mean(np.square([2.98, 2.0, 3.0])), rtol=1e-5)
    np.testing.assert_allclose(pl, 0.5 * np.log(2 * np.pi) * np.mean([2.98, 2.0, 3.0]),
                               rtol=1e-5)
    np.testing.assert_allclose(bce, np.log1p(np.exp(-2.0)) + np.log1p(np.exp(-1.0)),
                               rtol=1e-5)
    np.testing.assert_allclose(m1, [0.05], rtol=1e-6)
    np.testing.assert_allclose(m2, [0.03, 0.04], rtol=1e-6)
    np.testing.assert_allclose(r0, 0.0, atol=1e-6)
    np.testing.assert_allclose(r1, 2 * np.log(4 / 3), rtol=1e-5)  # mean D 2/3
    np.testing.assert_allclose(x_seen[:2, 0], [0.5, 0.55], atol=1e-6)
    np.testing.assert_array_equal(restart, [False, True, False, False, False])
    assert int(t_next) == 4 and abs(float(x_seen[2, 0]) - 0.6) > 1e-3
    assert bool(restart_top[0])

def test_discriminator_round_rewards_before_and_scores_after_its_steps():
    """One proposal step of the discriminator (disc_round, as `update` runs it): the rewards
    use D before the round's Adam steps, the logged D(randomized) and D(reference) both use
    D after them ([1] code: get_score after train_discriminator). Same 2 x 3 transitions in
    both classes, final bias 3 (D 0.952 at first), 3 steps of lr 0.1: the two scores are
    equal (0.542); with D(randomized) taken before the steps, 0.952 vs 0.542 (fails)."""
    cfg = dataclasses.replace(TINY, disc_iterations=3, disc_batch=4, disc_lr=0.1)
    _, _, _, _, disc, _, _, d_tx = adr.parts(cfg)
    f = jax.random.normal(jax.random.PRNGKey(1), (1, 2, 3, 10))
    f = jnp.concatenate([f, f])  # [2 classes, n = 2, T = 3, F]

    def case():
        params = disc.init(jax.random.PRNGKey(2), f[0, 0])
        params["params"]["Dense_2"]["bias"] = jnp.full((1,), 3.0)
        carry = (params, d_tx.init(params))
        _, (rewards, _, p_rand, p_ref) = adr.disc_round(cfg, disc, d_tx, 1.0, carry, f,
                                                        jax.random.PRNGKey(3))
        return rewards, jax.nn.sigmoid(disc.apply(params, f[0])).mean(-1), p_rand, p_ref

    rewards, before, p_rand, p_ref = compiled(case)
    print("D before:", before, "after (randomized, reference):", p_rand, p_ref)
    np.testing.assert_allclose(rewards, np.log(before / 0.5), rtol=1e-5)
    np.testing.assert_allclose(p_rand, p_ref, rtol=1e-6)
    assert float(p_ref) < float(before.mean()) - 0.02  # the steps moved D


def test_svpg_particles_concentrate_on_the_reward_argmax():
    """SVPG through propose, particle_losses, svpg_direction and Adam (svpg_update, as
    `update` runs it) with a known reward and no discriminator: alpha = 1e-3, so the
    kernel's repulsive term vanishes next to grad J / alpha; 4 particles, lr 1e-2, moves of
    0.2, 300 steps. Reward r = x - 1 (argmax x = 1) or r = -x (argmax 0), both <= 0 so
    that ending a particle's run early never pays on its own. Mean proposed x over the
    last 75 steps, 6 keys: 0.49-0.73 for r = x - 1, 0.265-0.282 for r = -x; with the
    actors descending phi (the sign flipped) the arms swap (fails). Checked on 2 keys."""
    cfg = dataclasses.replace(TINY, temperature=1e-3, particle_lr=1e-2)
    _, _, actor, critic, _, _, p_tx, _ = adr.parts(cfg)
    n, steps = cfg.num_particles, 300

    def train(sign, key):  # r = sign x - (1 + sign) / 2
        k_a, k_c, k_x, key = jax.random.split(key, 4)
        actors = jax.vmap(actor.init, (0, None))(jax.random.split(k_a, n), jnp.zeros(1))
        critics = jax.vmap(critic.init, (0, None))(jax.random.split(k_c, n), jnp.zeros(1))
        prop = jax.vmap(lambda p, k, x, t: adr.propose(cfg, lambda z: actor.apply(p, z), k,
                                                       x, t))

        def step(carry, k):
            particles, x, t = carry
            (x_next, t_next), (xs, acts, restart) = prop(particles[0], jax.random.split(k, n),
                                                         x, t)
            r = sign * xs[..., 0] - (1 + sign) / 2
            particles = adr.svpg_update(cfg, actor, critic, p_tx, particles, xs, acts,
                                        restart, r, x_next)[0]
            return (particles, x_next, t_next), xs[..., 0].mean()

        particles = (actors, p_tx.init(actors), critics, p_tx.init(critics))
        init = (particles, jax.random.uniform(k_x, (n, 1)), jnp.zeros(n, jnp.int32))
        return jax.lax.scan(step, init, jax.random.split(key, steps))[1]

    keys = jax.random.split(jax.random.PRNGKey(0), 6)[:2]
    mean_x = compiled(jax.vmap(jax.vmap(train, (None, 0)), (0, None)),
                      jnp.array([1.0, -1.0]), keys)  # XLA's lowest level: compile dominates
    late = np.asarray(mean_x)[:, :, -steps // 4:].mean(-1)  # [arm, key]
    print("late mean x (r = x - 1, r = -x) x keys:", late)
    assert (late[0] > late[1] + 0.15).all(), late
    assert late[0].mean() > 0.5 and late[1].mean() < 0.35, late


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """TINY through the CLI: 2 seeds, its 8 updates in one chunk compiled at -O0 (about half
    the compile time of the default level), the compiled chunk kept."""
    return main_recording_chunks(adr.main, cli_args(TINY, adr.Config()) + [
        "--num-seeds", str(SEEDS), "--log-every", str(CHUNK), "--no-progress",
        "--fast-compile",
        "--run-dir", str(tmp_path_factory.mktemp("active_dr"))])


def test_train_is_pure_and_cli_writes_its_files(tiny_run, capsys):
    """The CLI trains 2 seeds in one vmapped program; rerunning its chunk on the same input
    gives bit-identical params and metrics; the seeds differ; evaluate() reports every
    condition (gap = in_dist - target); the proposal density sums to 1; --help documents
    every field."""
    (res, [(chunk, states)]) = tiny_run
    again, metrics = chunk(jax.tree.map(jnp.copy, states))
    jax.tree.map(np.testing.assert_array_equal, res.state.actors, again.actors)
    jax.tree.map(np.testing.assert_array_equal, res.state.agent, again.agent)
    for k, v in metrics.items():
        if k != "charts/episodic_return":  # the runner NaNs it where no episode ended
            np.testing.assert_array_equal(res.history[k], v, err_msg=k)
    assert not np.array_equal(res.history["losses/value"][0], res.history["losses/value"][1])
    for k in ("eval/in_dist", "eval/nominal", "eval/target", "eval/gap", "grid/00", "grid/01"):
        assert res.final[k].shape == (SEEDS,) and np.isfinite(res.final[k]).all(), k
    np.testing.assert_allclose(res.final["eval/gap"],
                               res.final["eval/in_dist"] - res.final["eval/target"])
    dens = sum(res.history[f"charts/density_length_{b:02d}"] for b in range(4))
    np.testing.assert_allclose(dens, 1.0, rtol=1e-6)
    assert (res.run_dir / "metrics.jsonl").exists()
    with pytest.raises(SystemExit):
        adr.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(adr.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name


def test_particle_critic_does_not_learn_through_its_bootstrap_target():
    """The returns are targets ([1] code: returns.detach()): with a constant critic V = w = 1,
    rewards (1, 2, 3), no restart, gamma 0.99, R = (6.890599, 5.9501, 3.99) and
    d(0.5 mean (R - w)^2)/dw = -mean(R - w) = -4.6102. Differentiating through the
    bootstrap V(x_last) gives -0.101 (fails here)."""
    actor = lambda x: (jnp.zeros(x.shape), jnp.zeros(x.shape[-1:]))

    def value_loss(w):
        critic = lambda x: jnp.full(x.shape[:-1], w)
        return adr.particle_losses(TINY, actor, critic, jnp.zeros((3, 1)), jnp.zeros((3, 1)),
                                   jnp.zeros(3, bool), jnp.array([1.0, 2.0, 3.0]),
                                   jnp.zeros(1))[1]

    g = jax.jit(jax.grad(value_loss))(1.0)
    np.testing.assert_allclose(g, -np.mean(np.array([6.890599, 5.9501, 3.99]) - 1.0),
                               rtol=1e-5)


def test_discriminator_reward_moves_particles_away_from_the_reference(tiny_run):
    """Behaviour ([1] Sec. 4): the reference (nominal length) sits at x = 0, so the most
    distinguishable instances are at x -> 1. Both arms start from the CLI's 2 seeds and run
    its compiled chunk 5 x 8 = 40 updates; the broken arm has the reward sign flipped
    (c = -1: it rewards instances the discriminator cannot tell from the reference).
    Mean proposed x over updates 21-40, seeds 0 / 1: 0.548 / 0.494 with the reward, 0.469
    / 0.381 flipped (each seed's difference 0.08 / 0.11: the check asks for > 0 per seed
    and > 0.05 on the mean, about half the measured margin). The discriminator learns in
    both arms: D on randomized minus reference 0.69 / 0.67 and 0.45 / 0.34, both scored
    after the round's steps."""
    (_, [(chunk, states)]) = tiny_run
    xs, d_gap = [], []
    for c in (1.0, -1.0):
        s = jax.tree.map(jnp.copy, states).replace(reward_scale=jnp.full(SEEDS, c))
        x, g = [], []
        for _ in range(5):
            s, m = chunk(s)
            x.append((np.asarray(m["charts/proposal_mean_length"]) - 1.0) / 3.0)
            g.append(np.asarray(m["charts/d_randomized"] - m["charts/d_reference"]))
        xs.append(np.concatenate(x[2:], 1).mean(1))
        d_gap.append(np.concatenate(g, 1)[:, -8:].mean(1))
    late, gap = np.stack(xs), np.stack(d_gap)  # [arm, seed]
    print("mean proposed x (reward, flipped) x seeds:", late, "D(rand) - D(ref):", gap)
    assert (late[0] > late[1]).all() and late[0].mean() > late[1].mean() + 0.05, late
    assert (gap > 0.1).all(), gap


def test_bad_values_fail_with_named_field(tmp_path):
    for flags, msg in ((["--temperature", "0"], "temperature=0.0"),
                       (["--num-particles", "2"], "num_particles=2"),
                       (["--multiplier-min", "2.0"], r"multiplier_min=\(2.0,\) must be <"),
                       (["--target", "1.0", "2.0"], r"target=\(1.0, 2.0\)"),
                       (["--mode", "active"], "mode='active'"),
                       (["--max-step-length", "1.5"], "max_step_length=1.5"),
                       (["--particle-lr", "0"], "particle-lr"),
                       (["--particle-gamma", "1.5"], "particle_gamma=1.5"),
                       (["--density-bins", "0"], "density_bins=0"),
                       (["--eval-episodes", "0"], "eval_episodes=0")):
        with pytest.raises(ValueError, match=msg):
            adr.main(flags + ["--run-dir", str(tmp_path)])


def test_every_config_field_is_read():
    assert unread_fields(adr) == []


def test_paper_preset_traces():
    """eval_shape of init and one update under the paper preset (Pendulum-v1 max_torque,
    10 particles x 5 instances x 200 steps, one discriminator step per agent step)."""
    cfg, state, (after, metrics) = trace_paper(adr)
    assert cfg.env_id == "Pendulum-v1" and cfg.num_particles == 10 and cfg.temperature == 10
    assert state.x.shape == (10, 1) and cfg.steps_per_update == 10_000
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
