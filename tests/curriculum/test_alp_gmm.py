"""Tests of curriculum/alp_gmm.py: the toy student (the released ToyEnv, its neighbours'
direction and edges), the ALP from the nearest previous task and its history ring, EM and
AIC against scikit-learn (reference values hard-coded), the sampling proportions by mean
ALP and the Gaussian draws (covariance, clipping), the teacher owning every auto-reset's
task, the behaviour of ALP-GMM against uniform sampling and the broken lowest-ALP teacher in
one compiled run of the CLI, purity, CLI and the paper preset."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common.envs import VecEnv
from curriculum import alp_gmm
from tests.common.cli import cli_args
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# One tiny configuration shared by the module: the paper's 10 x 10 toy space with a student
# 5x faster (max competence 20) and 4000 episodes, GMM refits every 100 episodes.
TINY = alp_gmm.Config(max_competence=20, fit_rate=100, em_iters=20, kmeans_iters=5,
                      max_gaussians=6, total_episodes=4000, history_size=4000)
ALP_GMM, RANDOM, ANTI = (alp_gmm.TEACHERS.index(t) for t in alp_gmm.TEACHERS)
# The functions `update` calls, jitted once (configs are static: frozen dataclasses).
student_episode = jax.jit(alp_gmm.student_episode, static_argnums=2)
absolute_lp = jax.jit(alp_gmm.absolute_lp, static_argnums=3)
fit_gmm = jax.jit(alp_gmm.fit_gmm, static_argnums=2)


def _play(competence, cell, times=1):
    p = (jnp.asarray(cell) + 0.5) / TINY.num_cells
    for _ in range(times):
        competence, r = student_episode(competence, p, TINY)
    return competence, float(r)


def test_toy_student_is_the_released_toy_env():
    """ToyEnv.episode by hand (max 20: unlock at c >= 15, mastered at c > 15): the origin
    cell always learns; (1, 1) is locked until a previous neighbour ((0, 0), (1, 0) or
    (0, 1), diagonal included) reaches 15; (2, 2) stays locked; competence caps at 20;
    reward = c / 20; p = 1.0 falls in the last cell."""
    c = jnp.zeros(100, jnp.int32)
    c, r = _play(c, (1, 1), 3)
    assert r == 0.0 and int(c.sum()) == 0  # locked
    c, r = _play(c, (0, 0), 14)
    assert r == pytest.approx(14 / 20)
    c, r = _play(c, (1, 1))
    assert r == 0.0  # 14 < 15: still locked
    c, r = _play(c, (0, 0))
    c, r = _play(c, (1, 1), 2)  # the diagonal neighbour (0, 0) has 15: unlocked
    assert r == pytest.approx(2 / 20)
    c, r = _play(c, (2, 2), 2)
    assert r == 0.0  # its previous neighbours (1..2, 1..2) have < 15
    c, r = _play(c, (0, 0), 30)
    assert r == 1.0 and int(c[0]) == 20  # capped
    grid = np.asarray(c).reshape(10, 10)
    assert grid[0, 0] == 20 and grid[1, 1] == 2 and grid[2, 2] == 0
    # mastered: c > 3/4 of the max (strict), as a percentage of the 100 cells
    assert float(alp_gmm.mastered_pct(c, TINY)) == 1.0
    assert float(alp_gmm.mastered_pct(c.at[5].set(15), TINY)) == 1.0
    assert float(alp_gmm.mastered_pct(c.at[5].set(16), TINY)) == 2.0
    np.testing.assert_array_equal(alp_gmm.task_cell(jnp.array([1.0, 0.0, 0.0999, 0.1]), 10),
                                  [9, 0, 0, 1])


def _cells(*cells, level=20):
    """A competence table [100] with `cells` (i, j) at `level`, the rest 0."""
    flat = [i * 10 + j for i, j in cells]
    return jnp.zeros(100, jnp.int32).at[jnp.array(flat)].set(level)


def test_only_previous_neighbours_unlock_a_cell():
    """Direction and edges of ToyEnv's neighbours: (1, 1) with its next cells (2, 1), (1, 2),
    (2, 2) mastered and its previous ones (0, 0), (1, 0), (0, 1) at 0 stays locked; the edge
    cell (0, 3) has one previous neighbour, (0, 2) (index -1 clips to the cell itself, which
    never counts): with (0, 2) at 14 it stays locked even though (1, 2), (1, 3), (0, 4) and the
    wrapped-around (9, 2), (9, 3) are at 20, and (0, 2) at 15 unlocks it. Mutations tried,
    each fails here: neighbours cell + offsets (the next ones); indices wrapped (% n) instead
    of clipped."""
    _, r = _play(_cells((2, 1), (1, 2), (2, 2)), (1, 1))
    assert r == 0.0
    others = ((1, 2), (1, 3), (0, 4), (9, 2), (9, 3))
    _, r = _play(_cells(*others).at[2].set(14), (0, 3))
    assert r == 0.0
    _, r = _play(_cells(*others).at[2].set(15), (0, 3))
    assert r == pytest.approx(1 / 20)


def test_alp_is_the_reward_change_from_the_nearest_previous_task():
    """Eq. 1-2 through the function `update` calls. History (0.1, 0.1) r 0.2, (0.5, 0.5)
    r 0.7, (0.9, 0.2) r 0.4 and three more far away; new task (0.45, 0.6) with r 0.1: its
    nearest is (0.5, 0.5), ALP = |0.1 - 0.7| = 0.6 (the farther (0.1, 0.1) would give 0.1).
    The nearest may sit in either piece of the history (the ring or this update's
    episodes); invalid slots never count; with <= 5 pairs stored the ALP is 0."""
    tasks = jnp.array([[0.1, 0.1], [0.5, 0.5], [0.9, 0.2], [3, 3], [4, 4], [5, 5], [0.45, 0.6]])
    rewards = jnp.array([0.2, 0.7, 0.4, 0.0, 0.0, 0.0, 0.9])
    valid = jnp.arange(7) < 6  # the last slot (the task itself) not written yet
    p, r = jnp.array([0.45, 0.6]), jnp.asarray(0.1)
    assert float(absolute_lp(p, r, ((tasks, rewards, valid),), 5)) == pytest.approx(0.6)
    assert float(absolute_lp(p, r, ((tasks, rewards, valid),), 6)) == 0.0  # 6 <= 6 stored
    # split: ring holds the far ones, the update's piece holds the nearest
    ring = (tasks[3:], rewards[3:], jnp.array([True, True, True, False]))
    new = (tasks[:3], rewards[:3], jnp.array([True, True, True]))
    assert float(absolute_lp(p, r, (ring, new), 5)) == pytest.approx(0.6)
    assert float(absolute_lp(p, r, (new, ring), 5)) == pytest.approx(0.6)
    # a closer but invalid slot is ignored; the valid nearest is (0.5, 0.5)
    stale = (tasks[6:], jnp.array([0.0]), jnp.array([False]))
    assert float(absolute_lp(p, r, (ring, new, stale), 5)) == pytest.approx(0.6)


def test_history_ring_wraps_to_the_newest_blocks():
    """The k-NN ring as `update` runs it (ring_push after each update, ring_history before
    the next), history_size = 2 fit_rate over 3 updates: block 1 holds the new task's exact
    twin (reward 0.9), block 2 a task 0.05 away (0.5), block 3 one 0.01 away (0.2). Before the
    wrap ALP(p, r = 0) = 0.9 from block 1 and only written slots count; after it block 3 sits
    in slot 0 (over block 1), block 2 stays, every slot is valid and ALP = 0.2 from the newer
    block. Mutations tried, each fails here: the write slot count (no % H: clamped over block
    2); valid = slot < count % H."""
    cfg = dataclasses.replace(TINY, fit_rate=3, history_size=6)
    push = jax.jit(alp_gmm.ring_push, static_argnums=4)
    ring = jax.jit(alp_gmm.ring_history, static_argnums=1)
    ts = alp_gmm.init(jax.random.PRNGKey(0), cfg).teacher_state
    q, far = jnp.array([0.5, 0.5]), jnp.array([[0.0, 1.0], [1.0, 0.0]])
    blocks = [(jnp.concatenate([q[None] + dq, far]), jnp.array([rq, 0.0, 0.0]))
              for dq, rq in ((0.0, 0.9), (0.05, 0.5), (0.01, 0.2))]
    lp = []
    for tasks, rewards in blocks:
        ts = push(ts, tasks, rewards, jnp.zeros(3), cfg)
        lp.append(float(absolute_lp(q, jnp.asarray(0.0), (ring(ts, cfg),), 0)))
        if len(lp) == 1:
            np.testing.assert_array_equal(ring(ts, cfg)[2], [True] * 3 + [False] * 3)
    np.testing.assert_allclose(lp, [0.9, 0.9, 0.2], rtol=1e-6)
    assert int(ts.count) == 9 and bool(ring(ts, cfg)[2].all())
    np.testing.assert_array_equal(ts.tasks, jnp.concatenate([blocks[2][0], blocks[1][0]]))
    np.testing.assert_array_equal(ts.rewards, jnp.concatenate([blocks[2][1], blocks[1][1]]))


def _two_clusters(n=250, seed=0):
    """250 points [p, ALP] from two Gaussians; the first cluster's ALP is constant 0 (a
    locked or mastered region), so its fitted ALP variance is reg_covar alone."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 3))
    a = [0.2, 0.3, 0.0] + z[:n // 2] @ np.linalg.cholesky(
        [[0.004, 0.002, 0], [0.002, 0.003, 0], [0, 0, 1]]).T * [1, 1, 0]  # ALP constant 0
    b = [0.7, 0.6, 0.3] + z[n // 2:] @ np.linalg.cholesky(
        [[0.002, -0.001, 0], [-0.001, 0.005, 0.0005], [0, 0.0005, 0.001]]).T
    return np.concatenate([a, b]).astype(np.float32)


