"""Tests of metarl/unsupervised_meta_rl.py: the reward wrapper r_z(s) = log_softmax(D(s))[z]
through the rollout `update` runs, the random D's homogeneity (declared), the baseline's
ridge retry, the frozen discriminator, tasks drawn per meta-batch, behaviour on
hand-designed goals (DIAYN-proposed tasks against learning from scratch; against the random
discriminator in the slow tier, 8 seeds), purity, CLI with --plot --compare of a maml_rl.py
run, paper-preset trace, Config fields. One module-scoped run (DIAYN on 2 seeds and a purity
copy in one compiled program) serves the behaviour, purity, CLI and plot tests."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metarl import diayn
from metarl import unsupervised_meta_rl as m
from tests.common.cli import cli_args
from tests.common.compiled import compiled, main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# ONE tiny configuration for the whole module: DIAYN with 4 skills for 8 envs x 300 steps of
# 20-step episodes, then MAML-TRPO on 8 proposed tasks x 8 trajectories, a 2 x 32 policy,
# 10 meta-iterations; meta-test on 40 goals, 20 trajectories, 2 PG steps.
TINY = m.Config(num_skills=4, proposer_timesteps=8 * 300, proposer_envs=8, proposer_lr=1e-3,
                proposer_batch_size=64, proposer_buffer_size=8 * 300,
                proposer_learning_starts=100, horizon=20, hidden=32, meta_batch_size=8,
                num_trajectories=8, max_kl=0.05, num_iterations=10, eval_tasks=40,
                eval_trajectories=20, eval_steps=2)


# --- EQUATIONS ---


def _mlp(params, s):
    """diayn.Discriminator by hand in numpy: ReLU Dense layers, then the logits."""
    p = params["params"]
    names = sorted(p, key=lambda n: int(n.split("_")[1]))
    x = np.asarray(s, np.float64)
    for i, n in enumerate(names):
        x = x @ np.asarray(p[n]["kernel"], np.float64) + np.asarray(p[n]["bias"], np.float64)
        if i < len(names) - 1:
            x = np.maximum(x, 0)
    return x


def test_rewards_of_the_rollout_are_log_softmax_of_D_at_the_next_state():
    """[1] Eq. 2 through `rollout` with `task_reward` (what `update`'s sampler runs): for
    proposed tasks z = (2, 0, 3), every reward is log_softmax(D(s_{t+1}))[z] (D by hand in
    numpy), s_{t+1} = clip(s_t + 0.1 clip(a_t, -1, 1), -1, 1) (the CMP's step, and the next
    observation); the three tasks' rewards differ.
    Tried: D scored at s_t instead of s_{t+1} fails; z ignored (log_softmax(...)[0]) fails."""
    cfg = dataclasses.replace(TINY, proposer="random")
    net, disc, pcfg = m.mrl.network(m.learner_config(cfg)), m.discriminator(cfg), \
        m.proposer_config(cfg)
    zs = jnp.array([2, 0, 3])

    def setup(key):
        k_d, k_p, k_r = jax.random.split(key, 3)
        d = m.train_proposer(k_d, cfg)[0]
        theta = net.init(k_p, jnp.zeros((1, 2)))
        one = lambda z, k: m.rollout(net, theta, lambda s: m.task_reward(disc, d, z, s), k, 4,
                                     pcfg)
        return d, jax.vmap(one)(zs, jax.random.split(k_r, 3))

    d, (obs, act, rew, mask) = compiled(setup, jax.random.PRNGKey(0))
    obs, act, rew = (np.asarray(x, np.float64) for x in (obs, act, rew))
    nxt = np.clip(obs + 0.1 * np.clip(act, -1, 1), -1, 1)  # [3, 4, T, 2], s_{t+1}
    np.testing.assert_allclose(nxt[:, :, :-1], obs[:, :, 1:], atol=1e-5)
    logits = _mlp(d, nxt)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    want = np.take_along_axis(logp, np.asarray(zs)[:, None, None, None], -1)[..., 0]
    np.testing.assert_allclose(rew, want, rtol=1e-4, atol=1e-5)
    assert rew.shape == (3, 4, TINY.horizon) and np.all(np.asarray(mask) == 1)
    # the same states would be paid differently under another z: the tasks are distinct
    assert np.abs(want[0] - logp[0, ..., 1]).max() > 1e-3


def test_the_random_discriminator_is_positively_homogeneous():
    """Declared in the module: the random D (zero biases, ReLU) has D(c s) = c D(s) for c > 0,
    so its task regions argmax_z D(z|s) are cones from the start state 0. Checked on 64
    states for c = 2 and 0.3, and the argmax along rays. Tried: biases drawn N(0, 0.1) in
    train_proposer's random branch: fails."""
    cfg = dataclasses.replace(TINY, proposer="random")
    s = jax.random.uniform(jax.random.PRNGKey(3), (64, 2), minval=-1, maxval=1)
    apply = m.discriminator(cfg).apply
    d, acc = compiled(lambda k: m.train_proposer(k, cfg), jax.random.PRNGKey(4))
    out = {c: np.asarray(apply(d, c * s), np.float64) for c in (1.0, 2.0, 0.3)}
    np.testing.assert_allclose(out[2.0], 2 * out[1.0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[0.3], 0.3 * out[1.0], rtol=1e-5, atol=1e-6)
    assert (out[2.0].argmax(-1) == out[1.0].argmax(-1)).all() and np.isnan(acc)


def test_the_baseline_retry_rescues_states_pinned_to_a_wall():
    """rllab's retry (in maml_rl.fit_baseline, through the advantages `sample_batch` uses):
    every state on the wall (obs = 1, so x = x^2 = 1 on every step) makes the float32 normal
    equations singular at reg 1e-5 (10 x 50 steps, the quick preset's; at 4 x 20 that solve
    happens to succeed); the advantages are finite and equal those of reg 1e-4 (its first
    retry). Tried: retries=0 fails; jnp.where's branches swapped fails."""
    o = jnp.ones((10, 50, 2))
    r = -jnp.linspace(0.0, 1.0, 500).reshape(10, 50)
    mk = jnp.ones((10, 50))
    mcfg = m.learner_config(TINY)
    feat = m.mrl.baseline_features(o)
    ret = m.mrl.discounted_returns(r, mcfg.gamma)
    assert not np.isfinite(m.mrl.fit_baseline(feat, ret, mk, mcfg.baseline_reg, 0)).all()
    adv = lambda reg: np.asarray(m.mrl.advantages(o, r, mk, mcfg.gamma, mcfg.gae_lambda, reg))
    got = adv(mcfg.baseline_reg)
    assert np.isfinite(got).all() and np.abs(got).max() > 0.1
    np.testing.assert_allclose(got, adv(10 * mcfg.baseline_reg), rtol=1e-5, atol=1e-6)


def test_sample_tasks_is_uniform_over_the_skills():
    """p(z) uniform over K: 400 meta-batches of 8 cover all 4 skills near 1/4 each."""
    zs = compiled(jax.vmap(lambda k: m.sample_tasks(k, TINY)),
                  jax.random.split(jax.random.PRNGKey(1), 400))
    freq = np.bincount(np.asarray(zs).ravel(), minlength=4) / zs.size
    assert zs.shape == (400, 8) and freq.shape == (4,)
    np.testing.assert_allclose(freq, 0.25, atol=0.03)


def test_validation_names_the_field(tmp_path):
    bad = [(["--proposer", "gan"], "proposer='gan'"), (["--num-skills", "1"], "num_skills=1"),
           (["--max-kl", "0"], r"meta-learner \(maml_rl.Config\): --max-kl must be > 0"),
           (["--proposer-timesteps", "10", "--proposer-envs", "20"],
            r"proposer \(diayn.Config\): total_timesteps=10"),
           (["--dtype", "fp8"], "dtype='fp8'")]
    for args, msg in bad:
        with pytest.raises(ValueError, match=msg):
            m.main(args + ["--run-dir", str(tmp_path)])


# --- ONE RUN: DIAYN's proposer on 2 seeds and a purity copy ---

SEEDS = 2
NUM = SEEDS + 1  # DIAYN seeds, then a copy of seed 0
MAML_RUN = {"adapt/return_00": [-9.5, None], "adapt/return_01": [-6.0, -6.5],
            "adapt/return_02": [-4.0, -4.2]}  # a maml_rl.py summary.json, by hand


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """TINY through `m.main` (the CLI path, with --plot and --compare of a maml_rl.py run
    directory: its config.json and summary.json as the runner writes them), NUM seeds in
    ONE compiled program; the last seed repeats seed 0 (its key)."""
    keys = jax.random.split(jax.random.PRNGKey(0), NUM)  # the runner's seed keys
    real = m.init
    tmp = tmp_path_factory.mktemp("uml")
    maml = tmp / "maml_rl_run"
    maml.mkdir()
    (maml / "config.json").write_text(json.dumps(
        {"config": dataclasses.asdict(m.mrl.Config()), "num_seeds": 2, "seed": 1,
         "script": "maml_rl"}, default=str))
    (maml / "summary.json").write_text(json.dumps({"perf/compile_s": 1.0, **MAML_RUN}))

    def init(key, cfg):
        i = jnp.argmax(jnp.all(key == keys, -1))
        return real(keys[i % SEEDS], cfg)

    args = cli_args(TINY, m.Config()) + ["--num-seeds", str(NUM), "--log-every",
                                         str(TINY.num_iterations), "--no-progress",
                                         "--fast-compile", "--plot", str(tmp / "uml.png"),
                                         "--compare", str(maml)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(m, "init", init)
        return main_recording_chunks(m.main, args + ["--run-dir", str(tmp / "run")])


def test_diayn_tasks_beat_learning_from_scratch_on_new_goals(tiny_run):
    """Behaviour ([1] Fig. 3, short): return on 40 new goals (-distance, 20-step episodes)
    after 0 / 1 / 2 PG steps, UML with DIAYN's proposer against learning from scratch (the
    same PG steps from the untrained init, the same goals and env steps), in one program on
    2 seed keys. Measured (loaded 2-core CPU, --fast-compile), per seed, 0 / 1 / 2 steps:
        DIAYN proposer     -11.07 -8.43 / -7.18 -7.85 / -4.21 -4.71
        from scratch       -9.28 -9.29 / -8.84 -8.96 / -8.66 -8.85
        DIAYN accuracy (last training batch, 4 skills, chance 0.25) 0.47 0.55
    DIAYN starts worse than scratch (step 0) and is ahead from step 1.
    Gates: after 2 steps DIAYN beats scratch on every seed by > 1 (margins 4.5, 4.1); DIAYN's
    accuracy > 0.35 (chance 0.25 + 0.1; the accuracy of its first update, before learning
    starts, is 0). DIAYN against the random discriminator is the slow tier's (8 seeds).
    Tried: meta-training switched off (update leaves theta unchanged): the DIAYN arm equals
    scratch, the test fails; the accuracy read at DIAYN's first update: fails."""
    res, _ = tiny_run
    f = res.final
    d = np.array([f[f"adapt/return_{i:02d}"][:SEEDS] for i in range(3)])
    s = np.array([f[f"random/return_{i:02d}"][:SEEDS] for i in range(3)])
    acc = f["proposer_accuracy"]
    print("diayn", np.round(d, 2), "scratch", np.round(s, 2), "acc", acc)
    assert np.all(d[2] > s[2] + 1.0), (d, s)
    assert np.all(acc > 0.25 + 0.1), acc


def test_the_discriminator_is_frozen_during_meta_training(tiny_run):
    """D after meta-training equals D at the start of it (the runner's recorded chunk input);
    `init` of the random proposer gives DIAYN's discriminator at init on the same seed key
    (the D the DIAYN run starts from), and the learned D differs from it. Tried: `update`
    nudging disc_params (+1e-3): fails."""
    res, chunks = tiny_run
    start = chunks[0][1]
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, res.state.disc_params),
                 jax.tree.map(np.asarray, start.disc_params))
    key0 = jax.random.split(jax.random.PRNGKey(0), NUM)[0]
    rcfg = dataclasses.replace(TINY, proposer="random")
    d_rand, d0 = compiled(lambda k: (
        m.init(k, rcfg).disc_params,
        diayn.init(jax.random.split(k, 3)[0], m.proposer_config(TINY)).params["disc"]), key0)
    jax.tree.map(np.testing.assert_array_equal, d_rand, d0)
    leaf = lambda p, i: np.asarray(jax.tree.leaves(p)[0])[i]
    assert not np.array_equal(leaf(res.state.disc_params, 0), jax.tree.leaves(d0)[0])


def test_tasks_are_drawn_per_meta_batch(tiny_run):
    """The logged mean z of each meta-batch of 8 proposed tasks changes from iteration to
    iteration on every seed. Tried: z drawn from a fixed key in `update`: fails."""
    z = tiny_run[0].history["charts/task_z_mean"]
    assert z.shape == (NUM, TINY.num_iterations)
    assert np.all(z.std(1) > 0.05) and z.min() >= 0 and z.max() <= TINY.num_skills - 1


def test_train_is_pure_and_cli_writes_its_files(tiny_run, capsys):
    """Same key twice in one program: bit-identical; different keys differ; rerunning the
    recorded chunk on its input gives the run's state again, and alpha = 0 (state.train_lr)
    on the copy seed changes its params; the TRPO step stays in its KL bound and starts from
    a meta-objective of 0; --help documents every field. Tried: `update`'s post-update
    distribution built with alpha 0 (dist(..., 0., ...)): surrogate_before != 0, fails."""
    res, chunks = tiny_run
    with pytest.raises(SystemExit):
        m.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(m.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert (res.run_dir / "metrics.jsonl").exists() and (res.run_dir / "summary.json").exists()
    h = res.history["charts/post_adapt_return"]
    assert np.isfinite(h).all() and not np.array_equal(h[0], h[1])
    np.testing.assert_array_equal(h[0], h[-1])
    jax.tree.map(lambda x: np.testing.assert_array_equal(x[0], x[-1]), res.state.params)
    assert len(chunks) == 1
    start = chunks[0][1]  # the copy seed reruns with alpha = 0 inside the meta-objective
    again, _ = chunks[0][0](start.replace(train_lr=start.train_lr.at[-1].set(0.0)))
    moved = False
    for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(res.state.params),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a)[:-1], np.asarray(b)[:-1])
        moved |= not np.allclose(np.asarray(a)[-1], np.asarray(b)[-1])
    assert moved, "state.train_lr is not read"
    hist = res.history
    assert np.all(hist["losses/mean_kl"] <= TINY.max_kl) and np.all(hist["losses/mean_kl"] > 0)
    # at the sampling theta pi_theta' = pi_old on the post-update batch, ratio 1, and the
    # standardised advantages sum to 0 per task: the meta-objective starts at 0
    np.testing.assert_allclose(hist["losses/surrogate_before"], 0.0, atol=1e-5)


