"""ALP-GMM: a Gaussian-mixture teacher of absolute learning progress over a continuous task space.

[1] R. Portelas, C. Colas, K. Hofmann, P.-Y. Oudeyer. "Teacher algorithms for curriculum
    learning of Deep RL in continuously parameterized environments." CoRL 2019,
    arXiv:1910.07224. Released code: github.com/flowersteam/teachDeepRL (commit 3aaaccc),
    `teachDRL/teachers/algos/alp_gmm.py` (the teacher) and `teachDRL/toy_env/toy_env.py`
    (the toy task space of [1]'s Fig. 2; section and figure numbers from memory).
Equation tags (Eq. 1-4) are this file's numbering of [1]'s ALP-GMM algorithm box.

A teacher samples the task parameters p in [0, 1]^d of every episode. After the episode
it observes the student's episodic reward r on p and scores the task by its absolute
learning progress against the nearest task of the history ([1] Sec. 4, the post's Fig. 4):

    p_old = argmin_{p' in history} ||p - p'||_2              (k-NN, k = 1)       (Eq. 1)
    ALP_p = |r - r_old|       (0 until more than 5 (p, r) pairs are stored)       (Eq. 2)

Every `fit_rate` episodes a Gaussian mixture is fitted by EM (full covariances) on the last
`fit_rate` points [p, ALP_p] of R^{d+1}, for every k in min..max_gaussians, and the k of the
lowest Akaike information criterion is kept:

    AIC(k) = -2 sum_i log sum_j w_j N([p_i, ALP_i]; mu_j, Sigma_j) + 2 n_params(k),
    n_params(k) = k D (D + 1) / 2 + k D + k - 1,  D = d + 1                      (Eq. 3)

Sampling a task: with probability `random_task_ratio` (and for the first `fit_rate`
bootstrap episodes) p ~ U[0, 1]^d; otherwise Gaussian j is picked with probability
proportional to its mean ALP (the last coordinate of mu_j; uniform over the k if all are 0),
p is drawn from N(mu_j, Sigma_j) with the ALP coordinate dropped, and clipped to [0, 1]^d:

    P(j) = mu_j[ALP] / sum_l mu_l[ALP]                                           (Eq. 4)

The student is [1]'s toy one (the released `ToyEnv`): [0, 1]^d cut into num_cells^d cells,
each with a competence c in 0..100. Playing a task of a cell raises its competence by 1 only
if the cell is the origin cell or one of its "previous" neighbours (index minus 0 or 1 per
dimension, diagonals included) is unlocked (c >= 75); the reward is c / 100. A cell with
c > 75 counts as mastered. So at any time most of the space is unlearnable (locked), a
growing part is mastered (reward 1, no progress), and only the frontier shows learning
progress: a teacher must find and follow it. The score is the % of mastered cells.

The teacher owns each episode's task through common.envs: every episode is one step of a
`VecEnv` whose auto-reset draws the next task from the teacher's sampler (`ToyTaskEnv`).

Teachers in one compiled program (the id travels traced in the state): `alp_gmm` ([1]);
`random` (uniform task sampling, [1]'s Random baseline); `anti` (broken: the same GMM, but it
samples the Gaussian of LOWEST mean ALP, with the same 20% random tasks: it drills mastered
or locked regions).

Reproduce ([1]'s toy experiment, `paper` = the defaults; CPU, ~35 s for 3 seeds; the plot
curriculum/alp_gmm.png reruns one seed of each teacher, ~2 min):
    python curriculum/alp_gmm.py --preset paper --num-seeds 3
    python curriculum/alp_gmm.py --preset paper --num-seeds 3 --teacher random
    python curriculum/alp_gmm.py --preset paper --num-seeds 3 --teacher anti    # broken
    python curriculum/alp_gmm.py --preset paper --plot curriculum/alp_gmm.png
    python curriculum/alp_gmm.py --preset quick --num-seeds 3    # 4000 episodes, ~10 s

Measured (2-core CPU shared with other jobs, jax 0.10.2; 3 seeds a teacher, one CLI run
each): % mastered cells at the end
    paper (20000 episodes)  ALP-GMM 38, 41, 35   Random 4, 4, 4   anti (broken) 1, 1, 1
                            (compile 7 s + 23 s for the 3 seeds of a teacher)
    quick (4000 episodes)   ALP-GMM 34, 24, 32   Random 5, 5, 4   anti (broken) 0, 0, 0

[1]'s Fig. 2 shows ALP-GMM mastering the 2-D toy space far faster than Random over 20k
episodes ([M]: from memory, as is "on par with or ahead of RIAC and Covar-GMM"); its exact
curve values could not be read here (no copy of the PDF), so no paper number is quoted. A
numpy + scikit-learn re-implementation of the released teacher run while cataloguing this
package measured, after 20k episodes, % mastered cells Random 4.0 (3 seeds), ALP-GMM 35-37,
anti-ALP 0-1: this JAX port agrees.

Defaults are the released code's (alp_gmm.py `ALPGMM.__init__` and scikit-learn's
GaussianMixture): potential_ks 2..10, fit_rate 250 (= the bootstrap nb_random and the GMM's
data window), random_task_ratio 0.2, AIC, ALP from the single nearest previous task over the
whole history (alp_max_size None), ALP 0 until len(history) > 5, full covariances,
reg_covar 1e-6, EM max_iter 100, k-means initialisation; toy env: nb_cubes 10, nb_dims 2,
max_per_cube 100, 20000 episodes (toy_env.py __main__).

Differences from the paper / released code:
- EM runs a fixed `em_iters` iterations (scikit-learn stops at tol 1e-3 before its 100) and
  is initialised by `kmeans_iters` Lloyd steps seeded by k random data points (scikit-learn
  seeds KMeans by k-means++ and runs it to convergence, n_init 1); a Lloyd cluster left
  empty keeps its centre (scikit-learn moves it to a far point); one EM start per k
  (nb_em_init 1). Each fit draws a fresh key, where the released GMMs reuse random_state =
  the seed at every refit (the same k-means draws for the same data).
- If every k's fit is non-finite (AIC inf), the teacher keeps its previous GMM (scikit-learn
  raises on an ill-defined covariance); losses/gmm_aic is then inf.
- The random teacher still fits the GMM every fit_rate episodes (one compiled program for
  all teachers, the id traced) and never samples from it; the released Random teacher fits
  nothing.
- The k-NN history is a ring of `history_size` (default = the paper run's 20000 episodes,
  i.e. exact); the released code keeps every episode. Brute-force nearest neighbour (exact),
  where the released code uses a buffered kd-tree (also exact); ties take the first stored.
  Within an update the new episodes sit in a per-update buffer searched beside the ring (an
  unbatched write position under the seed vmap) and join the ring at the update's end.
- Float32 throughout (scikit-learn fits in float64); the student is the paper's toy student
  (a competence table), not a deep RL agent, and its BipedalWalker stump tracks (Box2D, not
  JAX) are not implemented: the `paper` preset is [1]'s toy experiment at its size (10 x 10
  cells, 20000 episodes); `quick` is the same space with a 5x faster student (competence
  max 20), 4000 episodes and a GMM fit every 100.
- No `dtype` option: there is no network; the EM's matrices are (k_max, 3, 3).
"""

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from common import run
from common.envs import Env, VecEnv