# scikit-learn 1.9.1's GaussianMixture(k, covariance_type="full", reg_covar=1e-6,
# random_state=0).fit(x.astype(np.float64)) on x = _two_clusters(), components sorted by
# their first mean coordinate; computed once (script in the test's docstring), so that the
# default tier does not import scikit-learn (~10 s).
SK_WEIGHTS = [0.5, 0.5]
SK_MEANS = [[0.19595729, 0.29728847, 0.0], [0.69384540, 0.60971858, 0.29903725]]
SK_COVS = [[[0.0050641341, 0.0025631472, 0.0], [0.0025631472, 0.0031901070, 0.0],
            [0.0, 0.0, 1e-06]],
           [[0.0015641040, -0.00062844633, -9.5404521e-05],
            [-0.00062844633, 0.0048551130, 0.00054212738],
            [-9.5404521e-05, 0.00054212738, 0.0010565570]]]
SK_AICS = [-3127.9305, -3112.0137, -3099.0072, -3091.6308, -3099.1752]  # k = 2..6
SK_N_PARAMS_2 = 19  # GaussianMixture(2)._n_parameters() for D = 3: 12 + 6 + 1


def test_em_and_aic_match_scikit_learn_on_two_clusters():
    """EM with full covariances (Eq. 3's fit) on 250 points [p, ALP] from two Gaussians,
    k = 2 in k_max = 6 slots: the weights, means and covariances of scikit-learn's
    GaussianMixture (float64, reg_covar 1e-6) to float32 precision; the cluster of constant
    ALP keeps exactly reg_covar as its ALP variance; the AIC -2 N mean log-lik + 2 n_params is
    scikit-learn's aic(X), n_params its _n_parameters(); and fit_gmm picks k = 2 among 2..6,
    as scikit-learn's AIC over the same ks does (the fit `update` calls: EM vmapped over k).
    Reference values (SK_*) from, with _two_clusters as here:

        from sklearn.mixture import GaussianMixture
        x = _two_clusters()
        sk = [GaussianMixture(k, covariance_type="full", reg_covar=1e-6, random_state=0)
              .fit(x.astype(np.float64)) for k in range(2, 7)]
        o = np.argsort(sk[0].means_[:, 0])
        print(sk[0].weights_[o], sk[0].means_[o], sk[0].covariances_[o],
              [g.aic(x.astype(np.float64)) for g in sk], sk[0]._n_parameters())

    Mutation tried: reg_covar left out of m_step (the ALP variance 0, the fit NaN): fails."""
    x = _two_clusters()
    w, mu, cov, k, aics = fit_gmm(jax.random.PRNGKey(0), jnp.asarray(x), TINY)
    assert int(k) == 2 == 2 + int(np.argmin(SK_AICS)), aics
    order = np.argsort(np.asarray(mu)[:2, 0])
    assert np.asarray(w)[2:].max() < 1e-5  # inactive slots hold no mass
    w, mu, cov = (np.asarray(a)[:2][order] for a in (w, mu, cov))
    np.testing.assert_allclose(w, SK_WEIGHTS, atol=1e-4)
    np.testing.assert_allclose(mu, SK_MEANS, atol=1e-4)
    np.testing.assert_allclose(cov, SK_COVS, atol=1e-7)
    assert cov[0, 2, 2] == pytest.approx(TINY.reg_covar, rel=0.05)  # constant ALP: reg_covar
    np.testing.assert_allclose(float(aics[0]), SK_AICS[0], rtol=1e-4)
    assert alp_gmm.gmm_n_params(2, 3) == SK_N_PARAMS_2