def test_plot_writes_the_task_map_and_curves(tiny_run):
    """--plot with --compare of a maml_rl.py run (no `proposer` in its config: [1]'s
    reference arm, MAML on hand-designed goals) writes the PNG; the task map has >= 2
    regions. Tried: the label read as config["proposer"] (KeyError): fails."""
    res, _ = tiny_run
    assert (res.run_dir.parent / "uml.png").stat().st_size > 1000
    disc0 = jax.tree.map(lambda x: np.asarray(x)[0], res.state.disc_params)
    region = compiled(lambda p: m.skill_map(p, TINY, n=31), disc0)
    assert region.shape == (31, 31) and len(np.unique(region)) >= 2


def test_every_config_field_is_read():
    assert unread_fields(m) == []


def test_paper_preset_traces():
    """jax.eval_shape of init (DIAYN's 1M steps scanned) and one update under `paper`, and
    with bfloat16 compute (the random proposer's trace is a subset of this one)."""
    cfg, state, (after, metrics) = trace_paper(m)
    assert cfg.num_skills == 50 and cfg.meta_batch_size == 20 and cfg.horizon == 100
    assert state.disc_params["params"]["Dense_2"]["kernel"].shape == (32, 50)
    assert state.params["params"]["Dense_0"]["kernel"].shape == (2, 100)
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(x.shape == () for x in jax.tree.leaves(metrics))
    trace_paper(m, dtype="bfloat16")