TEACHERS = ("alp_gmm", "random", "anti")
"""[1]'s ALP-GMM, uniform sampling (the Random baseline), and the broken lowest-ALP teacher."""

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """ALP-GMM on [1]'s toy task space; defaults are the released code's."""

    teacher: str = "alp_gmm"
    """alp_gmm ([1]) | random (uniform tasks, baseline) | anti (broken: samples the Gaussian
    of lowest mean ALP)"""
    fit_rate: int = 250
    """episodes between two GMM fits; also the bootstrap of random tasks and the number of
    most recent (task, ALP) points each fit uses"""
    min_gaussians: int = 2
    """smallest number of Gaussians k tried at each fit"""
    max_gaussians: int = 10
    """largest number of Gaussians k tried at each fit (k is chosen by AIC, Eq. 3)"""
    random_task_ratio: float = 0.2
    """probability of a uniformly random task instead of one drawn from the GMM"""
    em_iters: int = 100
    """EM iterations per fit (scikit-learn's max_iter)"""
    kmeans_iters: int = 20
    """Lloyd iterations of the k-means initialisation of EM"""
    reg_covar: float = 1e-6
    """added to the covariances' diagonals (scikit-learn's reg_covar)"""
    alp_min_history: int = 5
    """ALP is 0 until more than this many (task, reward) pairs are stored (Eq. 2)"""
    history_size: int = 20_000
    """(task, reward) pairs kept for the nearest-neighbour ALP (>= total_episodes: all); a
    multiple of fit_rate"""
    num_cells: int = 10
    """toy space: cells per dimension (nb_cubes)"""
    task_dim: int = 2
    """toy space: dimensions d of the task parameters p in [0, 1]^d (nb_dims)"""
    max_competence: int = 100
    """toy student: competence of a cell after that many learning episodes (max_per_cube);
    a cell unlocks its neighbours at 3/4 of it and is mastered above 3/4"""
    total_episodes: int = 20_000
    """episodes (tasks) in the run; a multiple of fit_rate"""

    @property
    def num_updates(self) -> int:
        return self.total_episodes // self.fit_rate

    @property
    def steps_per_update(self) -> int:
        return self.fit_rate

    @property
    def num_tasks(self) -> int:
        return self.num_cells ** self.task_dim

    def validate(self):
        if self.teacher not in TEACHERS:
            raise ValueError(f"teacher={self.teacher!r} must be one of {TEACHERS}")
        for name in ("fit_rate", "history_size", "total_episodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not 1 <= self.min_gaussians <= self.max_gaussians:
            raise ValueError(f"min_gaussians={self.min_gaussians} must be in [1, max_gaussians="
                             f"{self.max_gaussians}]")
        if self.max_gaussians > self.fit_rate:
            raise ValueError(f"max_gaussians={self.max_gaussians} must be <= fit_rate="
                             f"{self.fit_rate} (one data point per Gaussian at least)")
        if self.total_episodes % self.fit_rate:
            raise ValueError(f"total_episodes={self.total_episodes} is not a multiple of "
                             f"fit_rate={self.fit_rate}")
        for name in ("em_iters", "kmeans_iters", "num_cells", "task_dim", "max_competence"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.history_size % self.fit_rate:
            raise ValueError(f"history_size={self.history_size} is not a multiple of "
                             f"fit_rate={self.fit_rate}")
        if self.alp_min_history < 0:
            raise ValueError(f"alp_min_history={self.alp_min_history} must be >= 0")
        if not self.reg_covar > 0:
            raise ValueError(f"reg_covar={self.reg_covar} must be > 0")
        if self.num_tasks > 10**6:
            raise ValueError(f"num_cells={self.num_cells} ** task_dim={self.task_dim} = "
                             f"{self.num_tasks} cells must be <= 1e6")


PRESETS = {
    "quick": dict(max_competence=20, fit_rate=100, total_episodes=4000, history_size=4000),
    "paper": dict(),
}

# --- ENV: the toy task space; the task of every episode comes from the teacher ---


class ToyTaskEnv(Env):
    """One-step episodes whose params ARE the task p [d]: reset returns p as the observation,
    step ends the episode. Its use is the auto-reset of `VecEnv`, which draws each episode's
    p from the teacher's sampler; the student's score on p is computed by `student_episode`
    (the toy student is a competence table shared across episodes, not per-episode state)."""

    def __init__(self, task_dim: int):
        self.task_dim = task_dim
        self.num_actions = 1
        self.observation_shape = (task_dim,)

    def default_params(self):
        return jnp.zeros(self.task_dim)

    def reset(self, key, params):
        return params, params

    def step(self, key, state, action, params):
        return state, state, jnp.zeros(()), jnp.ones((), bool), jnp.zeros((), bool)


def task_cell(p, num_cells):
    """The cell index per dimension of p [..., d] (the released binned_statistic_dd bins:
    [i/n, (i+1)/n), the last one closed)."""
    return jnp.clip(jnp.floor(p * num_cells).astype(jnp.int32), 0, num_cells - 1)


def student_episode(competence, p, cfg: Config):
    """The released ToyEnv.episode: competence [n^d] int; returns (competence, reward)."""
    n, d, cmax = cfg.num_cells, cfg.task_dim, cfg.max_competence
    cell = task_cell(p, n)  # [d]
    flat = jnp.ravel_multi_index(tuple(cell), (n,) * d, mode="clip")
    offsets = np.array(np.meshgrid(*[[0, 1]] * d)).reshape(d, -1).T[1:]  # [2^d - 1, d]
    prev = jnp.maximum(cell - offsets, 0)  # "previous" neighbours, clipped at 0
    is_self = (prev == cell).all(-1)
    prev_c = competence[jnp.ravel_multi_index(tuple(prev.T), (n,) * d, mode="clip")]
    unlocked = (~is_self & (4 * prev_c >= 3 * cmax)).any()
    learn = (cell == 0).all() | unlocked
    competence = competence.at[flat].set(jnp.minimum(competence[flat] + learn, cmax))
    return competence, competence[flat].astype(jnp.float32) / cmax


def mastered_pct(competence, cfg: Config):
    """ToyEnv.get_score: % of cells whose competence exceeds 3/4 of the maximum."""
    return 100.0 * (4 * competence > 3 * cfg.max_competence).mean()


# --- TEACHER: ALP (Eq. 1-2), GMM by EM with AIC (Eq. 3), sampling (Eq. 4) ---


def absolute_lp(p, r, history, min_history):
    """Eq. 1-2: |r - r_old| with r_old the reward of the stored task nearest to p (ties: the
    first stored), 0 while at most min_history pairs are stored. history: pieces
    (tasks [M, d], rewards [M], valid [M] bool) searched together (update passes the ring of
    earlier updates and this update's episodes so far)."""
    best_d2, best_r, n = jnp.inf, 0.0, 0
    for tasks, rewards, valid in history:
        d2 = jnp.where(valid, sum((tasks[:, m] - p[m]) ** 2 for m in range(p.shape[0])),
                       jnp.inf)  # [M]: one vector per coordinate (CPU-friendly layout)
        j = jnp.argmin(d2)
        best_r = jnp.where(d2[j] < best_d2, rewards[j], best_r)
        best_d2, n = jnp.minimum(d2[j], best_d2), n + valid.sum()
    return jnp.where(n > min_history, jnp.abs(r - best_r), 0.0)


def gmm_n_params(k, dim):
    """Free parameters of a full-covariance GMM (scikit-learn's _n_parameters)."""
    return k * dim * (dim + 1) / 2 + k * dim + k - 1


def cholesky(a):
    """Lower Cholesky factor of [..., D, D] by the textbook recursion, unrolled over the small
    static D: elementwise ops that batch (LAPACK's per-matrix calls are slow for many 3 x 3
    matrices on CPU)."""
    dim = a.shape[-1]
    col = [[None] * dim for _ in range(dim)]
    for j in range(dim):
        s = a[..., j, j] - sum(col[j][m] ** 2 for m in range(j))
        col[j][j] = jnp.sqrt(s)
        for i in range(j + 1, dim):
            s = a[..., i, j] - sum(col[i][m] * col[j][m] for m in range(j))
            col[i][j] = s / col[j][j]
    zero = jnp.zeros_like(a[..., 0, 0])
    return jnp.stack([jnp.stack([col[i][j] if j <= i else zero for j in range(dim)], -1)
                      for i in range(dim)], -2)


def forward_solve(chol, b):
    """y with chol y = b for chol [..., D, D] lower triangular, b [..., D] (unrolled)."""
    y = []
    for i in range(chol.shape[-1]):
        y.append((b[..., i] - sum(chol[..., i, m] * y[m] for m in range(i))) / chol[..., i, i])
    return jnp.stack(y, -1)


def e_step(x, weights, means, covs, active):
    """log p(x_i, component j) [N, K] (inactive components -inf) and the mean log-likelihood."""
    dim = x.shape[-1]
    chol = cholesky(covs)  # [K, D, D]
    diff = x[None] - means[:, None]  # [K, N, D]
    y = forward_solve(chol[:, None], diff)  # [K, N, D]
    log_det = 2 * jnp.log(jnp.diagonal(chol, axis1=1, axis2=2)).sum(-1)  # [K]
    logp = -0.5 * (dim * jnp.log(2 * jnp.pi) + log_det[:, None] + (y ** 2).sum(-1))  # [K, N]
    logp = jnp.where(active[:, None], logp + jnp.log(weights)[:, None], -jnp.inf).T  # [N, K]
    lse = jax.scipy.special.logsumexp(logp, axis=1)  # [N]
    return logp - lse[:, None], lse.mean()


def m_step(x, resp, reg_covar):
    """Weights, means and full covariances from responsibilities [N, K] (scikit-learn's,
    with its 10 eps added to every component's mass)."""
    nk = resp.sum(0) + 10 * jnp.finfo(x.dtype).eps  # [K]
    means = resp.T @ x / nk[:, None]  # [K, D]
    diff = x[None] - means[:, None]  # [K, N, D]
    covs = jnp.einsum("nk,knd,kne->kde", resp, diff, diff) / nk[:, None, None]
    return nk / x.shape[0], means, covs + reg_covar * jnp.eye(x.shape[-1])


def em_fit(key, x, k, cfg: Config):
    """EM for a k-component GMM held in k_max slots (slots >= k inactive): k-means init from
    k random points, then em_iters EM steps. Returns (weights, means, covs, aic)."""
    kmax = cfg.max_gaussians
    active = jnp.arange(kmax) < k

    def assign(centres):
        d2 = ((x[:, None] - centres[None]) ** 2).sum(-1)  # [N, K]
        return jax.nn.one_hot(jnp.argmin(jnp.where(active, d2, jnp.inf), 1), kmax)

    def lloyd(centres, _):
        r = assign(centres)
        nk = r.sum(0)[:, None]
        return jnp.where(nk > 0, r.T @ x / jnp.maximum(nk, 1), centres), None

    centres = x[jax.random.permutation(key, x.shape[0])[:kmax]]
    centres, _ = jax.lax.scan(lloyd, centres, None, cfg.kmeans_iters)
    params = m_step(x, assign(centres), cfg.reg_covar)

    def em(params, _):
        log_resp, _ = e_step(x, *params, active)
        return m_step(x, jnp.exp(log_resp), cfg.reg_covar), None

    params, _ = jax.lax.scan(em, params, None, cfg.em_iters)
    _, ll = e_step(x, *params, active)
    aic = -2 * x.shape[0] * ll + 2 * gmm_n_params(k, x.shape[-1])  # Eq. 3
    finite = jnp.isfinite(aic) & jnp.stack([jnp.isfinite(a).all() for a in params]).all()
    return (*params, jnp.where(finite, aic, jnp.inf))


def fit_gmm(key, x, cfg: Config):
    """Eq. 3: EM for every k in min..max_gaussians (vmapped over k), keep the lowest AIC.
    Returns (weights [K], means [K, D], covs [K, D, D], k, aics [num k])."""
    ks = jnp.arange(cfg.min_gaussians, cfg.max_gaussians + 1)
    w, mu, cov, aic = jax.vmap(em_fit, (0, None, 0, None))(
        jax.random.split(key, ks.shape[0]), x, ks, cfg)
    best = jnp.argmin(aic)
    return w[best], mu[best], cov[best], ks[best], aic


def component_probs(mean_alp, active, anti):
    """Eq. 4: P(j) proportional to the mean ALP of Gaussian j (uniform over the active ones
    if all are 0: the released proportional_choice). anti (broken): the lowest-ALP one."""
    alp = jnp.where(active, mean_alp, 0.0)
    total = alp.sum()
    p = jnp.where(total > 0, alp / jnp.where(total > 0, total, 1.0), active / active.sum())
    low = jax.nn.one_hot(jnp.argmin(jnp.where(active, mean_alp, jnp.inf)), alp.shape[0])
    return jnp.where(anti, low, p)


@struct.dataclass
class Teacher:
    means: jax.Array  # [K, d+1] the last fitted GMM (task coordinates, then ALP)
    covs: jax.Array  # [K, d+1, d+1]
    weights: jax.Array  # [K]
    k: jax.Array  # () Gaussians in use (slots >= k inactive)
    tasks: jax.Array  # [H, d] ring of played tasks (k-NN history)
    rewards: jax.Array  # [H] their rewards
    alps: jax.Array  # [H] their ALP (Eq. 2)
    count: jax.Array  # () episodes played
    teacher: jax.Array  # () index into TEACHERS, traced


def sample_task(key, ts: Teacher, cfg: Config):
    """One task p in [0, 1]^d: uniform while bootstrapping (count < fit_rate), for the random
    teacher, and with probability random_task_ratio; else Eq. 4 and N(mu_j, Sigma_j)."""
    d = cfg.task_dim
    k_u, k_r, k_j, k_z = jax.random.split(key, 4)
    active = jnp.arange(cfg.max_gaussians) < ts.k
    probs = component_probs(ts.means[:, -1], active, ts.teacher == TEACHERS.index("anti"))
    j = jax.random.categorical(k_j, jnp.log(probs))
    z = ts.means[j] + cholesky(ts.covs[j]) @ jax.random.normal(k_z, (d + 1,))
    use_random = ((ts.count < cfg.fit_rate) | (ts.teacher == TEACHERS.index("random"))
                  | (jax.random.uniform(k_r) < cfg.random_task_ratio))
    return jnp.where(use_random, jax.random.uniform(k_u, (d,)), jnp.clip(z[:d], 0.0, 1.0))


def ring_history(ts: Teacher, cfg: Config):
    """The k-NN ring as one history piece of absolute_lp: (tasks [H, d], rewards [H], valid
    [H]); the first min(count, H) slots hold episodes (all of them once count >= H)."""
    h = cfg.history_size
    return ts.tasks, ts.rewards, jnp.arange(h) < jnp.minimum(ts.count, h)


def ring_push(ts: Teacher, p, r, alp, cfg: Config) -> Teacher:
    """Writes one update's fit_rate episodes (p [f, d], r [f], alp [f]) at slot count % H (a
    multiple of fit_rate: the block fits; past H it overwrites the oldest block)."""
    slot = ts.count % cfg.history_size
    return ts.replace(tasks=jax.lax.dynamic_update_slice(ts.tasks, p, (slot, 0)),
                      rewards=jax.lax.dynamic_update_slice(ts.rewards, r, (slot,)),
                      alps=jax.lax.dynamic_update_slice(ts.alps, alp, (slot,)),
                      count=ts.count + cfg.fit_rate)


# --- STATE ---


@struct.dataclass
class State:
    competence: jax.Array  # [n^d] int32 the toy student
    teacher_state: Teacher
    aics: jax.Array  # [num k] AIC of each k at the last fit
    key: jax.Array


def init(key, cfg: Config) -> State:
    kmax, dim, h = cfg.max_gaussians, cfg.task_dim + 1, cfg.history_size
    ts = Teacher(jnp.zeros((kmax, dim)), jnp.tile(jnp.eye(dim), (kmax, 1, 1)),
                 jnp.full(kmax, 1.0 / kmax), jnp.asarray(cfg.min_gaussians, jnp.int32),
                 jnp.zeros((h, cfg.task_dim)), jnp.zeros(h), jnp.zeros(h),
                 jnp.zeros((), jnp.int32), jnp.asarray(TEACHERS.index(cfg.teacher), jnp.int32))
    return State(jnp.zeros(cfg.num_tasks, jnp.int32), ts,
                 jnp.zeros(cfg.max_gaussians - cfg.min_gaussians + 1), key)


# --- UPDATE: fit_rate episodes with the current GMM, then a new fit ---


def update(state: State, cfg: Config):
    key, k_reset, k_eps, k_fit = jax.random.split(state.key, 4)
    ts = state.teacher_state
    env = VecEnv(ToyTaskEnv(cfg.task_dim), 1, functools.partial(sample_task, ts=ts, cfg=cfg))
    _, vstate = env.reset(k_reset)  # the teacher draws the first task

    f = cfg.fit_rate
    ring = ring_history(ts, cfg)  # read-only during the update's episodes

    def episode(carry, xs):
        vstate, competence, new_p, new_r = carry
        i, k = xs  # i is the same for every seed: an unbatched write position
        p = vstate.params[0]  # this episode's task, drawn by the teacher
        _, vstate, _, _, _ = env.step(vstate, jnp.zeros(1, jnp.int32), k)  # auto-reset: next
        competence, r = student_episode(competence, p, cfg)
        alp = absolute_lp(p, r, (ring, (new_p, new_r, jnp.arange(f) < i)), cfg.alp_min_history)
        return (vstate, competence, new_p.at[i].set(p), new_r.at[i].set(r)), (p, r, alp)

    (_, competence, _, _), (p, r, alp) = jax.lax.scan(
        episode, (vstate, state.competence, jnp.zeros((f, cfg.task_dim)), jnp.zeros(f)),
        (jnp.arange(f), jax.random.split(k_eps, f)))
    ts = ring_push(ts, p, r, alp, cfg)
    # Eq. 3 on the last fit_rate points [p, ALP]: exactly this update's episodes
    x = jnp.concatenate([p, alp[:, None]], -1)  # [fit_rate, d+1]
    w, mu, cov, k, aics = fit_gmm(k_fit, x, cfg)
    ok = jnp.isfinite(aics).any()  # else every k's fit failed: keep the previous GMM
    w, mu, cov, k = (jnp.where(ok, a, b) for a, b in
                     ((w, ts.weights), (mu, ts.means), (cov, ts.covs), (k, ts.k)))
    ts = ts.replace(weights=w, means=mu, covs=cov, k=k)
    metrics = {"charts/mastered_pct": mastered_pct(competence, cfg),
               "charts/reward": r.mean(), "charts/alp": alp.mean(),
               "charts/num_gaussians": k.astype(jnp.float32),
               "charts/gmm_max_alp": jnp.where(jnp.arange(cfg.max_gaussians) < k,
                                               mu[:, -1], 0.0).max(),
               "losses/gmm_aic": aics.min()}  # inf when every k's fit failed
    return state.replace(competence=competence, teacher_state=ts, aics=aics, key=key), metrics


def evaluate(state: State, cfg: Config):
    """mastered_pct: [1]'s toy score, % of cells with competence > 3/4 of the maximum;
    competence: the mean normalised competence over all cells."""
    return {"mastered_pct": mastered_pct(state.competence, cfg),
            "competence": state.competence.mean() / cfg.max_competence}


# --- PLOT ---


def plot_run(cfg: Config, out, seed=0, snapshots=4):
    """[1] Fig. 2's view: for ALP-GMM, at `snapshots` times, the tasks of the last fit_rate
    episodes (coloured by ALP) with the fitted Gaussians (ellipses, shaded by mean ALP) over
    the student's competence map; and % mastered cells of the three teachers over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Ellipse

    from common.plot import save_png

    seg = cfg.num_updates // snapshots
    key = jax.random.split(jax.random.PRNGKey(seed), 1)[0]
    runs = {}
    for teacher in TEACHERS:
        c = Config(**{**cfg.__dict__, "teacher": teacher})
        chunk = jax.jit(lambda s, c=c: jax.lax.scan(lambda s, _: update(s, c), s, None, seg))
        state, snaps, curve = jax.jit(init, static_argnums=1)(key, c), [], []
        for _ in range(snapshots):
            state, m = chunk(state)
            snaps.append(jax.device_get(state))
            curve.append(np.asarray(m["charts/mastered_pct"]))
        runs[teacher] = snaps, np.concatenate(curve)
    n, h = cfg.num_cells, cfg.history_size
    fig, axes = plt.subplots(1, snapshots + 1, figsize=(4 * snapshots + 4.5, 4))
    for ax, s in zip(axes, runs["alp_gmm"][0], strict=False):
        ts = s.teacher_state
        comp = s.competence.reshape((n,) * cfg.task_dim)
        if cfg.task_dim > 2:
            comp = comp.reshape(n, n, -1).mean(-1)
        ax.imshow(comp.T / cfg.max_competence, origin="lower", extent=(0, 1, 0, 1),
                  cmap="Greys", vmin=0, vmax=1.5)
        idx = (int(ts.count) - np.arange(1, cfg.fit_rate + 1)) % h
        sc = ax.scatter(ts.tasks[idx, 0], ts.tasks[idx, 1], c=ts.alps[idx], s=6, cmap="plasma",
                        vmin=0, vmax=0.3)
        alp = ts.means[: int(ts.k), -1]
        for j in range(int(ts.k)):
            vals, vecs = np.linalg.eigh(ts.covs[j, :2, :2])
            ang = np.degrees(np.arctan2(vecs[1, 1], vecs[0, 1]))
            ax.add_patch(Ellipse(ts.means[j, :2], *(4 * np.sqrt(np.maximum(vals[::-1], 0))),
                                 angle=ang, fill=False, lw=1.5,
                                 color=plt.cm.viridis(alp[j] / max(alp.max(), 1e-9))))
        ax.set(xlim=(0, 1), ylim=(0, 1), title=f"episode {int(ts.count)}: "
               f"{mastered_pct(s.competence, cfg):.0f}% mastered, k={int(ts.k)}")
    fig.colorbar(sc, ax=axes[snapshots - 1], label="ALP of the task")
    episodes = cfg.fit_rate * (1 + np.arange(cfg.num_updates - cfg.num_updates % snapshots))
    for teacher, color in zip(TEACHERS, ("C0", "grey", "C3"), strict=True):
        axes[-1].plot(episodes, runs[teacher][1], color=color, label=teacher)
    axes[-1].set(xlabel="episodes", ylabel="% mastered cells", ylim=(0, 100))
    axes[-1].legend()
    axes[-1].grid(alpha=0.3)
    fig.suptitle(f"ALP-GMM on [1]'s toy space ({n}^{cfg.task_dim} cells; grey: competence, "
                 "dots: the last fit_rate tasks, ellipses: 2-sigma Gaussians by mean ALP)",
                 fontsize=10)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    """`--plot PNG` (this file's only extra flag) reruns seed 0 of every teacher and draws
    the GMM, the tasks and the competence map at four times."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=__doc__, summary_keys=["mastered_pct", "competence"])
    if flags["--plot"] is not None:
        c = json.loads((Path(res.run_dir) / "config.json").read_text())["config"]
        print(plot_run(Config(**c), flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
