"""Tests of metarl/mfec.py: the table operations by hand (max-update on an exact match, the
k-NN mean, LRU eviction, the Monte-Carlo returns written at an episode's end), behaviour
against random actions and the overwrite variant in one compiled program, purity, CLI and
the paper preset (envpool Atari) traced."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metarl import mfec
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# ONE tiny configuration for the whole module: the quick preset (FourRooms, 200-step
# episodes, 2 envs, 40 updates of 400 steps, 100 entries per action).
TINY = mfec.Config(**mfec.PRESETS["quick"])


def _table(keys, values, last_used=None, capacity=None):
    """One-action table holding `keys` (n, F) with `values`, padded to `capacity`."""
    keys, values = np.asarray(keys, np.float32), np.asarray(values, np.float32)
    n, f = keys.shape
    c = capacity or n
    t = mfec.table_init(1, c, f)
    used = np.zeros(c, np.int32) if last_used is None else np.pad(last_used, (0, c - n))
    return mfec.Table(t.keys.at[0, :n].set(keys), t.values.at[0, :n].set(values),
                      jnp.asarray(used)[None], jnp.array([n], jnp.int32))


@jax.jit
def _q(table, queries):
    return mfec.q_values(table, queries, 3, 1e-6, jnp.int32(50))


@jax.jit
def _write(table, key, ret, now, max_update, lru):
    return mfec.write(table, key, 0, ret, now, 1e-6, max_update, lru)


def test_knn_estimate_is_the_exact_value_or_the_mean_of_k_neighbours():
    """1-D keys 0, 1, 2, 3, 10 with values 1, 2, 3, 4, 100 and k = 3 ([1] Eq. 2):
      query 1.4: not stored; nearest 1, 2, 0 -> (2 + 3 + 1) / 3 = 2 (a sum would give 6);
      query 2.0: stored -> its own value 3 (not the mean 3 of 1, 2, 3: use 2.1 -> 3 too, so
                 also query 9.0: nearest 10, 3, 2 -> 107 / 3; and 10.0 exactly -> 100);
      a table with only 2 entries (1 and 2): query 9 -> their mean (2 + 3) / 2 = 2.5;
      an empty table estimates 0.
    The neighbours read are marked used at time 50 (LRU), the others keep their time; the
    exact-match flags (logged as charts/exact_match) are set for 10.0 and 2.0 only.
    Mutation tried: the flag as "any valid neighbour" instead of the match: fails."""
    t = _table([[0.0], [1.0], [2.0], [3.0], [10.0]], [1, 2, 3, 4, 100], [1, 2, 3, 4, 5],
               capacity=8)
    q, t2, match = _q(t, jnp.array([[1.4], [9.0], [10.0], [2.0]]))
    np.testing.assert_allclose(q[:, 0], [2.0, 107 / 3, 100.0, 3.0], rtol=1e-6)
    np.testing.assert_array_equal(match[:, 0], [False, False, True, True])
    np.testing.assert_array_equal(t2.last_used[0, :5], [50, 50, 50, 50, 50])
    q, t3, _ = _q(t, jnp.array([[-5.0]]))  # nearest 0, 1, 2: only they are refreshed
    np.testing.assert_allclose(q[0, 0], 2.0)
    np.testing.assert_array_equal(t3.last_used[0, :5], [50, 50, 50, 4, 5])
    small = _table([[1.0], [2.0]], [2, 3], capacity=8)
    np.testing.assert_allclose(_q(small, jnp.array([[9.0]]))[0][0, 0], 2.5)
    empty = mfec.table_init(1, 8, 1)
    np.testing.assert_allclose(_q(empty, jnp.array([[9.0]]))[0][0, 0], 0.0)


def test_write_keeps_the_max_on_an_exact_match_and_appends_otherwise():
    """[1] Eq. (1): an empty table takes (k, 1.0); the same key with 0.5 keeps 1.0, with 2.0
    becomes 2.0, still one entry; a new key is appended (size 2). The broken overwrite rule
    sets 0.5. Each write marks its entry used at its time."""
    t = mfec.table_init(1, 4, 2)
    k1, k2 = jnp.array([0.3, -1.2]), jnp.array([0.3, -1.1])
    yes, no = jnp.array(True), jnp.array(False)
    t = _write(t, k1, 1.0, 1, yes, yes)
    t = _write(t, k1, 0.5, 2, yes, yes)
    assert int(t.size[0]) == 1 and float(t.values[0, 0]) == 1.0 and int(t.last_used[0, 0]) == 2
    t = _write(t, k1, 2.0, 3, yes, yes)
    assert int(t.size[0]) == 1 and float(t.values[0, 0]) == 2.0
    t = _write(t, k2, 0.5, 4, yes, yes)
    assert int(t.size[0]) == 2 and float(t.values[0, 1]) == 0.5
    np.testing.assert_array_equal(t.keys[0, 1], k2)
    over = _write(t, k1, 0.5, 5, no, yes)
    assert int(over.size[0]) == 2 and float(over.values[0, 0]) == 0.5


def test_a_full_table_replaces_its_least_recently_used_entry():
    """Capacity 3, last used at times 5, 2, 7: a new key at time 9 replaces slot 1 (time 2);
    then the oldest is slot 0 (time 5). With eviction none the full table is unchanged; an
    exact match is still max-updated."""
    yes, no = jnp.array(True), jnp.array(False)
    t = _table([[0.0], [1.0], [2.0]], [1, 2, 3], [5, 2, 7])
    t1 = _write(t, jnp.array([5.0]), 9.0, 9, yes, yes)
    np.testing.assert_array_equal(t1.keys[0, :, 0], [0.0, 5.0, 2.0])
    np.testing.assert_array_equal(t1.values[0], [1, 9, 3])
    np.testing.assert_array_equal(t1.last_used[0], [5, 9, 7])
    assert int(t1.size[0]) == 3
    t2 = _write(t1, jnp.array([6.0]), 4.0, 10, yes, yes)
    np.testing.assert_array_equal(t2.keys[0, :, 0], [6.0, 5.0, 2.0])
    frozen = _write(t, jnp.array([5.0]), 9.0, 9, yes, no)
    jax.tree.map(np.testing.assert_array_equal, frozen, t)
    frozen = _write(t, jnp.array([2.0]), 9.0, 9, yes, no)
    np.testing.assert_array_equal(frozen.values[0], [1, 2, 9])


def test_flush_writes_the_discounted_returns_of_ended_episodes_only():
    """An ended episode of env 0: rewards 0, 1, 0, 2 with gamma 0.5 (through `flush`, as the
    update runs it): R_3 = 2, R_2 = 0 + 0.5 * 2 = 1, R_1 = 1 + 0.5 * 1 = 1.5,
    R_0 = 0 + 0.5 * 1.5 = 0.75. Steps 0 and 2 visit the same state with the same action:
    one entry with max(R_0, R_2) = 1. Env 1's episode has not ended: nothing of it is
    written. The broken overwrite rule would keep R_0 = 0.75 (written last, backwards)."""
    cfg = dataclasses.replace(TINY, gamma=0.5, num_envs=2, max_episode_steps=6)
    s = _flush_state(cfg)
    table = jax.jit(lambda s: mfec.flush(s.table, s, jnp.array([True, False]), 7, cfg))(s)
    np.testing.assert_array_equal(table.size, [0, 2, 1, 0])
    # action 1, written backwards: step 2 (key 1, R 1), step 1 (key 2, R 1.5), step 0 (key 1)
    np.testing.assert_array_equal(table.keys[1, :2, 0], [1.0, 2.0])
    np.testing.assert_allclose(table.values[1, :2], [1.0, 1.5])
    np.testing.assert_allclose(table.values[2, 0], 2.0)  # step 3: key 3, action 2, R 2
    np.testing.assert_array_equal(table.last_used[1, :2], [7, 7])


def _flush_state(cfg, n_actions=4, capacity=8):
    keys = np.zeros((2, 6, cfg.key_dim), np.float32)
    keys[0, :4, 0] = [1.0, 2.0, 1.0, 3.0]
    keys[1, :2, 0] = [7.0, 8.0]
    return mfec.State(mfec.table_init(n_actions, capacity, cfg.key_dim), None, None, None,
                      jnp.asarray(keys), jnp.array([[1, 1, 1, 2, 0, 0], [0, 0, 0, 0, 0, 0]]),
                      jnp.array([[0.0, 1, 0, 2, 0, 0], [5, 5, 0, 0, 0, 0]]), jnp.array([4, 2]),
                      None, None, mfec.Hyper(jnp.float32(0), jnp.array(True), jnp.array(True)))


def test_flush_under_vmap_runs_seed_by_seed_without_selecting_the_whole_table():
    """The runner vmaps seeds; flush's loops have a per-seed trip count. Vmapped plainly they
    become one loop with a batched predicate that selects over every seed's whole table
    (tensor<2x3x7x5>) at every write: at paper size (1M x 9 x 64 per seed) that is the cost
    of the run. With sequential_vmap the lowered program has no such select, and 2 seeds
    (one with an ended episode, one without) give each seed's own unbatched flush.
    Mutation tried: sequential_vmap removed (plain fori_loops): fails (the select is there)."""
    import re

    cfg = dataclasses.replace(TINY, gamma=0.5, key_dim=5, max_episode_steps=6)
    s = _flush_state(cfg, 3, 7)
    two = jax.tree.map(lambda x: jnp.stack([x, x]), s)
    ended = jnp.array([[True, False], [False, False]])
    f = jax.jit(jax.vmap(lambda s, e: mfec.flush(s.table, s, e, 7, cfg)))
    text = f.lower(two, ended).as_text()
    assert not re.search(r"select.*tensor<2x3x7x5xf32>", text)
    got = f(two, ended)
    one = jax.jit(lambda s, e: mfec.flush(s.table, s, e, 7, cfg))
    for i in range(2):
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(lambda x: x[i], got),
                     one(s, ended[i]))
    assert int(got.size[0].sum()) == 3 and int(got.size[1].sum()) == 0


def test_epsilon_is_annealed_linearly_then_constant():
    """astier's schedule: epsilon_start 1.0 -> epsilon 0.1 over 100 agent steps with 2 envs
    (the clock counts vector steps): 1.0 at step 0, 0.55 at 50 agent steps (time 25), 0.1 at
    100 and after (time 50, 80); epsilon_decay_steps = 0 keeps the state's epsilon.
    Mutation tried: the fraction not clipped at 1 (0.1 - 0.54 at time 80): fails."""
    cfg = dataclasses.replace(TINY, epsilon_start=1.0, epsilon_decay_steps=100, num_envs=2)
    hyper = mfec.Hyper(jnp.float32(0.1), jnp.array(True), jnp.array(True))
    f = jax.jit(jax.vmap(lambda t: mfec.epsilon_at(mfec.State(*[None] * 8, t, None, hyper),
                                                   cfg)))
    np.testing.assert_allclose(f(jnp.array([0, 25, 50, 80])), [1.0, 0.55, 0.1, 0.1],
                               rtol=1e-6)
    const = dataclasses.replace(cfg, epsilon_decay_steps=0)
    assert float(mfec.epsilon_at(mfec.State(*[None] * 8, jnp.int32(9), None, hyper),
                                 const)) == np.float32(0.1)


def test_bad_values_fail_with_named_field(tmp_path):
    bad = [(["--update-rule", "mean"], "update_rule='mean'"),
           (["--eviction", "fifo"], "eviction='fifo'"), (["--dtype", "fp8"], "dtype='fp8'"),
           (["--epsilon", "1.5"], r"epsilon=1.5 must be in \[0, 1\]"),
           (["--epsilon-start", "-0.5"], r"epsilon_start=-0.5 must be in \[0, 1\]"),
           (["--epsilon-decay-steps", "-1"], "epsilon_decay_steps=-1 must be >= 0"),
           (["--num-neighbours", "200"], "num_neighbours=200 must be <= capacity=100"),
           (["--capacity", "0"], "--capacity must be >= 1"),
           (["--key-dim", "0"], "--key-dim must be >= 1"),
           (["--gamma", "1.5"], r"--gamma must be in \[0, 1\]")]
    for args, msg in bad:
        with pytest.raises(ValueError, match=msg):
            mfec.main(["--preset", "quick", *args, "--run-dir", str(tmp_path)])


SEEDS = 4
VARIANTS = ("MFEC", "random actions", "overwrite")
RUN_ARGS = ["--preset", "quick", "--num-seeds", str(len(VARIANTS) * SEEDS), "--log-every",
            "10", "--no-progress"]


def _run(run_dir, *extra):
    """TINY through `mfec.main`, 3 x SEEDS seeds in ONE compiled program: seeds SEEDS..2S-1
    act at random (epsilon = 1), 2S..3S-1 overwrite instead of max ([1] Eq. 1 broken), each on
    the key of its MFEC twin (the variants travel in the state's traced `hyper`)."""
    keys = jax.random.split(jax.random.PRNGKey(0), len(VARIANTS) * SEEDS)  # the runner's keys
    real = mfec.init

    def init(key, cfg):
        i = jnp.argmax(jnp.all(key == keys, -1))
        state = real(keys[i % SEEDS], cfg)
        v = i // SEEDS
        return state.replace(hyper=mfec.Hyper(jnp.where(v == 1, 1.0, state.hyper.epsilon),
                                              v != 2, state.hyper.lru))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mfec, "init", init)
        return mfec.main(RUN_ARGS + ["--run-dir", str(run_dir), *extra])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("mfec"))


