"""Tests of metarl/unsupervised_meta_rl.py: the reward wrapper r_z(s) = log_softmax(D(s))[z]
through the meta-batch sampler `update` calls, the frozen discriminator, tasks drawn per
meta-batch, behaviour on hand-designed goals (DIAYN-proposed tasks against learning from
scratch and against the random discriminator), purity, CLI, paper-preset trace, Config
fields. One module-scoped run (both proposers and a purity copy in one compiled program)
serves the behaviour, purity, CLI and plot tests."""

import dataclasses

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


def test_rewards_of_the_meta_batch_are_log_softmax_of_D_at_the_next_state():
    """[1] Eq. 2 through `sample_meta_batch` (what `update` runs): for proposed tasks
    z = (2, 0, 3), every reward of the inner and post-update batches is
    log_softmax(D(s_{t+1}))[z] (D by hand in numpy), s_{t+1} = clip(s_t + 0.1 clip(a_t, -1,
    1), -1, 1) (the CMP's step, and the next observation); the three tasks' rewards differ.
    Tried: D scored at s_t instead of s_{t+1} fails; z ignored (log_softmax(...)[0]) fails."""
    cfg = TINY
    mcfg = m.learner_config(cfg)
    net, disc = m.mrl.network(mcfg), m.discriminator(cfg)
    zs = jnp.array([2, 0, 3])

    def setup(key):
        k_d, k_p, k_r = jax.random.split(key, 3)
        d = m.train_proposer(k_d, dataclasses.replace(cfg, proposer="random"))[0]
        theta = net.init(k_p, jnp.zeros((1, 2)))
        return d, m.sample_meta_batch(net, theta, disc, d, zs, k_r, 0.1, cfg)

    d, (inner, test, _) = compiled(setup, jax.random.PRNGKey(0))
    for b in (inner[0], test):
        obs, act, rew = (np.asarray(x, np.float64) for x in (b.obs, b.act, b.rew))
        nxt = np.clip(obs + 0.1 * np.clip(act, -1, 1), -1, 1)  # [B, K, T, 2], s_{t+1}
        np.testing.assert_allclose(nxt[:, :, :-1], obs[:, :, 1:], atol=1e-5)
        logits = _mlp(d, nxt)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
            -1, keepdims=True)) - logits.max(-1, keepdims=True)
        want = np.take_along_axis(logp, np.asarray(zs)[:, None, None, None], -1)[..., 0]
        np.testing.assert_allclose(rew, want, rtol=1e-4, atol=1e-5)
        assert np.all(np.asarray(b.mask) == 1)
    # the same states would be paid differently under another z: the tasks are distinct
    assert np.abs(want[0] - np.take_along_axis(logp[0], np.full((1, 1, 1), 1), -1)[..., 0]
                  ).max() > 1e-3


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


# --- ONE RUN: both proposers and a purity copy ---