def _teacher(alps, teacher=ALP_GMM, count=TINY.fit_rate, k=3):
    """A fitted teacher with Gaussians at (0.2, 0.2), (0.8, 0.8), (0.2, 0.8) of tiny
    covariance and mean ALP `alps`, plus an inactive slot 3 of huge ALP at (0.8, 0.2)."""
    means = jnp.zeros((6, 3)).at[:4, :2].set(jnp.array([[.2, .2], [.8, .8], [.2, .8], [.8, .2]]))
    means = means.at[:4, 2].set(jnp.asarray(alps + [9.0]))
    ts = alp_gmm.init(jax.random.PRNGKey(0), TINY).teacher_state
    return ts.replace(means=means, covs=jnp.tile(1e-6 * jnp.eye(3), (6, 1, 1)),
                      k=jnp.asarray(k), count=jnp.asarray(count), teacher=jnp.asarray(teacher))


def _shares(p):
    """Fractions of tasks p [N, 2] within 0.05 of each of the four centres; the rest."""
    centres = np.array([[.2, .2], [.8, .8], [.2, .8], [.8, .2]])
    near = np.linalg.norm(np.asarray(p)[:, None] - centres, axis=-1) < 0.05  # [N, 4]
    return np.append(near.mean(0), 1 - near.any(1).mean())


