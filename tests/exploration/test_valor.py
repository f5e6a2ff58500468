"""Tests of exploration/valor.py: the decoder's input (sub-sampled state differences), the
reward given once at the episode's end, the curriculum's K rule and the masked
log-likelihood by hand (through the functions `update` calls), the curriculum as it ran,
behaviour against the broken blind policy in one compiled run, purity, CLI, the paper
preset and the Config fields."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from exploration import valor
from tests.common.cli import cli_args
from tests.common.compiled import main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# ONE tiny configuration for the whole module: 10-step episodes, K from 2 to 4.
TINY = valor.Config(
    k_init=2,
    k_max=4,
    decoder_points=6,
    num_updates_total=80,
    num_episodes=32,
    episode_length=10,
    pi_lr=3e-3,
    vf_lr=3e-3,
    dc_lr=3e-3,
    train_v_iters=5,
    train_dc_iters=5,
    dc_every=1,
    hidden=(32, 32),
    decoder_hidden=16,
    max_speed=0.15,
    eval_episodes=16,
)


# --- EQUATIONS ---


def test_decoder_reads_subsampled_state_differences():
    """T = 10, N = 6: the states at t = 0, 2, 4, 6, 8, 10 and their 5 differences, episode by
    episode ([B, N - 1, D]); adding a constant to every state changes nothing the valor
    decoder sees (it reads motion, not place); final_state (VIC) reads (s_0, s_T).
    Mutations that fail here: raw states instead of differences, every step instead of the
    sub-sample, differences in the wrong order (s_t - s_{t+N})."""
    rng = np.random.default_rng(0)
    states = rng.normal(size=(11, 3, 2)).astype(np.float32)  # [T + 1, B, D]
    np.testing.assert_array_equal(valor.subsample_index(10, 6), [0, 2, 4, 6, 8, 10])
    x = np.asarray(valor.decoder_inputs(jnp.asarray(states), TINY))
    assert x.shape == (3, 5, 2)
    for b in range(3):
        for i in range(5):
            np.testing.assert_allclose(x[b, i], states[2 * i + 2, b] - states[2 * i, b], rtol=1e-6)
    np.testing.assert_allclose(valor.decoder_inputs(jnp.asarray(states + 5.0), TINY), x, atol=1e-5)
    vic = valor.decoder_inputs(
        jnp.asarray(states), dataclasses.replace(TINY, decoder="final_state")
    )
    np.testing.assert_array_equal(vic, np.concatenate([states[0], states[-1]], -1))


def test_reward_once_at_the_end_and_its_advantage():
    """r_t = 0 for t < T - 1 and r_{T-1} = log P_D(c | tau), with no gradient into the
    decoder. With V = 0 and lambda = 1 the GAE advantage `update` computes is the discounted
    reward-to-go gamma^(T-1-t) log P_D, so every step of the episode is credited."""
    log_p = jnp.array([-0.1, -2.0])
    r = valor.episode_rewards(log_p, 4)
    np.testing.assert_array_equal(r[:-1], 0.0)
    np.testing.assert_array_equal(r[-1], log_p)
    g = jax.grad(lambda lp: valor.episode_rewards(lp, 4).sum())(log_p)
    np.testing.assert_array_equal(g, 0.0)
    dones = jnp.zeros((4, 2)).at[-1].set(1.0)
    adv, _ = valor.gae(r, jnp.zeros((4, 2)), dones, jnp.zeros(2), 0.9, 1.0)
    np.testing.assert_allclose(
        adv, 0.9 ** np.arange(3, -1, -1)[:, None] * np.asarray(log_p), rtol=1e-6
    )


def test_curriculum_rule_by_hand():
    """[1] Sec. 3.3: K <- min(int(1.5 K + 1), K_max): 2, 4, 7, 11, 17, 26, 40, 61, 64, 64
    for K_max = 64, equal to Python's int(1.5 K + 1) for every K up to 200. Mutations that
    fail: 1.5 K (no + 1), rounding instead of int, no cap."""
    k, seq = jnp.int32(2), [2]
    for _ in range(9):
        k = valor.next_k(k, 64)
        seq.append(int(k))
    assert seq == [2, 4, 7, 11, 17, 26, 40, 61, 64, 64]
    ks = np.arange(1, 201)
    np.testing.assert_array_equal(
        valor.next_k(jnp.asarray(ks), 10_000), [int(1.5 * k + 1) for k in ks]
    )


def test_decoder_turn_curriculum_gate_and_ring_buffer():
    """The decoder (and the curriculum check) runs on the last of every dc_every epochs:
    steps 2, 5, ... for dc_every = 3. `curriculum` grows K only on such a turn and only
    when E[log P_D] >= log threshold. The ring buffer puts epoch `step`'s B rows in slot
    step % dc_every, so it holds the last dc_every epochs. Mutations that fail here:
    step % dc_every == 0 instead of (step + 1) % dc_every, growth without the turn, the
    threshold's comparison reversed, writing always into slot 0."""
    assert [bool(valor.decoder_turn(s, 3)) for s in range(6)] == [False, False, True] * 2
    assert all(bool(valor.decoder_turn(s, 1)) for s in range(3))
    ok, low = jnp.log(0.9), jnp.log(0.8)  # threshold 0.86
    cur = [
        int(valor.curriculum(jnp.int32(7), m, t, TINY))
        for m, t in [(ok, True), (ok, False), (low, True), (low, False)]
    ]
    assert cur == [4, 7, 7, 7]  # next_k(7) = 11 capped at TINY.k_max = 4
    buf = jnp.zeros(6, jnp.int32)
    for step in range(4):
        buf = valor.ring_write(buf, jnp.array([10 * step, 10 * step + 1]), step, 3)
    np.testing.assert_array_equal(buf, [30, 31, 10, 11, 20, 21])