@pytest.mark.slow
def test_diayn_against_the_random_discriminator_over_8_seeds(tmp_path):
    """[1] Fig. 3's DIAYN vs random proposer at the tests' size, 8 seeds (the runner's seed
    keys, the same for both runs: the random arm's D is DIAYN's D before training, the same
    policy init, task draws and test goals). Measured (loaded 2-core CPU, 81 s wall), after
    2 PG steps, per seed:
        DIAYN proposer   -4.03 -5.09 -4.72 -4.07 -5.03 -4.21 -4.49 -5.27
        random D         -4.21 -4.91 -6.71 -6.73 -5.85 -4.88 -5.80 -4.90
        from scratch     -8.66 -8.85 -8.68 -9.02 -8.60 -8.28 -8.85 -8.37
    DIAYN - random (paired): after 2 steps 0.88 +- 0.37 (s.e.; 6 of 8 > 0), after 1 step
    0.09 +- 0.71 (not told apart), at step 0 2.40 +- 1.07 (the random arm starts worse).
    Gates (after 2 steps): both proposers beat scratch (the broken variant: no meta-training)
    on every seed by > 1 (margins DIAYN 3.3-4.6, random 1.9-4.5); DIAYN - random, mean
    over seeds, > 0.3 (1.5 s.e. below the measured 0.88). [1]'s caption on 2-D navigation
    implies random ~ DIAYN [M]; at the quick preset (8 skills, 60 iterations, 2 seeds) the
    random D is ahead (module docstring): this gate holds at this size only."""
    args = cli_args(TINY, m.Config()) + ["--num-seeds", "8", "--log-every", "10",
                                         "--no-progress", "--fast-compile"]
    f = {p: m.main(args + ["--proposer", p, "--run-dir", str(tmp_path / p)]).final
         for p in ("diayn", "random")}
    ret = lambda p, arm, i: np.asarray(f[p][f"{arm}/return_{i:02d}"], np.float64)
    d, r, s = ret("diayn", "adapt", 2), ret("random", "adapt", 2), ret("diayn", "random", 2)
    np.testing.assert_array_equal(s, ret("random", "random", 2))  # the same scratch arm
    diff = [ret("diayn", "adapt", i) - ret("random", "adapt", i) for i in range(3)]
    print("diayn", d.round(2), "random", r.round(2), "scratch", s.round(2),
          "d - r per step", [(x.mean().round(2), (x.std(ddof=1) / 8**0.5).round(2))
                             for x in diff])
    assert np.all(d > s + 1.0) and np.all(r > s + 1.0), (d, r, s)
    assert diff[2].mean() > 0.3, diff