@functools.partial(jax.jit, static_argnums=(1, 2))
def _auto_reset_tasks(ts, num_envs, steps):
    """Tasks of `steps` rounds of auto-resets of a VecEnv whose sampler is the teacher's."""
    env = VecEnv(alp_gmm.ToyTaskEnv(2), num_envs,
                 functools.partial(alp_gmm.sample_task, ts=ts, cfg=TINY))
    _, vs = env.reset(jax.random.PRNGKey(1))

    def step(vs, k):
        _, vs, _, done, _ = env.step(vs, jnp.zeros(num_envs, jnp.int32), k)
        return vs, (vs.params, done)

    _, (params, done) = jax.lax.scan(step, vs, jax.random.split(jax.random.PRNGKey(2), steps))
    return params.reshape(-1, 2), done.all()


def test_sampling_proportions_and_the_teacher_owns_every_auto_reset():
    """Eq. 4 and the 20% random share, measured on the tasks that VecEnv's auto-resets draw
    (every one-step episode ends and restarts with a task from the teacher's sampler, never
    the env's default p = 0): mean ALPs [0.1, 0.3, 0] -> shares 0.8 [1/4, 3/4, 0] near the
    Gaussians (0.2, 0.6, 0), the inactive slot of ALP 9 never (only the uniform 20% lands
    there: 0.2 * pi 0.05^2 = 0.0016), the rest 0.2 spread uniformly. The broken teacher puts
    0.8 on the ALP-0 Gaussian; all-zero ALPs: uniform over the k active ones; the random
    teacher and the bootstrap (count < fit_rate): uniform. 8 envs x 500 resets each."""
    def shares(*args, **kw):
        p, done = _auto_reset_tasks(_teacher(*args, **kw), 8, 500)
        assert bool(done) and not bool((p == 0).all(-1).any())
        assert float(p.min()) >= 0 and float(p.max()) <= 1
        return _shares(p)

    area = np.pi * 0.05**2  # of a disc of radius 0.05 around each centre
    np.testing.assert_allclose(shares([0.1, 0.3, 0.0]), [0.2, 0.6, 0, 0, 0.2], atol=0.025)
    np.testing.assert_allclose(shares([0.1, 0.3, 0.0], ANTI), [0, 0, 0.8, 0, 0.2], atol=0.025)
    np.testing.assert_allclose(shares([0.0, 0.0, 0.0]), [0.8 / 3] * 3 + [0, 0.2], atol=0.025)
    for kw in (dict(teacher=RANDOM), dict(count=TINY.fit_rate - 1)):
        np.testing.assert_allclose(shares([0.1, 0.3, 0.0], **kw), [area] * 4 + [1 - 4 * area],
                                   atol=0.01)