def test_mfec_learns_from_few_episodes_where_the_baselines_do_not(tiny_run):
    """Behaviour ([1]'s claim, data efficiency) in seconds: FourRooms, goal 20 steps away,
    200-step episodes, 16,000 steps (80 to 160 episodes per seed), 4 seeds; evaluated on 64
    fresh episodes (epsilon 0.05). Measured (CPU, jax 0.10.2), eval success rate / mean
    episode length, and goals reached while training:
        MFEC             1.00 1.00 1.00 1.00 / 21.3 22.1 21.2 21.5   goals 338 613 573 540
        random actions   0.05 0.03 0.03 0.06 / ~197                  goals   3   6   6   2
        overwrite        0.00 1.00 0.28 0.00 / 200 29 177 200        goals  23  12  41  21
    MFEC latches onto the first path that reached the goal and shortens it (the optimum is
    20 steps); overwriting with the latest return forgets a success after the next failed
    (epsilon-perturbed) episode."""
    f, h = tiny_run.final, tiny_run.history
    ret = f["eval_return"]
    groups = [ret[i * SEEDS:(i + 1) * SEEDS] for i in range(len(VARIANTS))]
    print(dict(zip(VARIANTS, groups, strict=True)), f["eval_length"])
    goals = np.nansum(h["charts/episodic_return"] * h["charts/episodes"], 1)
    print("goals while training", goals)
    mf, rand, over = groups
    assert np.median(mf) >= 0.9 and mf.min() > 0.5, mf
    assert rand.max() < 0.2 and np.median(over) < 0.5, (rand, over)
    assert f["eval_length"][:SEEDS].mean() < 30, f["eval_length"]
    assert goals[:SEEDS].min() > 5 * goals[SEEDS:].max(), goals
    em = h["charts/exact_match"]  # MFEC revisits its stored states: ~0.7-0.8 at the end
    assert ((em >= 0) & (em <= 1)).all() and (em[:SEEDS, -1] > 0.3).all(), em[:, -1]