def test_gaussian_log_prob_and_entropy():
    """The policy's log-density and entropy equal scipy's Normal(mean, exp(log_std)) summed
    over the action's 2 dimensions. Mutations that fail: dropping -log_std, std for log_std."""
    rng = np.random.default_rng(1)
    u, m = rng.normal(size=(2, 5, 2))
    ls = np.array([-0.5, 0.3])
    np.testing.assert_allclose(
        valor.gaussian_log_prob(jnp.asarray(u), jnp.asarray(m), jnp.asarray(ls)),
        stats.norm.logpdf(u, m, np.exp(ls)).sum(-1),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        valor.gaussian_entropy(jnp.asarray(ls)), stats.norm.entropy(0, np.exp(ls)).sum(), rtol=1e-6
    )


def test_paper_advantage_reaches_the_first_action():
    """Paper settings (T = 1000, lambda 0.97): an episode whose outcome log P_D = r is decided
    by its first action, with the exact values (V_0 = gamma^999 E[r], V_t = gamma^(T-1-t) r
    after it). With the paper preset's gamma = 1 the first action's advantage is r - E[r]
    (all of it, > 10%); with gamma 0.99 (the broken arm, the community default) it would be
    gamma^999 (r - E[r]) = 4e-5 of it. The value's target is r at every step (gamma = 1)."""
    r = np.array([-0.1, -2.0])
    for gamma, big in [(valor.Config(**valor.PRESETS["paper"]).gamma, True), (0.99, False)]:
        cfg = dataclasses.replace(valor.Config(**valor.PRESETS["paper"]), gamma=gamma)
        t = cfg.episode_length
        values = gamma ** np.arange(t - 1, -1, -1)[:, None] * r  # [T, B]
        values[0] = gamma ** (t - 1) * r.mean()
        rewards = np.zeros((t, 2))
        rewards[-1] = r
        adv, rtg = valor.advantages(jnp.asarray(rewards), jnp.asarray(values), cfg)
        share = np.abs(np.asarray(adv[0])) / np.abs(r - r.mean())
        assert (share > 0.1).all() == big and (share < 1e-3).all() != big, (gamma, share)
        if big:
            np.testing.assert_allclose(rtg, np.broadcast_to(r, (t, 2)), rtol=1e-6)