@functools.partial(jax.jit, static_argnums=1)
def _gmm_draws(ts, n):
    """n tasks from sample_task with random_task_ratio 0: every one drawn from the GMM (a
    loop, not a vmap: it compiles in half the time)."""
    cfg = dataclasses.replace(TINY, random_task_ratio=0.0)
    keys = jax.random.split(jax.random.PRNGKey(3), n)
    return jax.lax.map(lambda k: alp_gmm.sample_task(k, ts, cfg), keys)


def test_gmm_draws_have_the_gaussians_covariance_and_are_clipped():
    """Eq. 4's N(mu_j, Sigma_j) with the ALP coordinate dropped, then clipped to [0, 1]^d, on
    20000 draws of a one-Gaussian teacher. Correlated: mean (0.5, 0.5), sd 0.1 and 0.05,
    correlation 0.5 (the ALP coordinate correlated 0.5 with the first): the empirical mean
    within 0.003 and covariance within 5%. Clipped: centred at (0, 0.5), sd 0.05: about half
    the first coordinates are exactly 0, none below, the second keeps its mean and variance.
    Mutations tried, each fails here: z = mu (no noise); Sigma @ normal instead of
    chol(Sigma) @ normal; the diagonal of chol only; no clip."""
    cov = jnp.array([[0.01, 0.0025, 0.0005], [0.0025, 0.0025, 0.0], [0.0005, 0.0, 1e-4]])
    ts = _teacher([0.1, 0.1, 0.1], k=1)
    ts = ts.replace(means=ts.means.at[0].set(jnp.array([0.5, 0.5, 0.2])),
                    covs=ts.covs.at[0].set(cov))
    p = np.asarray(_gmm_draws(ts, 20_000), np.float64)
    np.testing.assert_allclose(p.mean(0), [0.5, 0.5], atol=0.003)
    np.testing.assert_allclose(np.cov(p.T), cov[:2, :2], rtol=0.05)
    ts = ts.replace(means=ts.means.at[0].set(jnp.array([0.0, 0.5, 0.2])),
                    covs=ts.covs.at[0].set(jnp.diag(jnp.array([0.0025, 0.0025, 1e-4]))))
    p = np.asarray(_gmm_draws(ts, 20_000), np.float64)
    assert p.min() == 0.0 and p.max() <= 1.0
    assert (p[:, 0] == 0).mean() == pytest.approx(0.5, abs=0.02)
    assert p[:, 1].mean() == pytest.approx(0.5, abs=0.003)
    assert p[:, 1].var() == pytest.approx(0.0025, rel=0.05)


def test_bad_values_fail_with_named_field(tmp_path):
    bad = [(["--teacher", "oracle"], "teacher='oracle' must be one of"),
           (["--total-episodes", "1000", "--fit-rate", "300"], "not a multiple of fit_rate"),
           (["--fit-rate", "0"], "fit_rate=0 must be >= 1"),
           (["--max-gaussians", "1"], r"min_gaussians=2 must be in \[1, max_gaussians=1\]"),
           (["--random-task-ratio", "1.5"], r"--random-task-ratio must be in \[0, 1\]"),
           (["--reg-covar", "0"], "reg_covar=0.0 must be > 0"),
           (["--em-iters", "0"], "em_iters=0 must be >= 1"),
           (["--history-size", "1010"], "history_size=1010 is not a multiple"),
           (["--num-cells", "1001"], "must be <= 1e6")]
    for args, msg in bad:
        with pytest.raises(ValueError, match=msg):
            alp_gmm.main(args + ["--run-dir", str(tmp_path / "x")])


# --- one compiled run of the CLI: ALP-GMM, uniform and the broken teacher side by side

SEEDS = 2
CHUNK = 10  # updates per compiled chunk: the purity rerun runs one chunk of the same program
ARGS = cli_args(TINY, alp_gmm.Config()) + ["--num-seeds", str(3 * SEEDS), "--log-every",
                                           str(CHUNK), "--no-progress"]


