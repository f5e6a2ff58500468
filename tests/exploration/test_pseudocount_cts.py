"""Tests of exploration/pseudocount_cts.py: the pseudo-count identity, the bonus, the CTS
density model by hand (Dirichlet estimator, contexts and nodes, switching weights), the
recoding probability as a re-query, learning-positivity and the count of a repeated frame,
the Bonus's `reward` frame order, behaviour against the same PPO with beta = 0, purity, CLI
and the paper preset."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from exploration import pseudocount_cts as pc
from tests.common.cli import cli_args
from tests.common.compiled import compiled, main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

QUICK = pc.Config(**pc.PRESETS["quick"])
# One tiny configuration: DeepSea N = 12 as a 12 x 12 binary image, 8 envs x 48 steps x 12
# updates (4,608 steps), the paper's density model (depth 4) and beta = 0.05.
TINY = dataclasses.replace(
    QUICK, env_id="DeepSea-bsuite-12", num_envs=8, num_steps=48, total_timesteps=4608
)


def test_pseudo_count_identity_and_bonus():
    """[1] Eq. 2 with the empirical model rho = N/n, rho' = (N + 1)/(n + 1) gives back N
    exactly; the PG count (exp(PG) - 1)^-1 = rho / (rho' - rho) is the same without the
    factor (1 - rho'), so it is larger, by a factor 1/(1 - rho'). A model that is not
    learning-positive (rho' <= rho) gets a huge count, PG floored at fast_cts's 1e-10.
    Bonus 0.05 (N + 0.01)^-1/2 for N = 0, 0.99, 3.99: 0.5, 0.05, 0.025."""
    big_n = np.array([1e-30, 1.0, 3.0, 10.0, 500.0])
    n = np.array([1.0, 4.0, 10.0, 1000.0, 600.0])
    log_rho, log_rho_p = np.log(big_n / n), np.log((big_n + 1) / (n + 1))
    exact, pg, bad, bonus = compiled(
        lambda a, b: (
            pc.pseudo_count(a, b),
            pc.pg_count(a, b),
            pc.pseudo_count(-3.0, -0.5),
            pc.count_bonus(jnp.array([0.0, 0.99, 3.99]), 0.05),
        ),
        np.float32(log_rho),
        np.float32(log_rho_p - log_rho),
    )
    np.testing.assert_allclose(exact, big_n, atol=1e-5, rtol=5e-5)  # float32
    rho_p = (big_n + 1) / (n + 1)
    np.testing.assert_allclose(pg, big_n / (1 - rho_p), rtol=1e-4, atol=1e-6)
    assert pc.MIN_PG == 1e-10 and bad > 9e9
    np.testing.assert_allclose(bonus, [0.5, 0.05, 0.025], rtol=1e-5)


def test_quantize_contexts_and_nodes_by_hand():
    """Levels floor(x L / obs_high): Atari 0, 31, 32, 255 -> 0, 0, 1, 7 (L = 8, 256);
    DeepSea 0, 1 -> 0, 1 (L = 2, obs_high 2). Contexts of [[1, 2, 3], [4, 5, 6]] (left, up,
    up-left, up-right; 0 outside): pixel 4 (row 1, col 1) -> (4, 2, 1, 3); pixel 2 -> (2, 0,
    0, 0). Nodes for L = 2, context (1, 0): depth 0 -> 0, depth 1 -> 1 + 1 = 2, depth 2 ->
    1 + 2 + (1 * 2 + 0) = 5; 1 + 2 + 4 + 8 + 16 = 31 nodes per pixel."""
    q8, q2, ctx, nodes = compiled(
        lambda: (
            pc.quantize(jnp.array([0, 31, 32, 255], jnp.uint8), 8, 256.0),
            pc.quantize(jnp.array([0.0, 1.0]), 2, 2.0),
            pc.contexts(jnp.array([[1, 2, 3], [4, 5, 6]]), 4),
            pc.node_index(jnp.array([[1, 0]]), 2),
        )
    )
    np.testing.assert_array_equal(q8, [0, 0, 1, 7])
    np.testing.assert_array_equal(q2, [0, 1])
    assert ctx.shape == (6, 4)
    np.testing.assert_array_equal(ctx[4], [4, 2, 1, 3])
    np.testing.assert_array_equal(ctx[2], [2, 0, 0, 0])
    np.testing.assert_array_equal(ctx[3], [0, 1, 0, 2])
    np.testing.assert_array_equal(nodes, [[0, 2, 5]])
    assert pc.num_nodes(2, 4) == 31 and pc.num_nodes(8, 4) == 4681


def test_dirichlet_estimator_gives_count_plus_prior():
    """Depth 0 (no context): each pixel is a Dirichlet estimator with the Perks prior,
    rho = (N + 1/L)/(n + 1), whose pseudo-count is exactly N + 1/L ([1] Sec. 3's example of a
    count-based estimator). One pixel, L = 4, the same level 5 times: N_hat = 0.25, 1.25,
    ..., 4.25, through `cts_step` as `update` runs it."""
    step = jax.jit(lambda m, x: pc.cts_step(m, x, 4, 0))
    model = pc.cts_init((1, 1), 4, 0)
    for i in range(5):
        model, lr, pg = step(model, jnp.array([[2]]))
        np.testing.assert_allclose(lr, np.log((i + 0.25) / (i + 1)), rtol=1e-6)
        np.testing.assert_allclose(pc.pseudo_count(lr, pg), i + 0.25, rtol=1e-4)
    assert int(model["n"]) == 5
    np.testing.assert_array_equal(model["counts"][0, 0], [0, 0, 5, 0])


def test_context_tree_switching_by_hand():
    """Depth 1, L = 2, frames 1 x 2; pixel 1's context is pixel 0's level. Frame A = [[0, 1]]
    then B = [[1, 1]]:
      A: both pixels p = 1/2 (fresh estimators, equal weights); after it (n = 1, alpha = 1/2)
         the weights stay equal and every estimator on the path gives 3/4: rho' = 9/16.
      B, pixel 1 (context 1, a new child): root p_e = (1 + 1/2)/2 = 3/4, child 1/2, mix 5/8.
         Switching (n = 2, alpha = 1/3): stay = 2/3 * 1/2 * 3/4 + 1/3 * 1/2 * 1/2 = 1/3,
         split = 2/3 * 1/4 + 1/3 * 3/8 = 7/24 -> normalised 8/15, 7/15. Then root 5/6,
         child 3/4: rho'_pixel1 = 8/15 * 5/6 + 7/15 * 3/4 = 143/180.
      B, pixel 0 (context 0): root and child p(1) = 1/4, then 1/2.
    And after B, [[0, 0]] pixel 1 (context 0, level 0): 8/15 * 1/6 + 7/15 * 1/4 = 37/180."""
    step = jax.jit(lambda m, x: pc.cts_step(m, x, 2, 1))
    logp = jax.jit(lambda m, x: pc.cts_log_prob(m, x, 2, 1))
    model = pc.cts_init((1, 2), 2, 1)
    model, lr, pg = step(model, jnp.array([[0, 1]]))
    np.testing.assert_allclose(np.exp([lr, lr + pg]), [1 / 4, 9 / 16], rtol=1e-6)
    np.testing.assert_allclose(pc.pseudo_count(lr, pg), (1 / 4) * (7 / 16) / (5 / 16), rtol=1e-5)
    model, lr, pg = step(model, jnp.array([[1, 1]]))
    np.testing.assert_allclose(np.exp([lr, lr + pg]), [1 / 4 * 5 / 8, 1 / 2 * 143 / 180], rtol=1e-5)
    np.testing.assert_allclose(np.exp(model["log_w"][1, 0]), [8 / 15, 7 / 15], rtol=1e-5)
    np.testing.assert_allclose(np.exp(logp(model, jnp.array([[0, 0]]))[1]), 37 / 180, rtol=1e-5)


def test_recoding_is_a_requery_and_learning_positive():
    """The paper's model (depth 4, 8 levels) on 60 random 5 x 6 frames drawn from 12 (so
    frames repeat): `cts_step`'s rho is `cts_log_prob` of the model before, its rho' that of
    the updated model (the "update a copy, re-query" of [1]), and rho' > rho on every
    frame (learning-positive here, though CTS is not in general).
    PG on a 42 x 42 frame (8 levels, depth 4, every node's counts at 1e5 per level, so the
    frame's log rho is ~-3,700 and PG ~0.015) is the sum of the per-pixel gains: with the
    difference of the two float32 frame sums in its place (mutation) it is off by ~1e-2
    relative and fails rtol 1e-3."""
    frames = jax.random.randint(jax.random.PRNGKey(0), (12, 5, 6), 0, 8)
    order = jax.random.randint(jax.random.PRNGKey(1), (60,), 0, 12)

    def go(frames, order):
        def body(model, i):
            x = frames[i]
            new, lr, pg = pc.cts_step(model, x, 8, 4)
            before = pc.cts_log_prob(model, x, 8, 4).sum()
            after = pc.cts_log_prob(new, x, 8, 4).sum()
            return new, (lr, lr + pg, before, after)

        out = jax.lax.scan(body, pc.cts_init((5, 6), 8, 4), order)[1]
        big = pc.cts_init((42, 42), 8, 4)
        big = {**big, "counts": jnp.full_like(big["counts"], 100_000)}
        x = jax.random.randint(jax.random.PRNGKey(4), (42, 42), 0, 8)
        new, _, pg = pc.cts_step(big, x, 8, 4)
        gains = pc.cts_log_prob(new, x, 8, 4) - pc.cts_log_prob(big, x, 8, 4)
        return out, pg, gains

    (lr, lrp, before, after), pg, gains = jax.device_get(compiled(go, frames, order))
    np.testing.assert_allclose(lr, before, rtol=1e-6)
    np.testing.assert_allclose(lrp, after, rtol=3e-6)  # lr + pg: one more rounding
    assert (lrp > lr).all()
    np.testing.assert_allclose(pg, gains.astype(np.float64).sum(), rtol=1e-3)
    assert 0.005 < pg < 0.05


def test_pseudo_count_of_a_repeated_frame_grows_like_a_count():
    """A 4 x 4 frame (levels 0..7) seen m = 1..30 times after 30 other random frames: the
    pseudo-count rises strictly with m, roughly one per sighting once the model has seen it
    a few times (increments 0.5-1.5 from m = 10), and the PG count bounds it from above."""
    others = jax.random.randint(jax.random.PRNGKey(2), (30, 4, 4), 0, 8)
    x = jax.random.randint(jax.random.PRNGKey(3), (4, 4), 0, 8)

    def go():
        def body(model, y):
            return pc.cts_step(model, y, 8, 4)[0], None

        model = jax.lax.scan(body, pc.cts_init((4, 4), 8, 4), others)[0]

        def rep(model, _):
            model, lr, pg = pc.cts_step(model, x, 8, 4)
            return model, (pc.pseudo_count(lr, pg), pc.pg_count(lr, pg))

        return jax.lax.scan(rep, model, None, length=30)[1]

    n_hat, n_pg = map(np.asarray, compiled(go))
    assert (np.diff(n_hat) > 0).all()
    assert ((np.diff(n_hat)[9:] > 0.5) & (np.diff(n_hat)[9:] < 1.5)).all()
    assert (n_pg >= n_hat * (1 - 1e-5)).all()


@pytest.mark.parametrize("count", ["pseudo", "pg"])
def test_bonus_reward_feeds_frames_in_order(count):
    """The Bonus's `reward` on a [T = 2, N = 2] rollout of 3 x 3 DeepSea-like frames: it
    quantises (L = 2), feeds the frames to the model time-major, env-minor, one at a time
    (the order matters: a repeated frame's count depends on what came before), and gives
    beta (N_hat + 0.01)^-1/2 with the chosen count; the model's n is 4 afterwards."""
    cfg = dataclasses.replace(TINY, count=count, beta=0.3)
    bonus = pc.make_bonus(cfg, pixels=False)
    obs = jnp.zeros((2, 2, 3, 3)).at[0, 0, 0, 0].set(1).at[0, 1, 1, 0].set(1)
    obs = obs.at[1, 0, 0, 0].set(1).at[1, 1, 1, 1].set(1)
    count_fn = pc.pseudo_count if count == "pseudo" else pc.pg_count

    def go(obs):
        _, stats = bonus.init(jax.random.PRNGKey(0), obs[0])
        r, new = bonus.reward({}, stats, {"obs": obs})
        model, want = pc.cts_init((3, 3), 2, 4), []
        for t, e in ((0, 0), (0, 1), (1, 0), (1, 1)):  # by hand, in this order
            model, lr, pg = pc.cts_step(model, obs[t, e].astype(jnp.int32), 2, 4)
            want.append(0.3 * jax.lax.rsqrt(count_fn(lr, pg) + 0.01))
        return r, new, model, jnp.stack(want)

    r, new, model, want = compiled(go, obs)
    np.testing.assert_allclose(r, np.reshape(want, (2, 2)), rtol=1e-5)
    assert int(new["n"]) == 4
    np.testing.assert_array_equal(new["counts"], model["counts"])


SEEDS = 6


def _argv(run_dir):
    return [
        *cli_args(TINY, QUICK, "quick"),
        "--num-seeds",
        str(2 * SEEDS),
        "--log-every",
        "12",
        "--no-progress",
        "--run-dir",
        str(run_dir),
    ]


def _main(argv):
    """`pc.main`, 2 x SEEDS seeds in ONE compiled program: seeds SEEDS.. are the broken
    variant, the same PPO with beta = 0 (a traced statistic of the Bonus; the density model
    still learns), each on the key of its CTS twin."""
    keys = jax.random.split(jax.random.PRNGKey(0), 2 * SEEDS)  # the runner's seed keys
    real = pc.init

    def init(key, cfg):
        i = jnp.argmax(jnp.all(key == keys, -1))
        state = real(keys[i % SEEDS], cfg)
        stats = state.bonus_stats
        return state.replace(
            bonus_stats={**stats, "beta": jnp.where(i >= SEEDS, 0.0, stats["beta"])}
        )

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pc, "init", init)
        return pc.main(argv)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return main_recording_chunks(_main, _argv(tmp_path_factory.mktemp("cts")))


def test_cts_bonus_explores_more_than_ppo(tiny_run):
    """Behaviour: DeepSea N = 12 as an image, 4,608 steps, 6 seeds, in one compiled run of
    the CLI; distinct cells visited (78 cells plus the 13 end positions of row 12), measured
    on a loaded 2-core CPU:
        CTS beta = 0.05   87 87 89 89 89 87   median 88,   mean 88.0
        PPO (beta = 0)    80 79 88 82 79 81   median 80.5, mean 81.5
    The broken variant (beta = 0) fails both gaps (0). Mutations: a constant bonus (the
    pseudo-count frozen at 0, r = beta / 0.1 on every frame) scores 83 83 87 76 78 80
    (median 81.5) and fails the median gap and the count assert; a Bonus that ignores its
    traced beta (both halves get the bonus) fails the beta = 0 assert."""
    result, _ = tiny_run
    h = result.history
    cells = h["charts/distinct_cells"][:, -1]
    on, off = cells[:SEEDS], cells[SEEDS:]
    print("CTS", on, "PPO", off)
    assert np.median(on) >= np.median(off) + 4, (on, off)
    assert on.mean() >= off.mean() + 3, (on, off)
    assert (h["charts/intrinsic_reward"][SEEDS:] == 0).all()  # beta = 0: no bonus
    assert (h["charts/intrinsic_reward"][:SEEDS] > 0).all()
    counts = h["charts/pseudo_count"]  # median pseudo-count of a rollout's frames grows
    assert (counts[:, -1] > counts[:, 0]).all()
    np.testing.assert_array_equal(result.final["distinct_cells"], cells)


def test_train_is_pure(tiny_run):
    """The CLI run's one compiled chunk (all 12 updates), run again on its recorded input
    states, gives the run's final state and metrics bit for bit; the seeds differ."""
    result, chunks = tiny_run
    assert len(chunks) == 1
    chunk, states = chunks[0]
    state, metrics = jax.device_get(chunk(states))
    for x, y in zip(jax.tree.leaves(result.state), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(x, y)
    for k in ("losses/policy", "charts/pseudo_count", "charts/distinct_cells"):
        np.testing.assert_array_equal(result.history[k], metrics[k])
    counts = np.asarray(state.bonus_stats["counts"])
    assert not np.array_equal(counts[0], counts[1])
    assert not np.array_equal(metrics["losses/policy"][0], metrics["losses/policy"][1])
    np.testing.assert_array_equal(
        result.state.bonus_stats["beta"], np.float32([TINY.beta] * SEEDS + [0.0] * SEEDS)
    )


def test_cli_run_writes_its_files(tiny_run, capsys):
    """`--help` documents every field; the tiny run wrote its files; bad values fail before
    compiling with the field named."""
    result, _ = tiny_run
    with pytest.raises(SystemExit):
        pc.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(pc.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out
    assert (result.run_dir / "metrics.jsonl").exists()
    assert result.history["charts/distinct_cells"].shape == (2 * SEEDS, 12)


def test_bad_values_fail_with_named_field(tmp_path):
    for flag, value, field in (
        ("--count", "exact", "count"),
        ("--levels", "1", "levels"),
        ("--context-length", "5", "context_length"),
        ("--beta", "-1", "beta"),
        ("--obs-high", "0", "obs_high"),
    ):
        with pytest.raises(ValueError, match=field):
            pc.main(["--preset", "quick", flag, value, "--run-dir", str(tmp_path)])


def test_every_config_field_is_read():
    """No flag that lies: each Config field is read by code that runs (AST, not text)."""
    assert unread_fields(pc) == []


def test_paper_preset_traces():
    """jax.eval_shape of init and one update under the `paper` preset: Montezuma's Revenge
    through envpool, 42x42 grey frames (4 stacked), the CTS model over the last frame with
    8 levels and depth 4 (1,764 pixels x 4,681 nodes x 8 levels of int32 counts, 264 MB per
    seed), with 8 envs instead of 128 (building 128 ALE emulators takes ~40 s on a 2-core
    CPU; nothing else depends on the number)."""
    cfg, state, (after, metrics) = trace_paper(pc, num_envs=8)
    assert state.obs.shape == (8, 4, 42, 42)
    assert state.bonus_stats["counts"].shape == (42 * 42, 4681, 8)
    assert state.bonus_stats["log_w"].shape == (42 * 42, 4681, 2)
    assert state.env_state.visited.shape == (256,)  # rooms
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
    assert cfg.beta == 0.05 and cfg.levels == 8 and cfg.context_length == 4