SEEDS = 3
NUM = 2 * SEEDS + 1  # DIAYN seeds, their random-discriminator twins, a copy of DIAYN seed 0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """TINY through `m.main` (the CLI path), NUM seeds in ONE compiled program: seeds
    SEEDS..2 SEEDS-1 use the random discriminator (DIAYN's D at its init), each on the key of
    its DIAYN twin (the same D before training, policy init, task draws and test goals); the
    last seed repeats DIAYN seed 0."""
    keys = jax.random.split(jax.random.PRNGKey(0), NUM)  # the runner's seed keys
    real = m.init

    def init(key, cfg):
        i = jnp.argmax(jnp.all(key == keys, -1))
        return real(keys[i % SEEDS], cfg, learned=(i < SEEDS) | (i == NUM - 1))

    args = cli_args(TINY, m.Config()) + ["--num-seeds", str(NUM), "--log-every",
                                         str(TINY.num_iterations), "--no-progress",
                                         "--fast-compile"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(m, "init", init)
        return main_recording_chunks(
            m.main, args + ["--run-dir", str(tmp_path_factory.mktemp("uml"))])


def test_diayn_tasks_beat_learning_from_scratch_on_new_goals(tiny_run):
    """Behaviour ([1] Fig. 3, short): return on 40 new goals (-distance, 20-step episodes)
    after 0 / 1 / 2 PG steps. Arms in one program on the same 3 seed keys: UML with DIAYN's
    proposer; learning from scratch (the same PG steps from the untrained init, the same
    goals and env steps); UML with the random discriminator (the twin: DIAYN's D before
    training). Measured (2-core CPU, loaded, --fast-compile), per seed, 0 / 1 / 2 steps:
        DIAYN proposer     -11.91 -8.64 -9.09 / -6.44 -8.82 -9.74 / -4.06 -4.96 -4.97
        random D           -11.23 -14.35 -12.74 / -7.06 -7.05 -8.24 / -5.26 -4.72 -6.48
        from scratch       -9.28 -9.29 -9.36 / -8.84 -8.96 -8.70 / -8.66 -8.85 -8.68
        DIAYN accuracy (last training batch, 4 skills, chance 0.25) 0.47 0.55 0.44
    Gates: after 2 steps DIAYN beats scratch on every seed by > 1 (margins 3.7-4.6), and
    the random discriminator on average by > 0.3 (paired 1.20 -0.24 1.51, mean 0.82). That
    second gate is weak: after 1 step the random D is ahead (paired 0.62 -1.77 -1.50), and the
    quick preset (8 skills, 60 iterations) reverses the order (random D ahead; docstring of
    the module). Both meta-learned arms start worse than scratch (step 0).
    Tried: meta-training switched off (update leaves theta unchanged): the DIAYN arm equals
    scratch, the test fails."""
    res, _ = tiny_run
    f = res.final
    d = [f[f"adapt/return_{i:02d}"][:SEEDS] for i in range(3)]
    r = [f[f"adapt/return_{i:02d}"][SEEDS:2 * SEEDS] for i in range(3)]
    s = [f[f"random/return_{i:02d}"][:SEEDS] for i in range(3)]
    print("diayn", np.round(d, 2), "random D", np.round(r, 2), "scratch", np.round(s, 2),
          "acc", f["proposer_accuracy"])
    assert np.all(d[2] > s[2] + 1.0), (d, s)
    assert (d[2] - r[2]).mean() > 0.3, (d, r)
    acc = f["proposer_accuracy"]
    assert np.all(acc[:SEEDS] > 0.4) and np.all(np.isnan(acc[SEEDS:2 * SEEDS])), acc


def test_the_discriminator_is_frozen_during_meta_training(tiny_run):
    """D after meta-training equals D at the start of it (the runner's recorded chunk input),
    for both proposers; the random arm's D is DIAYN's discriminator at init, the learned
    arm's is not. Tried: `update` nudging disc_params (+1e-3): fails."""
    res, chunks = tiny_run
    start = chunks[0][1]
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, res.state.disc_params),
                 jax.tree.map(np.asarray, start.disc_params))
    k_prop = jax.random.split(jax.random.split(jax.random.PRNGKey(0), NUM)[0], 3)[0]
    d0 = compiled(lambda k: diayn.init(k, m.proposer_config(TINY)).params["disc"], k_prop)
    leaf = lambda p, i: np.asarray(jax.tree.leaves(p)[0])[i]
    np.testing.assert_array_equal(leaf(res.state.disc_params, SEEDS), jax.tree.leaves(d0)[0])
    assert not np.array_equal(leaf(res.state.disc_params, 0), jax.tree.leaves(d0)[0])


def test_tasks_are_drawn_per_meta_batch(tiny_run):
    """The logged mean z of each meta-batch of 8 proposed tasks changes from iteration to
    iteration on every seed. Tried: z drawn from a fixed key in `update`: fails."""
    z = tiny_run[0].history["charts/task_z_mean"]
    assert z.shape == (NUM, TINY.num_iterations)
    assert np.all(z.std(1) > 0.05) and z.min() >= 0 and z.max() <= TINY.num_skills - 1


def test_train_is_pure_and_cli_writes_its_files(tiny_run, capsys):
    """Same key twice in one program: bit-identical; different keys differ; rerunning the
    recorded chunk on its input gives the run's state again; --help documents every field."""
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
    again, _ = chunks[0][0](chunks[0][1])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 again.params, res.state.params)
    hist = res.history
    assert np.all(hist["losses/mean_kl"] <= TINY.max_kl)
    assert np.all(hist["losses/surrogate_after"] <= hist["losses/surrogate_before"])


def test_plot_writes_the_task_map_and_curves(tiny_run, tmp_path):
    res, _ = tiny_run
    disc0 = jax.tree.map(lambda x: np.asarray(x)[0], res.state.disc_params)
    region = compiled(lambda p: m.skill_map(p, TINY, n=31), disc0)
    assert region.shape == (31, 31) and len(np.unique(region)) >= 2
    out = m.plot([(res.final, "UML", "adapt"), (res.final, "scratch", "random")], region,
                 str(tmp_path / "a.png"))
    assert (tmp_path / "a.png").stat().st_size > 1000 and out.endswith("a.png")


def test_every_config_field_is_read():
    assert unread_fields(m) == []


def test_paper_preset_traces():
    """jax.eval_shape of init (DIAYN's 1M steps scanned) and one update under `paper`, and
    with the random proposer and bfloat16 compute."""
    cfg, state, (after, metrics) = trace_paper(m)
    assert cfg.num_skills == 50 and cfg.meta_batch_size == 20 and cfg.horizon == 100
    assert state.disc_params["params"]["Dense_2"]["kernel"].shape == (32, 50)
    assert state.params["params"]["Dense_0"]["kernel"].shape == (2, 100)
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(x.shape == () for x in jax.tree.leaves(metrics))
    for over in (dict(proposer="random"), dict(dtype="bfloat16")):
        trace_paper(m, **over)