def test_final_state_decoder_reads_both_ends():
    """VIC's decoder ([2], an MLP on (s_0, s_T); `update` traces with it in
    test_update_wiring): its logits change when s_T or s_0 changes and not when a middle
    state does. Mutation that fails: the MLP reading s_0 only."""
    cfg = dataclasses.replace(TINY, decoder="final_state")
    dec = valor.networks(cfg)[2]
    states = np.random.default_rng(2).normal(size=(11, 3, 2)).astype(np.float32)
    params = dec.init(jax.random.PRNGKey(1), valor.decoder_inputs(jnp.asarray(states), cfg))
    # the 4 variants in one call: as they are, then s_10, s_0, s_5 moved
    moved = np.stack(
        [states] + [states + 0.5 * (np.arange(11) == t)[:, None, None] for t in (10, 0, 5)]
    )
    out = np.asarray(
        jax.jit(jax.vmap(lambda s: dec.apply(params, valor.decoder_inputs(s, cfg))))(moved)
    )
    base = out[0]
    for other, (t, moves) in zip(out[1:], [(10, True), (0, True), (5, False)], strict=True):
        assert (np.abs(other - base).max(-1) > 1e-4).all() == moves, t
        assert np.allclose(other, base) != moves, t


def test_context_log_prob_uses_the_k_contexts_in_use():
    """log P_D(c | tau) = log softmax over the first K logits only: with K = 2 of K_max = 4,
    logits [0, log 3, 9, 9] give log 1/4 for c = 0 and log 3/4 for c = 1 (the unused
    outputs 9, 9 carry no mass); with K = 4 the same logits give c = 0 almost nothing."""
    logits = jnp.array([[0.0, math.log(3.0), 9.0, 9.0]] * 2)
    c = jnp.array([0, 1])
    np.testing.assert_allclose(
        valor.context_log_prob(logits, c, 2), [math.log(0.25), math.log(0.75)], rtol=1e-6
    )
    assert float(valor.context_log_prob(logits, c, 4)[0]) < -9.0


def test_update_wiring(monkeypatch):
    """`update` feeds the decoder `decoder_inputs` of the rollout's states, the reward
    `episode_rewards` of `context_log_prob` with the current K, and the entropy weight to
    `policy_loss`; the VIC decoder (final_state) traces; GAE gets (gamma, lambda) and the
    value target (gamma, 1); with dc_every = 3 the decoder trains on the ring buffer of 3
    epochs (3 B rows), written at slot step % 3, and the curriculum's gate is
    `decoder_turn` (traced with spies, nothing runs). Mutations that fail here: lambda for
    the value target's 1, gamma and lambda swapped, the decoder loss on the epoch's episodes
    only, update's own (step + 1) % dc_every instead of decoder_turn."""
    calls: dict[str, list] = {}

    def spy(name):
        real = getattr(valor, name)

        def wrapped(*args, **kwargs):
            calls.setdefault(name, []).append(args)
            return real(*args, **kwargs)

        monkeypatch.setattr(valor, name, wrapped)

    returned: dict[str, list] = {}

    def spy_out(name):
        real = getattr(valor, name)

        def wrapped(*args, **kwargs):
            out = real(*args, **kwargs)
            returned.setdefault(name, []).append(out)
            return out

        monkeypatch.setattr(valor, name, wrapped)

    for name in (
        "decoder_inputs",
        "episode_rewards",
        "context_log_prob",
        "policy_loss",
        "next_k",
        "gae",
        "ring_write",
        "curriculum",
    ):
        spy(name)
    spy_out("decoder_turn")
    cfg = dataclasses.replace(
        TINY, ent_coef=0.3, dc_every=3, gamma=0.95, gae_lambda=0.8, decoder="final_state"
    )
    state = jax.eval_shape(lambda k: valor.init(k, cfg), jax.random.PRNGKey(0))
    after, _ = jax.eval_shape(lambda s: valor.update(s, cfg), state)
    assert after.params["dec"]["params"]["Dense_0"]["kernel"].shape == (2 * 2, 16)
    assert after.dc_x.shape == (3 * 32, 2 * 2)
    ((states, _),) = [a for a in calls["decoder_inputs"] if a[0].shape[1] == 32]
    assert states.shape == (11, 32, 2)
    ((log_p, t),) = calls["episode_rewards"]
    assert log_p.shape == (32,) and t == 10
    assert len(calls["context_log_prob"]) == 2  # the reward and the decoder's loss
    (reward_logits, _, _), (dc_logits, dc_c, _) = calls["context_log_prob"]
    assert reward_logits.shape == (32, 4) and dc_logits.shape == (3 * 32, 4)
    assert dc_c.shape == (3 * 32,)
    assert [a[4:] for a in calls["gae"]] == [(0.95, 0.8), (0.95, 1.0)]
    assert [(a[0].shape[0], a[1].shape[0], a[3]) for a in calls["ring_write"]] == [(96, 32, 3)] * 2
    ((turn,),) = [returned["decoder_turn"]]
    assert calls["curriculum"][0][2] is turn
    ((_, _, _, beta),) = calls["policy_loss"]
    assert beta == 0.3
    assert len(calls["next_k"]) == 1


