"""Tests of exploration/icm.py: the inverse and forward losses and the curiosity reward by
hand, where the gradients go (L_F must not train phi, L_I must), the Bonus that common.rl's
PPO trains, behaviour against the same PPO without the bonus, purity, CLI and the paper
preset."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import run
from exploration import icm
from tests.common.compiled import main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# One tiny configuration on the repo's own 4-rooms grid (vector observations).
TINY = icm.Config(**icm.PRESETS["quick"])  # the quick preset: 8 envs x 32 steps x 8 updates


def _tiny_icm():
    net = icm.ICM(num_actions=3, pixels=False, encoder_hidden=(8,), features=4, hidden=8)
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    obs, nxt = jax.random.normal(k[0], (5, 2)), jax.random.normal(k[1], (5, 2))
    action = jnp.array([0, 1, 2, 1, 0])
    return net, jax.jit(net.init)(k[2], obs, nxt, action), obs, nxt, action


def test_inverse_forward_losses_and_reward_by_hand():
    """[1] Eqs. 3, 5, 6 by hand, B = 3, mask [1, 1, 0] (the last sample is an episode end).

    inverse: logits [[0, ln 3], [ln 2, 0], [9, 9]], actions [1, 0, 0]:
        p(a) = 3/4 and 2/3  ->  L_I = (-ln 3/4 - ln 2/3) / 2 = 0.346574   (unmasked: 0.462)
    forward: phi_hat - phi' = [[1, 2], [0, -2], [5, 5]]:
        1/2 ||.||^2 = [2.5, 2, 25]  ->  L_F = 2.25   (a mean over features would give 1.125)
    reward: eta = 0.1  ->  r^i = 0.05 ||.||^2 = [0.25, 0.2, 2.5]
    """
    logits = jnp.array([[0.0, np.log(3.0)], [np.log(2.0), 0.0], [9.0, 9.0]])
    action, mask = jnp.array([1, 0, 0]), jnp.array([True, True, False])
    np.testing.assert_allclose(icm.inverse_loss(logits, action, mask),
                               (-np.log(0.75) - np.log(2 / 3)) / 2, rtol=1e-6)
    phi_next = jnp.array([[0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    phi_hat = phi_next + jnp.array([[1.0, 2.0], [0.0, -2.0], [5.0, 5.0]])
    np.testing.assert_allclose(icm.forward_loss(phi_hat, phi_next, mask), 2.25, rtol=1e-6)
    np.testing.assert_allclose(icm.curiosity(phi_hat, phi_next, 0.1), [0.25, 0.2, 2.5],
                               rtol=1e-6)
    assert icm.forward_loss(phi_hat, phi_next, jnp.zeros(3, bool)) == 0.0  # no NaN


def test_icm_loss_and_reward_compose_the_networks():
    """`icm_loss` = (1 - beta) L_I + beta L_F on g(phi(s), phi(s')) and f(phi(s), a), and
    `intrinsic_reward` = eta/2 ||f(phi(s), a) - phi(s')||^2, zero where done; each checked
    against the sub-networks applied one by one."""
    net, params, obs, nxt, action = _tiny_icm()
    mask = jnp.array([True, True, True, False, True])

    @jax.jit
    def both(params):  # one compile: the file's functions and the pieces one by one
        phi = net.apply(params, obs, method=icm.ICM.encode)
        phi_next = net.apply(params, nxt, method=icm.ICM.encode)
        logits = net.apply(params, phi, phi_next, method=icm.ICM.inverse)
        phi_hat = net.apply(params, phi, action, method=icm.ICM.forward)
        pieces = (icm.inverse_loss(logits, action, mask),
                  icm.forward_loss(phi_hat, phi_next, mask), phi_hat, phi_next)
        got = icm.icm_loss(params, net, obs, nxt, action, mask, beta=0.2,
                           stop_gradient_forward=True)
        return pieces, got, icm.intrinsic_reward(params, net, obs, nxt, action, ~mask, eta=0.01)

    (l_i, l_f, phi_hat, phi_next), (total, got_i, got_f), r = both(params)
    np.testing.assert_allclose([got_i, got_f], [l_i, l_f], rtol=1e-6)
    np.testing.assert_allclose(total, 0.8 * l_i + 0.2 * l_f, rtol=1e-6)
    expect = 0.005 * ((np.asarray(phi_hat) - np.asarray(phi_next)) ** 2).sum(-1)
    np.testing.assert_allclose(r, np.where(mask, expect, 0.0), rtol=1e-5)
    assert r[3] == 0.0 and (r[mask] > 0).all()


def test_forward_loss_does_not_train_the_encoder_inverse_loss_does():
    """[1] Sec. 2.2: phi is learned through the inverse model only. beta = 1 isolates L_F:
    its gradient reaches f and not phi (nor g); with `stop_gradient_forward=False` (the
    released code's coupling, the broken variant here) it reaches phi. beta = 0 isolates L_I:
    its gradient reaches phi and g, not f."""
    net, params, obs, nxt, action = _tiny_icm()
    mask = jnp.ones(5, bool)

    def grads(beta, sg):
        return jax.grad(lambda p: icm.icm_loss(p, net, obs, nxt, action, mask, beta=beta,
                                               stop_gradient_forward=sg)[0])(params)["params"]

    def norm(tree):
        return float(sum(jnp.abs(x).sum() for x in jax.tree.leaves(tree)))

    g_fwd, g_coupled, g_inv = jax.jit(
        lambda: (grads(1.0, True), grads(1.0, False), grads(0.0, True)))()
    assert norm(g_fwd["phi"]) == 0.0 and norm(g_fwd["g"]) == 0.0 and norm(g_fwd["f"]) > 0
    assert norm(g_coupled["phi"]) > 0  # the broken variant trains phi with L_F
    assert norm(g_inv["phi"]) > 0 and norm(g_inv["g"]) > 0 and norm(g_inv["f"]) == 0.0


def test_bonus_divides_the_icm_loss_by_lambda_and_masks_episode_ends():
    """The Bonus `update` trains: loss = ((1 - beta) L_I + beta L_F) / lambda on the samples
    that are not episode ends (Eq. 7 divided by lambda); reward = `intrinsic_reward` with
    the eta that `init` puts in the Bonus statistics (cfg.eta)."""
    net, params, obs, nxt, action = _tiny_icm()
    done = jnp.array([False, True, False, False, False])
    cfg = dataclasses.replace(TINY, beta=0.3, policy_weight=0.25, eta=0.5)
    bonus = icm.make_bonus(cfg, net)
    mb = dict(obs=obs, next_obs=nxt, action=action, done=done)
    loss, m = bonus.loss(params, None, mb)
    total, l_i, l_f = icm.icm_loss(params, net, obs, nxt, action, ~done, beta=0.3,
                                   stop_gradient_forward=True)
    np.testing.assert_allclose(loss, total / 0.25, rtol=1e-6)
    np.testing.assert_allclose([m["losses/inverse"], m["losses/forward"]], [l_i, l_f])
    r, eta = bonus.reward(params, jnp.float32(0.5), mb)
    np.testing.assert_allclose(r, icm.intrinsic_reward(params, net, obs, nxt, action, done,
                                                       eta=0.5))
    assert eta == 0.5  # passed through; init's value is cfg.eta (test_train_is_pure)


SEEDS = 8
RUN_ARGS = ["--preset", "quick", "--num-seeds", str(2 * SEEDS), "--log-every", "8",
            "--no-progress"]


def _run(run_dir):
    """The quick preset through `icm.main`, 2 x SEEDS seeds in ONE compiled program: seeds
    SEEDS.. are the broken variant, the same PPO with the bonus off (eta = 0, a traced
    statistic of the Bonus; the ICM still trains), each on the key of its ICM twin."""
    keys = jax.random.split(jax.random.PRNGKey(0), 2 * SEEDS)  # the runner's seed keys
    real = icm.init

    def init(key, cfg):
        i = jnp.argmax(jnp.all(key == keys, -1))
        state = real(keys[i % SEEDS], cfg)
        return state.replace(bonus_stats=jnp.where(i >= SEEDS, 0.0, state.bonus_stats))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(icm, "init", init)
        return main_recording_chunks(icm.main, RUN_ARGS + ["--run-dir", str(run_dir)])


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """(the run, its compiled chunks with their recorded inputs)"""
    return _run(tmp_path_factory.mktemp("icm"))


@pytest.fixture(scope="module")
def quick_run(recorded):
    return recorded[0]


def test_icm_explores_more_than_ppo(quick_run):
    """Behaviour ([1] Sec. 4.2, coverage) in seconds: FourRooms (104 floor cells, start in
    one corner room, the only reward in the opposite one), the quick preset's 8 envs x 32
    steps x 8 updates = 2048 steps, 8 seeds. ICM (eta = 1) against the broken variant, the
    same PPO with the bonus off (eta = 0, same keys), in one compiled run of the CLI.
    Distinct cells visited, measured on a 2-core CPU (jax 0.10.2):
        ICM  86 88 90 99 83 79 89 89   median 88.5, mean 87.9, 0 below 75
        PPO  57 97 74 97 42 71 70 60   median 70.5, mean 71.0, 6 below 75
    (12 seeds while calibrating: ICM 89.5 / 89.8, PPO 69 / 70.7.) Half the PPO seeds stay
    near the first room. The broken variant fails all three asserts (gaps 0); so does ICM
    when the Bonus ignores its traced eta (mutation: both halves run ICM)."""
    cells = quick_run.history["charts/distinct_cells"][:, -1]
    on, off = cells[:SEEDS], cells[SEEDS:]
    print("ICM", on, "PPO", off)
    assert np.median(on) >= np.median(off) + 8, (on, off)
    assert on.mean() >= off.mean() + 8, (on, off)
    assert (off < 75).sum() >= (on < 75).sum() + 3, (on, off)  # seeds stuck near the start
    np.testing.assert_array_equal(quick_run.final["distinct_cells"], cells)


def test_train_is_pure(recorded):
    """The runner's compiled chunk (the whole run) again on its recorded input gives
    bit-identical params and metrics (no tracing, no compiling); different seeds differ;
    the metrics are finite."""
    quick_run, chunks = recorded
    h = quick_run.history
    for k in ("losses/inverse", "losses/forward", "charts/intrinsic_reward"):
        assert np.isfinite(h[k]).all() and h[k].shape == (2 * SEEDS, 8), k
    assert (h["charts/intrinsic_reward"][SEEDS:] == 0).all()  # eta = 0: no bonus
    assert (h["charts/intrinsic_reward"][:SEEDS] > 0).all()
    np.testing.assert_array_equal(quick_run.state.bonus_stats, [TINY.eta] * SEEDS + [0] * SEEDS)
    assert not np.array_equal(h["losses/forward"][0], h["losses/forward"][1])
    assert len(chunks) == 1
    state, metrics = jax.device_get(chunks[0][0](chunks[0][1]))
    jax.tree.map(np.testing.assert_array_equal, quick_run.state.params, state.params)
    np.testing.assert_array_equal(h["losses/forward"], metrics["losses/forward"])


def test_cli_run_writes_its_files(quick_run, capsys):
    """`--help` documents every field; the quick run wrote its files and summary."""
    with pytest.raises(SystemExit):
        icm.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(icm.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out
    assert (quick_run.run_dir / "metrics.jsonl").exists()
    assert (quick_run.run_dir / "checkpoints").exists()
    assert quick_run.history["charts/distinct_cells"].shape == (2 * SEEDS, 8)


def test_cli_flags_reach_the_tested_functions(monkeypatch):
    """The flags, parsed as the CLI parses them, reach `icm_loss` and `intrinsic_reward`
    in the traced `update` (spies record each call; `jax.eval_shape`, nothing compiles);
    --no-extrinsic-reward zeroes the PPO's ext_coef."""
    calls: dict[str, list] = {}
    for name in ("icm_loss", "intrinsic_reward"):
        real = getattr(icm, name)

        def wrapped(*args, _real=real, _name=name, **kwargs):
            calls.setdefault(_name, []).append(kwargs)
            return _real(*args, **kwargs)

        monkeypatch.setattr(icm, name, wrapped)
    cfg, _ = run.parse(icm.Config, icm.PRESETS, [
        "--preset", "quick", "--beta", "0.4", "--eta", "0.05", "--no-stop-gradient-forward",
        "--no-extrinsic-reward"])
    state = jax.eval_shape(lambda k: icm.init(k, cfg), jax.random.PRNGKey(0))
    assert state.bonus_stats.shape == ()
    jax.eval_shape(lambda s: icm.update(s, cfg), state)
    assert calls["icm_loss"] and calls["intrinsic_reward"]
    assert all(kw == {"beta": 0.4, "stop_gradient_forward": False} for kw in calls["icm_loss"])
    assert len(calls["intrinsic_reward"]) == 1
    assert icm.ppo_config(cfg).ext_coef == 0.0
    assert cfg.eta == 0.05  # the Bonus starts from cfg.eta (test_bonus_divides_...)


def test_ppo_config_carries_the_fields():
    """The PPO learner gets the file's values; the no-reward setting zeroes ext_coef."""
    p = icm.ppo_config(dataclasses.replace(TINY, extrinsic_reward=False))
    assert (p.ext_coef, p.int_coef, p.anneal_lr) == (0.0, 1.0, False)
    assert (p.num_envs, p.num_steps, p.lr, p.gae_lambda) == (8, 32, 1e-3, 0.95)
    assert icm.ppo_config(TINY).ext_coef == 1.0


def test_bad_values_fail_with_named_field(tmp_path):
    with pytest.raises(ValueError, match="not divisible by num_minibatches=3"):
        icm.main(["--num-minibatches", "3", "--env-id", "GridMaze-FourRooms", "--num-envs",
                  "8", "--num-steps", "16", "--run-dir", str(tmp_path)])
    for flag, value, field in (("--beta", "1.5", "beta"), ("--policy-weight", "0", "lambda"),
                               ("--eta", "-1", "eta")):
        with pytest.raises(ValueError, match=field if field != "lambda" else "policy.weight"):
            icm.main([flag, value, "--run-dir", str(tmp_path)])


def test_every_config_field_is_read():
    """No flag that lies: each Config field is read by code that runs (AST, not text)."""
    assert unread_fields(icm) == []


def test_paper_preset_traces():
    """jax.eval_shape of init and one update under the `paper` preset (Montezuma's Revenge
    through envpool at 42x42 grey, 4 frames, 20 envs): nothing runs."""
    cfg, state, (after, metrics) = trace_paper(icm)
    assert state.obs.shape == (20, 4, 42, 42)
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
    phi = state.params["bonus"]["params"]["f"]["layers_2"]["kernel"]
    assert phi.shape == (256, 288)  # f outputs the 288-d phi of [1] Sec. 3