def test_train_is_pure_and_cli_writes_its_files(tiny_run, tmp_path, capsys):
    """Same keys: bit-identical a second time over the first 10 updates (the same compiled
    chunk, served by the persistent compilation cache); seeds differ; the run wrote its
    files; --help documents every field."""
    with pytest.raises(SystemExit):
        mfec.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(mfec.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert (tiny_run.run_dir / "metrics.jsonl").exists()
    q = tiny_run.history["charts/q_mean"]
    assert q.shape == (len(VARIANTS) * SEEDS, 40) and np.isfinite(q).all()
    assert not np.array_equal(q[0], q[1])
    again = _run(tmp_path, "--num-updates", "10")
    for k, v in again.history.items():
        np.testing.assert_array_equal(v, tiny_run.history[k][:, :10], err_msg=k)


def test_every_config_field_is_read():
    assert unread_fields(mfec) == []


def test_paper_preset_traces():
    """jax.eval_shape of init and one update under `paper` (envpool Ms. Pac-Man, 9 actions,
    one 84x84 grey frame, 1M entries of 64-d keys per action, 27k-step episode buffer):
    the preset builds its env, shapes and state on CPU without running (envpool's ALE is in
    the wheel here). bfloat16 compute traces too."""
    cfg, state, (after, metrics) = trace_paper(mfec)
    assert state.obs.shape == (1, 1, 84, 84) and state.proj.shape == (84 * 84, 64)
    assert state.table.keys.shape == (9, 1_000_000, 64)
    assert state.ep_keys.shape == (1, 27_000, 64)
    assert cfg.num_updates == 25_000
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
    trace_paper(mfec, dtype="bfloat16")


def test_plot_writes_the_learning_curve(tiny_run, tmp_path):
    out = mfec.plot_curves([tiny_run.run_dir], str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").stat().st_size > 1000 and out.endswith("c.png")