def _run(run_dir, extra=()):
    """ARGS through `alp_gmm.main`, 3 x SEEDS seeds in ONE compiled program: seeds 0.. run
    ALP-GMM, SEEDS.. uniform sampling, 2 SEEDS.. the broken teacher, each group on the same
    keys (the teacher id is traced in the state)."""
    keys = jax.random.split(jax.random.PRNGKey(0), 3 * SEEDS)  # the runner's seed keys
    real = alp_gmm.init

    def init(key, cfg):
        i = jnp.argmax(jnp.all(key == keys, -1))
        state = real(keys[i % SEEDS], cfg)
        return state.replace(teacher_state=state.teacher_state.replace(
            teacher=jnp.array([ALP_GMM, RANDOM, ANTI])[i // SEEDS]))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(alp_gmm, "init", init)
        return alp_gmm.main(list(ARGS) + list(extra) + ["--run-dir", str(run_dir)])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("alp_gmm"))


def test_alp_gmm_masters_more_cells_than_uniform_and_the_broken_teacher(quick_run):
    """Behaviour ([1] Fig. 2) in seconds: 10 x 10 toy cells, competence max 20, 4000
    episodes, 2 seeds per teacher in one compiled run of the CLI. % mastered cells at the
    end, measured on CPU (jax 0.10.2): ALP-GMM 33 27, uniform 5 5, anti (broken) 0 1. The
    broken teacher fails the first two asserts, uniform the first. Mutations tried, each
    fails here: Eq. 4 reversed for ALP-GMM too (it is then the broken teacher); ALP = the
    reward itself (it chases mastered cells: ALP-GMM 17 4); `update` playing a uniform task
    instead of the one the teacher's auto-reset drew (every teacher 3 6)."""
    m = quick_run.final["mastered_pct"]
    alp, uni, bad = m[:SEEDS], m[SEEDS:2 * SEEDS], m[2 * SEEDS:]
    print("alp_gmm", alp, "uniform", uni, "anti", bad)
    assert alp.min() >= 3 * max(uni.max(), 3), (alp, uni)
    assert uni.mean() >= bad.mean() and alp.min() > bad.max() + 10, (alp, uni, bad)
    # the fitted GMM sees progress only near the frontier: its best Gaussian's mean ALP is high
    h = quick_run.history
    assert h["charts/gmm_max_alp"][:SEEDS, -10:].mean() > 0.3, h["charts/gmm_max_alp"]
    # update plays the teacher's tasks: the mean ALP of the episodes ALP-GMM chose over the
    # last 10 fits is far above that of uniform tasks (measured 0.29 0.26 vs 0.05 0.04;
    # the broken teacher 0.002 0.006)
    alp_played = h["charts/alp"][:, -10:].mean(1)
    print("mean ALP of the played tasks", alp_played)
    assert alp_played[:SEEDS].min() > 2 * alp_played[SEEDS:2 * SEEDS].max(), alp_played


def test_train_is_pure_and_cli_writes_its_files(quick_run, tmp_path, capsys):
    """The same keys give bit-identical results a second time; seeds differ; the run wrote
    its files; `--help` documents every field."""
    with pytest.raises(SystemExit):
        alp_gmm.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(alp_gmm.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out
    assert (quick_run.run_dir / "metrics.jsonl").exists()
    h = quick_run.history
    assert h["charts/reward"].shape == (3 * SEEDS, TINY.num_updates)
    assert not np.array_equal(h["charts/reward"][0], h["charts/reward"][1])
    np.testing.assert_array_equal(quick_run.state.teacher_state.count,
                                  [TINY.total_episodes] * 3 * SEEDS)
    assert set(quick_run.final) == {"mastered_pct", "competence"}
    np.testing.assert_allclose(quick_run.final["mastered_pct"], h["charts/mastered_pct"][:, -1])
    again = _run(tmp_path, ["--num-updates", str(CHUNK)])
    for k in ("charts/reward", "charts/alp", "losses/gmm_aic"):
        np.testing.assert_array_equal(h[k][:, :CHUNK], again.history[k])


def test_every_config_field_is_read():
    """No flag that lies: each Config field is read by code that runs (AST, not text)."""
    assert unread_fields(alp_gmm) == []


def test_paper_preset_traces():
    """jax.eval_shape of init and one update under the `paper` preset ([1]'s toy: 10 x 10
    cells, 20000 episodes, k in 2..10, fit every 250): nothing runs."""
    cfg, state, (after, metrics) = trace_paper(alp_gmm)
    assert state.competence.shape == (100,) and state.teacher_state.tasks.shape == (20000, 2)
    assert state.teacher_state.covs.shape == (10, 3, 3) and state.aics.shape == (9,)
    assert cfg.num_updates == 80 and cfg.teacher == "alp_gmm"
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
