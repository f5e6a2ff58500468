"""Tests of exploration/pseudocount_pixelcnn.py: masked-convolution causality, the prediction
gain of a new and of a repeated frame, the pseudo-count and bonus formulas, the Bonus's
`reward` as `update` runs it, CLI, purity, every Config field read and the paper preset."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

from exploration import pseudocount_pixelcnn as pp
from tests.common.cli import cli_args
from tests.common.compiled import compiled, main_recording_chunks
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

QUICK = pp.Config(**pp.PRESETS["quick"])
# One tiny configuration: DeepSea N = 8 as an 8 x 8 binary image, 4 envs x 16 steps x 2
# updates, a PixelCNN of 8 feature maps and one gated block.
TINY = dataclasses.replace(
    QUICK, env_id="DeepSea-bsuite-8", num_envs=4, num_steps=16, total_timesteps=128,
    features=8, out_features=16, num_blocks=1, num_epochs=1, num_minibatches=2,
)


def test_masked_convolutions_are_causal():
    """[3]: the logits at pixel i depend on the pixels before i in raster order and on no
    pixel at or after i. jax.jacobian of the logits of a random 6 x 6 frame (a float copy of
    the levels) w.r.t. the input: zero on and after i for every i, and nonzero somewhere
    before i for the pixels that have a past (the 7x7 type-A kernel reaches 3 rows up).
    Mutations: type B for the first convolution (the centre seen) fails the zero check; a
    mask with the row below fails it too."""
    net = pp.PixelCNN(levels=4, features=8, num_blocks=2, out_features=16)
    x = jax.random.randint(jax.random.PRNGKey(0), (6, 6), 0, 4)

    def go(x):
        params = net.init(jax.random.PRNGKey(1), x[None])

        def logits(xf):  # the network reads 2 x / (L - 1) - 1 of a float frame as well
            return net.apply(params, xf[None])[0].sum(-1)  # (6, 6)

        return jax.jacobian(logits)(x.astype(jnp.float32))  # (6, 6, 6, 6)

    jac = np.asarray(compiled(go, x)).reshape(36, 36)  # [output pixel, input pixel]
    after = np.triu(np.ones((36, 36), bool))  # input index >= output index
    assert np.abs(jac[after]).max() == 0.0
    assert all(np.abs(jac[i, :i]).max() > 0 for i in range(1, 36))
    np.testing.assert_array_equal(
        pp.causal_mask(3, "A"), [[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(
        pp.causal_mask(3, "B"), [[1, 1, 1], [1, 1, 0], [0, 0, 0]])


def test_prediction_gain_of_new_and_repeated_frames():
    """PG > 0 for a frame the model has never seen (after 30 steps on other frames), and it
    decays over 20 repeats (the mean of each 5 below the last 5's, the 20th under 0.6 x the
    first) of that frame, each repeat one SGD step of eta on it
    (theta' of `prediction_gain` is the next theta: [1]'s online model). PG is the sum of
    the per-pixel gains and log rho the frame's log-likelihood. The catalogue asks PG to fall
    monotonically over the 20 repeats; this checks the means of blocks of 5 and the last vs
    the first, not each step (single steps of the tiny model are noisy)."""
    cfg = dataclasses.replace(TINY, levels=4, pg_lr=0.1)
    net = pp.make_density(cfg)
    others = jax.random.randint(jax.random.PRNGKey(2), (30, 8, 8), 0, 4)
    x = jax.random.randint(jax.random.PRNGKey(3), (8, 8), 0, 4)

    def sgd(params, y):
        g = jax.grad(lambda p: pp.density_loss(net, p, y[None]))(params)
        return jax.tree.map(lambda p, g: p - cfg.pg_lr * g, params, g)

    def go(x, others):
        params = jax.lax.scan(lambda p, y: (sgd(p, y), None), net.init(
            jax.random.PRNGKey(0), x[None]), others)[0]

        def rep(p, _):
            lr, pg = pp.prediction_gain(net, p, x, cfg.pg_lr)
            after = pp.pixel_log_probs(net, sgd(p, x), x).sum()
            return sgd(p, x), (lr, pg, after)

        return jax.lax.scan(rep, params, None, length=20)[1]

    lr, pg, after = map(np.asarray, compiled(go, x, others))
    assert pg[0] > 0 and (pg > 0).all()
    assert (np.diff(pg.reshape(4, 5).mean(1)) < 0).all(), pg  # means of 5 repeats fall
    assert pg[-1] < 0.6 * pg[0], pg
    np.testing.assert_allclose(lr + pg, after, rtol=1e-4)
    assert (np.diff(lr) > 0).all()  # the frame becomes likelier


def test_pseudo_count_and_bonus_formulas():
    """[1] Sec. 4: N_hat = (exp(c n^-1/2 PG_+) - 1)^-1 and r^+ = beta N_hat^-1/2.
    c = 0.1, n = 100: PG = 10 -> c n^-1/2 PG = 0.1, N_hat = 1/(e^0.1 - 1) = 9.508;
    PG = 0 or < 0 (clipped) -> N_hat = inf, bonus 0 (not nan); beta = 0.1 -> r^+ = 0.1 /
    sqrt(9.508) = 0.03243; PG = 1e5 -> the gain capped at 25 (N_hat finite, not 0) and the
    bonus capped at MAX_BONUS = 1 (beta e^12.5 = 26,834 without it). Mutation: the bonus cap
    removed fails (26,834 > 1)."""
    pg = jnp.array([10.0, 0.0, -3.0, 50.0, 1e5])
    n_hat, bonus = compiled(
        lambda pg: (pp.pseudo_count(pg, 100.0, 0.1), pp.count_bonus(pg, 100.0, 0.1, 0.1)), pg)
    np.testing.assert_allclose(n_hat[0], 1 / np.expm1(0.1), rtol=1e-5)
    np.testing.assert_allclose(n_hat[3], 1 / np.expm1(0.5), rtol=1e-5)
    assert np.isinf(n_hat[1]) and np.isinf(n_hat[2])
    np.testing.assert_allclose(n_hat[4], 1 / np.expm1(25.0), rtol=1e-5)  # gain capped
    np.testing.assert_allclose(bonus[:4], 0.1 / np.sqrt(n_hat[:4]), rtol=1e-5)
    assert bonus[1] == 0 and bonus[2] == 0
    assert pp.MAX_BONUS == 1.0 and bonus[4] == pp.MAX_BONUS  # r^+ capped at 1


def test_frames_are_the_newest_stacked_frame():
    """Atari: frames_of reads the last (newest) of the 4 stacked frames: frame k filled with
    64 k gives level floor(192 x 8 / 256) = 6 everywhere (the oldest would give 0); DeepSea's
    0 / 1 image gives levels 0 / 1 (L = 2, obs_high = 2). Mutation: obs[..., 0, :, :] (the
    oldest frame) fails."""
    obs = jnp.broadcast_to(64.0 * jnp.arange(4.0)[:, None, None], (2, 4, 42, 42))
    f = np.asarray(pp.frames_of(obs, pp.Config()))
    assert f.shape == (2, 42, 42) and (f == 6).all()
    np.testing.assert_array_equal(pp.frames_of(jnp.eye(3), QUICK), np.eye(3, dtype=int))


def test_bonus_reward_and_unseen_frames_get_a_larger_bonus():
    """The Bonus's `reward` as `update` runs it, then the mechanism at the bonus level.
    Equation: on a [T = 2, N = 8] rollout, each frame's PG from the same theta (here
    lax.map over frames of `prediction_gain`, the Bonus lax.maps it in chunks), n of frame k
    (time-major, env-minor) = n_before + k + 1, r = beta (exp(c n^-1/2 PG_+) - 1)^1/2 with
    the traced stats' beta (0.05 here, cfg.beta 0.1), n advanced by 16, the charts' pseudo-
    count and PG the medians over the rollout's frames at those n.
    Behaviour, with the paper's eta = 1e-3, c = 0.1, beta = 0.1 and
    TINY's PixelCNN: the model is trained (100 Adam steps of lr 1e-2 on `loss`, the Bonus's
    density loss that PPO's update minimises) on the frames of 8 DeepSea-8 cells; `reward`
    (n = 1000) on a rollout [seen frames, 8 other cells' frames]: every unseen frame's bonus
    is above every seen frame's and their mean is > 1.5 x the seen mean (measured 3.9e-4 to
    4.6e-4 vs 1.2e-4 to 2.4e-4, means 4.6e-4 vs 1.8e-4, ratio 2.5, at beta = 0.1; half
    those at the test's 0.05). Broken variant, same program: the untrained model gives ratio
    0.99 (both sets novel). 50 Adam steps instead of 100 lose the margin (ratio 1.41).
    Mutations: the sign of the virtual step flipped (ascent on -log rho) makes every PG
    negative, bonus 0 (fails); cfg.beta for stats["beta"] fails the equation; the charts'
    count as a mean, or at n_before, fails."""
    cells = [(r, c) for r in range(8) for c in range(r + 1)]  # DeepSea-8's reachable cells
    idx = np.random.default_rng(0).permutation(len(cells))[:16]
    obs = np.zeros((2, 8, 8, 8), np.float32)  # [seen, unseen] x 8 frames, 1 where the agent is
    for k, i in enumerate(idx):
        obs[k // 8, k % 8][cells[i]] = 1.0
    cfg = dataclasses.replace(TINY, pg_lr=1e-3, pg_scale=0.1, beta=0.1)  # not the quick ones

    def go(obs):
        bonus, opt = pp.make_bonus(cfg), optax.adam(1e-2)
        params0, stats = bonus.init(jax.random.PRNGKey(0), obs[0, :1])
        stats = {**stats, "n": jnp.float32(1000.0), "beta": jnp.float32(0.05)}

        def step(carry, _):
            p, o = carry
            g = jax.grad(lambda p: bonus.loss(p, stats, {"obs": obs[0]})[0])(p)
            u, o = opt.update(g, o, p)
            return (optax.apply_updates(p, u), o), None

        params = jax.lax.scan(step, (params0, opt.init(params0)), None, length=100)[0][0]
        (trained, new), (untrained, _) = [bonus.reward(p, stats, {"obs": obs})
                                          for p in (params, params0)]
        net, frames = pp.make_density(cfg), obs.reshape(16, 8, 8).astype(jnp.int32)
        pg = jax.lax.map(lambda x: pp.prediction_gain(net, params, x, 1e-3)[1], frames)
        n = 1000.0 + jnp.arange(1, 17)
        want = 0.05 * jnp.sqrt(jnp.expm1(0.1 * n ** -0.5 * pg)).reshape(2, 8)
        count = jnp.median(1.0 / jnp.expm1(0.1 * n ** -0.5 * pg))
        return trained, untrained, want, new, count, jnp.median(pg)

    trained, untrained, want, new, count, pg = jax.device_get(compiled(go, jnp.asarray(obs)))
    np.testing.assert_allclose(trained, want, rtol=2e-5)
    assert float(new["n"]) == 1016.0
    np.testing.assert_allclose([new["count"], new["pg"]], [count, pg], rtol=2e-5)

    def separated(r):  # [seen, unseen]: all unseen above all seen, means apart by 1.5 x
        return r[1].min() > r[0].max() and r[1].mean() > 1.5 * r[0].mean()

    assert separated(trained), trained
    assert not separated(untrained), untrained
    assert 0.8 < untrained[1].mean() / untrained[0].mean() < 1.25, untrained


def _argv(run_dir):
    return [*cli_args(TINY, QUICK, "quick"), "--num-seeds", "2", "--no-progress",
            "--fast-compile", "--run-dir", str(run_dir)]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return main_recording_chunks(pp.main, _argv(tmp_path_factory.mktemp("pixelcnn")))


def test_train_is_pure(tiny_run):
    """The CLI run's one compiled chunk, run again on its recorded input states, gives the
    run's final state and metrics bit for bit; the two seeds differ."""
    result, chunks = tiny_run
    assert len(chunks) == 1
    chunk, states = chunks[0]
    state, metrics = jax.device_get(chunk(states))
    for x, y in zip(jax.tree.leaves(result.state), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(x, y)
    for k in ("losses/policy", "losses/density_nll", "charts/pseudo_count"):
        np.testing.assert_array_equal(result.history[k], metrics[k])
    assert not np.array_equal(metrics["losses/density_nll"][0], metrics["losses/density_nll"][1])


def test_cli_run_writes_its_files(tiny_run, capsys):
    """`--help` documents every field; the tiny run wrote its files, its density model
    learned (NLL falls) and fed n = 128 frames; bad values fail before compiling."""
    result, _ = tiny_run
    with pytest.raises(SystemExit):
        pp.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(pp.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out
    assert (result.run_dir / "metrics.jsonl").exists()
    h = result.history
    assert h["charts/distinct_cells"].shape == (2, 2)
    assert (h["losses/density_nll"][:, -1] < h["losses/density_nll"][:, 0]).all()
    np.testing.assert_array_equal(result.state.bonus_stats["n"], [128.0, 128.0])


def test_bad_values_fail_with_named_field(tmp_path):
    for flag, value, field in (
        ("--levels", "1", "levels"),
        ("--pg-lr", "0", "pg.lr"),
        ("--beta", "-1", "beta"),
        ("--dtype", "float16", "dtype"),
        ("--env-id", "CartPole-v1", "env_id"),  # a vector observation, no image
    ):
        with pytest.raises(ValueError, match=field):
            pp.main(["--preset", "quick", flag, value, "--run-dir", str(tmp_path)])


def test_every_config_field_is_read():
    """No flag that lies: each Config field is read by code that runs (AST, not text)."""
    assert unread_fields(pp) == []


def test_paper_preset_traces():
    """jax.eval_shape of init and one update under the `paper` preset: Montezuma's Revenge
    through envpool, 42x42 grey frames (4 stacked), the PixelCNN over the last frame with
    8 levels, 16 feature maps, 2 gated blocks, 64 output maps, with 2 envs instead of 128
    (ALE start-up grows with the number of emulators: 128 take ~40 s on a 2-core CPU)."""
    cfg, state, (after, metrics) = trace_paper(pp, num_envs=2)
    assert state.obs.shape == (2, 4, 42, 42)
    dens = state.params["bonus"]["params"]
    assert dens["embedding"].shape == (42, 42, 4)
    assert dens["MaskedConv_0"]["kernel"].shape == (7, 7, 1, 16)
    assert dens["MaskedConv_1"]["kernel"].shape == (3, 3, 16, 32)
    assert dens["Dense_5"]["kernel"].shape == (16, 64)
    assert dens["Dense_6"]["kernel"].shape == (64, 8)
    assert state.env_state.visited.shape == (256,)  # rooms
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
    assert cfg.beta == 0.1 and cfg.pg_scale == 0.1 and cfg.levels == 8


@pytest.mark.slow
def test_pseudo_count_ranks_true_counts():
    """Online training on a scripted visit sequence: 8 DeepSea-8 cells, cell k seen 2^k times
    (255 frames, shuffled), one Adam step of lr 1e-2 on `density_loss` per frame (the paper's
    online model); then N_hat = (exp(c n^-1/2 PG_+) - 1)^-1 of each cell's frame at n = 255
    with the quick preset's eta = 0.3, c = 8. Spearman(N_hat, true count) > 0.8 for the
    trained model (measured 0.90: N_hat 1.4, 2.3, 2.7, 3.1, 12.7, ... for true counts 1, 2, 4,
    8, 16, ...); broken variant, same program: the untrained model (measured -0.57, < 0.5).
    Mutation: the virtual step's sign flipped (PG <= 0, N_hat = inf for all) fails."""
    cells = [(r, c) for r in range(8) for c in range(r + 1)]
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(cells))[:8]
    frames = np.zeros((8, 8, 8), np.int32)
    for k, i in enumerate(idx):
        frames[k][cells[i]] = 1
    seq = rng.permutation(np.repeat(np.arange(8), 2 ** np.arange(8)))
    net, opt = pp.make_density(TINY), optax.adam(1e-2)

    def go(frames, seq):
        params0 = net.init(jax.random.PRNGKey(0), frames[:1])

        def step(carry, k):
            p, o = carry
            g = jax.grad(lambda p: pp.density_loss(net, p, frames[k][None]))(p)
            u, o = opt.update(g, o, p)
            return (optax.apply_updates(p, u), o), None

        params = jax.lax.scan(step, (params0, opt.init(params0)), seq)[0][0]

        def counts(p):
            pg = jax.lax.map(lambda x: pp.prediction_gain(net, p, x, QUICK.pg_lr)[1], frames)
            return pp.pseudo_count(pg, float(len(seq)), QUICK.pg_scale)

        return counts(params), counts(params0)

    trained, untrained = map(np.asarray, compiled(go, frames, seq))

    def spearman(x):  # average ranks: N_hat = inf everywhere (no gain) gives nan, not 1
        return scipy.stats.spearmanr(x, 2.0 ** np.arange(8)).statistic

    assert spearman(trained) > 0.8, trained
    assert spearman(untrained) < 0.5, untrained