def test_bad_values_fail_with_named_field(tmp_path):
    for flags, msg in [
        (["--decoder", "nope"], "decoder='nope'"),
        (["--variant", "x"], "variant='x'"),
        (["--k-init", "1"], r"k_init=1 must be in \[2, k_max=64\]"),
        (["--threshold", "1.5"], r"threshold=1.5 must be in \(0, 1\)"),
        (
            ["--decoder-points", "20", "--episode-length", "10"],
            r"decoder_points=20 must be in \[2, episode_length \+ 1 = 11\]",
        ),
        (["--pi-lr", "0"], "--pi-lr must be > 0"),
    ]:
        with pytest.raises(ValueError, match=msg):
            valor.main(flags + ["--run-dir", str(tmp_path / "x")])


# --- BEHAVIOUR, PURITY, CLI (one compiled run of the CLI) ---

SEEDS = 2
ARGS = cli_args(TINY, valor.Config()) + [
    "--num-seeds",
    str(2 * SEEDS),
    "--log-every",
    "40",
    "--no-progress",
    "--fast-compile",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """TINY through `valor.main`, 2 x SEEDS seeds in ONE compiled program: seeds SEEDS.. run
    the blind policy (variant traced in the state), each on the key of its VALOR twin."""
    keys = jax.random.split(jax.random.PRNGKey(0), 2 * SEEDS)  # the runner's seed keys
    real = valor.init

    def init(key, cfg):
        i = jnp.argmax(jnp.all(key == keys, -1))
        return real(keys[i % SEEDS], cfg).replace(variant=(i // SEEDS).astype(jnp.int32))

    run_dir = tmp_path_factory.mktemp("valor") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(valor, "init", init)
        return main_recording_chunks(valor.main, ARGS + ["--run-dir", str(run_dir)])


def test_contexts_are_decoded_only_when_the_policy_sees_them(tiny_run):
    """Behaviour ([1] Sec. 5): TINY (80 epochs of 32 ten-step episodes, K from 2 up to 4),
    2 seeds per arm; the decoder's accuracy on eval_episodes K_max = 64 held-out episodes
    spread over the contexts in use (16 per context at K = 4, 32 at the blind arm's K = 2).
    Measured (2-core CPU, loaded, --fast-compile):
        VALOR           K 4 4   accuracy 1.00 1.00
        blind policy    K 2 2   accuracy 0.50 0.50   (chance 0.5 at K = 2)
    The blind arm never reaches the curriculum's threshold. Asserted: VALOR reaches K = 4
    with accuracy >= 0.9 (chance 0.25; the catalogue's bar) on each seed; blind stays at
    K = 2 below 0.75.
    Mutations tried, each failing here: the blind arm's one-hot not zeroed (it learns too),
    the reward's sign flipped (-log P_D), K growing on every epoch without the threshold.
    The same 6 more seeds (--seed 1) of the VALOR arm all scored 1.00 at K = 4."""
    res, _ = tiny_run
    acc, k = res.final["decoder_accuracy"], res.final["k"]
    np.testing.assert_array_equal(res.state.variant, np.repeat([0, 1], SEEDS))
    print("accuracy", acc.reshape(2, SEEDS), "K", k.reshape(2, SEEDS))
    assert (k[:SEEDS] == 4).all() and (acc[:SEEDS] >= 0.9).all(), (acc, k)
    assert (k[SEEDS:] == 2).all() and (acc[SEEDS:] < 0.75).all(), (acc, k)


def test_curriculum_as_it_ran(tiny_run):
    """Per seed and epoch of the run (dc_every = 1): K grows to next_k(K) exactly on the
    epochs whose episodes scored mean log P_D >= log 0.86, and stays otherwise.
    Mutation tried: K growing on every epoch (no threshold) fails here."""
    h = tiny_run[0].history
    k, logp = h["charts/k"].astype(int), h["charts/decoder_logp"]
    grow = logp[:, :-1] >= math.log(TINY.threshold)
    expect = np.where(grow, np.minimum((3 * k[:, :-1] + 2) // 2, TINY.k_max), k[:, :-1])
    np.testing.assert_array_equal(k[:, 1:], expect)
    assert grow[:SEEDS].any()


def test_train_is_pure_and_cli_writes_its_files(tiny_run, capsys):
    """The last compiled chunk, run again on a copy of its input, gives bit-identical
    parameters and metrics; seeds differ; the run wrote its files; `--help` documents every
    field; metrics are finite and have the [seeds, updates] shape.
    Mutation tried: `init` ignoring its key (all seeds alike) fails here."""
    res, chunks = tiny_run
    with pytest.raises(SystemExit):
        valor.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(valor.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out
    for name in ("metrics.jsonl", "summary.json", "config.json", "checkpoints"):
        assert (res.run_dir / name).exists(), name
    h = res.history
    assert h["losses/pi"].shape == (2 * SEEDS, 80) and len(chunks) == 2
    assert all(np.isfinite(v).all() for v in h.values())
    assert not np.array_equal(h["losses/pi"][0], h["losses/pi"][1])
    compiled_chunk, states = chunks[-1]
    again, metrics = compiled_chunk(states)
    jax.tree.map(np.testing.assert_array_equal, res.state.params, again.params)
    np.testing.assert_array_equal(h["losses/decoder"][:, 40:], metrics["losses/decoder"])


def test_every_config_field_is_read():
    """No flag that lies: each Config field is read by code that runs (AST, not text)."""
    assert unread_fields(valor) == []


def test_paper_preset_traces():
    """jax.eval_shape of init, one update and evaluate under the `paper` preset (K_max 64,
    40 episodes of 1000 steps, 11 decoder points): nothing runs."""
    cfg, state, (after, metrics) = trace_paper(valor)
    assert cfg.k_max == 64 and cfg.episode_length == 1000 and int(cfg.k_init) == 2
    assert state.params["pi"]["params"]["Dense_0"]["kernel"].shape == (2 + 64, 64)
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
    ev = jax.eval_shape(lambda s: valor.evaluate(s, cfg), state)
    assert sorted(ev) == ["decoder_accuracy", "decoder_logp", "k"]


@pytest.mark.slow
def test_quick_preset_gate_against_the_blind_policy(tmp_path):
    """Slow gate: the `quick` preset (400 epochs of 64 twenty-step episodes, K 2 -> 16)
    through `valor.main`, 4 seeds in ONE compiled program: seeds 0-1 VALOR, seeds 2-3 the
    blind policy (variant traced in the state, each on its VALOR twin's key). Measured
    (2-core CPU, loaded, 160 s): VALOR K 16 16, accuracy 0.97 0.99; blind K 2 2, accuracy
    0.52 0.50.
    Asserted: VALOR reaches K = 16 with accuracy >= 0.9 (chance 1/16) on each seed; the
    blind arm stays at K = 2 below 0.6 (chance 0.5). Mutation tried: the reward's sign
    flipped: VALOR 0.125 / 0.25 at K 7 / 4, fails."""
    keys = jax.random.split(jax.random.PRNGKey(0), 4)  # the runner's seed keys
    real = valor.init

    def init(key, cfg):
        i = jnp.argmax(jnp.all(key == keys, -1))
        return real(keys[i % 2], cfg).replace(variant=jnp.where(i < 2, 0, 1).astype(jnp.int32))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(valor, "init", init)
        res = valor.main(
            [
                "--preset",
                "quick",
                "--num-seeds",
                "4",
                "--log-every",
                "100",
                "--no-progress",
                "--run-dir",
                str(tmp_path / "run"),
            ]
        )
    acc, k = res.final["decoder_accuracy"], res.final["k"]
    print("accuracy", acc, "K", k)
    np.testing.assert_array_equal(res.state.variant, [0, 0, 1, 1])
    assert (k[:2] == 16).all() and (acc[:2] >= 0.9).all(), (acc, k)
    assert (k[2:] == 2).all() and (acc[2:] < 0.6).all(), (acc, k)
