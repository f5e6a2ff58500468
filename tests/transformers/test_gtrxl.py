"""Tests of transformers/gtrxl.py: the GRU gate (identity at init, hand formula), causality
for every layer variant, rollout == one segment pass (== PPO's recomputed log-probs), no
attention across an episode reset, memory beats no memory on MemoryChain, purity, CLI."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import run
from tests.common import preset
from tests.common.compiled import compiled
from tests.common.config_fields import unread_fields
from tests.transformers import leak
from transformers import gtrxl as G

TINY = G.Config(memory_length=3, n_layer=2, d_model=16, n_head=2, d_head=8, d_inner=32,
                mem_len=4, num_envs=4, num_steps=6, total_timesteps=3 * 24, num_epochs=2,
                num_minibatches=2)


def _gate(bg, d=64):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(k1, (256, d))  # the stream
    y = jax.nn.relu(jax.random.normal(k2, (256, d)))  # a ReLU'd sub-layer output
    gate = G.GRUGate(d, bg)
    p = compiled(lambda k_: gate.init(k_, x, y), k3)["params"]
    return gate, p, x, y


def test_gate_is_near_identity_at_init_with_positive_bias():
    """g(x, y) - x = z * (h - x) with z = sigmoid(W_z y + U_z x - b_g). At init the
    pre-activation is about N(-b_g, s^2), so z is about sigmoid(-b_g) (a bit above it by
    convexity) and the relative change is about z * |h - x| / |x|. Measured
    ||g - x|| / ||x||: 0.066 (b_g=4), 0.26 (b_g=2), 0.63 (b_g=0); mean z 0.032 / 0.163 /
    0.486 against sigmoid(-b_g) = 0.018 / 0.119 / 0.5."""
    ratio, zbar = {}, {}
    for bg in (4.0, 2.0, 0.0):
        gate, p, x, y = _gate(bg)
        g = gate.apply({"params": p}, x, y)
        ratio[bg] = float(jnp.linalg.norm(g - x) / jnp.linalg.norm(x))
        z = jax.nn.sigmoid(y @ p["W_z"]["kernel"] + x @ p["U_z"]["kernel"] - p["b_g"])
        zbar[bg] = float(z.mean())
        sig = float(jax.nn.sigmoid(-bg))
        assert sig - 0.03 < zbar[bg] < sig + 0.08, (bg, zbar[bg], sig)
        # |h - x| <= 1 + |x| elementwise, so the change is bounded by z's size
        bound = float(jnp.linalg.norm(z * (1 + jnp.abs(x))) / jnp.linalg.norm(x))
        assert ratio[bg] <= bound + 1e-6
    assert ratio[2.0] < 0.35, ratio
    assert ratio[4.0] < ratio[2.0] < 0.5 * ratio[0.0], ratio


def test_gate_equals_hand_computed_gru():
    """The module equals r, z, h, g of [1] Sec. 3.2 computed in numpy from its params (with
    a non-trivial b_g and weights scaled up so every gate is away from 0 and 1)."""
    gate, p, x, y = _gate(1.5, d=8)
    p = jax.tree.map(lambda w: 2.0 * w, p)
    P = {k: np.asarray(v["kernel"] if isinstance(v, dict) else v, np.float64)
         for k, v in p.items()}
    xn, yn = np.asarray(x[:16], np.float64), np.asarray(y[:16], np.float64)
    sig = lambda a: 1 / (1 + np.exp(-a))
    r = sig(yn @ P["W_r"] + xn @ P["U_r"])
    z = sig(yn @ P["W_z"] + xn @ P["U_z"] - P["b_g"])
    h = np.tanh(yn @ P["W_g"] + (r * xn) @ P["U_g"])
    want = (1 - z) * xn + z * h
    got = gate.apply({"params": p}, x[:16], y[:16])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert 0.05 < z.mean() < 0.95 and np.abs(want - xn).max() > 0.1


def test_open_gates_make_the_stack_the_identity_on_the_embedded_stream():
    """Identity-map reordering + gating at network level: with b_g = +50 every update gate
    z = sigmoid(. - 50) ~ 1e-22, so g(x, y) = x and the 2-layer stack passes the embedded
    observations relu(W_e o) through unchanged (the LayerNorms sit only on the sub-layer
    inputs): the output before the heads equals the embedded input, and the policy logits
    are the head applied to it. Not so with the canonical post-LN ordering (x = LN(x + .),
    measured diff ~1) or with gates partly open (b_g = 0). A LayerNorm after the residual
    (reordering broken) fails it."""
    L, M = 6, 4
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    obs = jax.random.normal(k1, (2, L, 5))
    mems = jax.random.normal(k2, (2, 2, M, 16))
    ep_m, ep_q, dist = jnp.zeros((2, M), jnp.int32), jnp.zeros((2, L), jnp.int32), M + jnp.arange(L)

    def stack(gating, gate_bias):
        model = G.GTrXL(num_actions=3, n_layer=2, d_model=16, n_head=2, d_head=8, d_inner=32,
                        gating=gating, gate_bias=gate_bias)
        params = compiled(lambda k_: model.init(k_, obs, mems, ep_m, ep_q, dist),
                          jax.random.PRNGKey(1))["params"]
        (logits, _, inputs), inter = model.apply(
            {"params": params}, obs, mems, ep_m, ep_q, dist, mutable=["intermediates"],
            capture_intermediates=lambda mdl, _: isinstance(mdl, G.GTrXLLayer))
        out = inter["intermediates"]["layer_1"]["__call__"][0]  # the stack's output
        embedded = inputs[0]  # relu(W_e o), the first layer's input
        np.testing.assert_allclose(embedded, jax.nn.relu(
            obs @ params["embed"]["kernel"] + params["embed"]["bias"]), atol=1e-6)
        head = out @ params["pi"]["kernel"] + params["pi"]["bias"]
        np.testing.assert_allclose(logits, head, atol=1e-5)
        return float(jnp.abs(out - embedded).max()), float(jnp.abs(embedded).max())

    diff, scale = stack("gru", 50.0)
    assert scale > 0.5 and diff < 1e-6, (diff, scale)
    assert stack("post_ln", 50.0)[0] > 0.1
    assert stack("gru", 0.0)[0] > 0.05


@pytest.mark.parametrize("gating", ["gru", "none", "post_ln"])
def test_no_future_leak_and_mask_off_leaks(gating):
    """Outputs at steps < t do not depend on observations at steps >= t (one-hot obs,
    memory of 4 random steps of the same episode); with every key visible they do."""
    V, L, M = 7, 8, 4
    model = G.GTrXL(num_actions=3, n_layer=2, d_model=16, n_head=2, d_head=8, d_inner=32,
                    gating=gating)
    mems = jax.random.normal(jax.random.PRNGKey(3), (2, 2, M, 16))
    ep_m, ep_q = jnp.zeros((2, M), jnp.int32), jnp.zeros((2, L), jnp.int32)
    dist = M + jnp.arange(L)
    obs = lambda tok: jax.nn.one_hot(tok, V)
    params = compiled(lambda k_: model.init(k_, obs(jnp.zeros((2, L), int)), mems, ep_m, ep_q,
                        dist), jax.random.PRNGKey(0))["params"]
    params = jax.tree.map(lambda w: 3.0 * w, params)  # open the gates: attention matters

    def out(tok, mask=None):
        logits, value, _ = model.apply({"params": params}, obs(tok), mems, ep_m, ep_q, dist,
                                       mask)
        return jnp.concatenate([logits, value[..., None]], -1)

    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, L), 0, V)
    leak.assert_no_future_leak(jax.jit(out), tokens, 5, V)
    everything = jnp.ones((2, L, M + L), bool)
    leak.assert_leaks(jax.jit(lambda t: out(t, everything)), tokens, 5, V)


def test_no_attention_across_an_episode_reset():
    """A query of episode 1 is blind to the memory and to segment steps of episode 0:
    changing them leaves its outputs unchanged; relabelled as episode 0 they matter."""
    L, M = 6, 4
    model = G.GTrXL(num_actions=3, n_layer=2, d_model=16, n_head=2, d_head=8, d_inner=32)
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    obs = jax.random.normal(k1, (1, L, 5))
    mems = jax.random.normal(k2, (2, 1, M, 16))
    ep_q = jnp.array([[0, 0, 1, 1, 1, 1]])  # a reset between steps 1 and 2
    ep_m, dist = jnp.zeros((1, M), jnp.int32), M + jnp.arange(L)
    params = compiled(lambda k_: model.init(k_, obs, mems, ep_m, ep_q, dist), k3)["params"]
    params = jax.tree.map(lambda w: 3.0 * w, params)
    f = jax.jit(lambda o, m, e: model.apply({"params": params}, o, m, ep_m, e, dist)[0])
    base = f(obs, mems, ep_q)
    other_obs = obs.at[:, :2].add(1.0)  # episode 0's steps in the segment
    other_mem = mems + 1.0  # episode 0's memory
    np.testing.assert_array_equal(f(other_obs, other_mem, ep_q)[:, 2:], base[:, 2:])
    assert np.abs(f(other_obs, other_mem, ep_q)[:, :2] - base[:, :2]).max() > 1e-3
    same_ep = jnp.zeros_like(ep_q)  # without the reset the same change reaches step 2..5
    diff = f(other_obs, other_mem, same_ep) - f(obs, mems, same_ep)
    assert np.abs(diff[:, 2:]).max() > 1e-3


@pytest.mark.parametrize("gating", ["gru", "post_ln"])
def test_rollout_equals_one_segment_pass(gating):
    """Step-by-step acting (one query per step over a rolling cache) equals the PPO
    update's single pass over the segment from the stored memory: log-probs of the taken
    actions and values agree to float precision, over two consecutive segments whose
    4-step episodes reset inside the segment and across the memory. Measured ~1e-6."""
    cfg = dataclasses.replace(TINY, gating=gating)
    env = G._env(cfg)
    state = compiled(lambda k_: G.init(k_, cfg), jax.random.PRNGKey(0))
    params = jax.tree.map(lambda w: w + 0.3 * jax.random.normal(jax.random.PRNGKey(5),
                                                                 w.shape), state.params)

    @jax.jit
    def segment(state):
        traj, last_value, (env_state, obs, ep, key), (mems, mem_ep) = G.rollout(
            params, state, cfg)
        logits, value = G.segment_forward(
            params, cfg, env.num_actions, traj["obs"].swapaxes(0, 1), state.mems,
            state.mem_ep, traj["ep"].swapaxes(0, 1))
        logp, _ = G.log_prob_entropy(logits, traj["action"].swapaxes(0, 1))
        new = state.replace(env_state=env_state, obs=obs, ep=ep, key=key, mems=mems,
                            mem_ep=mem_ep)
        return new, traj, logp.swapaxes(0, 1), value.swapaxes(0, 1)

    for _ in range(2):
        state_before = state
        state, traj, logp, value = segment(state)
        np.testing.assert_allclose(logp, traj["logp"], atol=2e-5)
        np.testing.assert_allclose(value, traj["value"], atol=2e-5)
    assert traj["done"].any() and (state_before.mem_ep >= 0).all()  # resets; a full memory
    assert np.abs(np.asarray(traj["logp"]) - np.log(0.5)).max() > 1e-3  # not a flat policy


def test_memory_agent_learns_a_short_memory_chain_short():
    """Short behaviour test: MemoryChain with 4 steps to remember one bit, 1 layer of d=16,
    T = M = 8, 32 envs, 25 PPO updates. Success over the last 5 updates, measured: GTrXL
    0.93 vs 0.44 for the same agent with memory=False (chance 0.5)."""
    success = {}
    for memory in (True, False):
        cfg = G.Config(**{**G.PRESETS["quick"], "memory_length": 4, "d_model": 16,
                          "d_head": 8, "d_inner": 32, "mem_len": 8, "num_envs": 32,
                          "num_steps": 8, "num_minibatches": 2, "memory": memory})
        _, m = jax.jit(run.make_train(G.init, G.update, cfg, num_updates=25))(
            jax.random.PRNGKey(0))
        m = run.mark_undefined(jax.device_get(m), G.NAN_UNLESS)
        success[memory] = float(np.nanmean(np.asarray(m["charts/success"])[-5:]))
    assert success[True] > 0.8, success
    assert success[False] < 0.65, success

@pytest.mark.slow
def test_memory_agent_solves_memory_chain_and_memoryless_agent_cannot():
    """Behaviour (quick preset: MemoryChain, remember one bit for 8 steps; 1 layer, d=32,
    T=M=16, 64 envs, 40 PPO updates = 41k steps). GTrXL: success 0.81 over the last 10
    updates on this repo's 2-core CI machine (0.97 on the machine where the gate was first
    calibrated, with the same code and lock file: XLA:CPU sums in another order); the same
    agent with memory=False (each step attends only to itself) stays at chance: 0.53 on
    both. ~76 s on a loaded 2-core CPU (two compiles)."""
    success = {}
    for memory in (True, False):
        cfg = G.Config(**{**G.PRESETS["quick"], "memory": memory})
        _, m = jax.jit(run.make_train(G.init, G.update, cfg, num_updates=40))(
            jax.random.PRNGKey(0))
        m = run.mark_undefined(jax.device_get(m), G.NAN_UNLESS)
        success[memory] = float(np.nanmean(np.asarray(m["charts/success"])[-10:]))
    assert success[True] > 0.72, success
    assert success[False] < 0.65, success
    assert success[True] > success[False] + 0.2, success


def test_train_is_pure_and_seeded():
    cfg = dataclasses.replace(TINY, n_layer=1, num_epochs=1)
    train = jax.jit(jax.vmap(run.make_train(G.init, G.update, cfg)))
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    (s1, m1), (s2, m2) = train(keys), train(keys)
    a = jax.tree.leaves(s1.params)[0]
    np.testing.assert_array_equal(a, jax.tree.leaves(s2.params)[0])
    np.testing.assert_array_equal(s1.mems, s2.mems)
    np.testing.assert_array_equal(m1["losses/policy"], m2["losses/policy"])
    assert not np.array_equal(a[0], a[1])  # different seeds differ
    assert cfg.num_updates == 3 and m1["losses/policy"].shape == (2, 3)
    assert np.isfinite(m1["losses/value"]).all()
    assert (np.asarray(s1.mem_ep) >= 0).all()  # the memory holds real steps


def test_cli_runs_and_documents_every_field(tmp_path, capsys):
    with pytest.raises(SystemExit):
        G.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(G.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out
    args = ["--memory-length", "3", "--n-layer", "1", "--d-model", "16", "--n-head", "2",
            "--d-head", "8", "--d-inner", "32", "--gating", "none", "--mem-len", "0",
            "--num-envs", "4", "--num-steps", "4", "--total-timesteps", "64",
            "--num-minibatches", "2", "--log-every", "2", "--run-dir", str(tmp_path),
            "--no-progress"]
    res = G.main(args)
    assert (tmp_path / "metrics.jsonl").exists()
    assert res.history["losses/policy"].shape == (1, 4)
    assert np.isfinite(res.history["losses/value"]).all()


def test_bad_values_fail_with_named_field(tmp_path):
    with pytest.raises(ValueError, match="gating must be"):
        G.main(["--gating", "lstm", "--run-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="num_envs=6 must be divisible by num_minibatches=4"):
        G.main(["--num-envs", "6", "--num-minibatches", "4", "--run-dir", str(tmp_path)])


def test_every_config_field_is_read():
    assert unread_fields(G) == []


def test_paper_preset_traces():
    """jax.eval_shape of init and one update under the paper preset (nothing runs)."""
    cfg, state, after = preset.trace_paper(G)
    assert jax.tree.structure(after[0]) == jax.tree.structure(state)
