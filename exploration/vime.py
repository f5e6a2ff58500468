"""PPO + VIME: variational information maximizing exploration.

[1] R. Houthooft, X. Chen, Y. Duan, J. Schulman, F. De Turck, P. Abbeel. "VIME: Variational
    Information Maximizing Exploration." NIPS 2016, arXiv:1605.09674. Reference code:
    openai/vime (Theano/rllab): dynamics/bnn.py, algos/batch_polopt_expl.py,
    sampler/parallel_sampler_expl.py, experiments/run_trpo_expl.py.

The agent keeps a Bayesian neural network (BNN) of the dynamics p(s' | s, a; theta) with a
fully factorised Gaussian posterior q_phi(theta), phi = {mu, rho}, sigma = log(1 + e^rho).
A transition is interesting when seeing it would move that belief: the bonus is the
information gain, the KL between the posterior after one update on the transition and the
posterior before it, and the policy maximises r + eta * (normalised KL):

    r'_t = r_t + eta D_KL[q_{phi_t + lambda dphi} || q_{phi_t}]                  [1] Sec. 2.1
    l(phi; s_t) = D_KL[q_phi || q_{phi_t}] - E_{theta~q_phi} log p(s_{t+1}|s_t,a_t;theta)
    dphi = -H^-1 grad_phi l at phi = phi_t (the KL term's gradient is 0 there)
    H^-1 (diagonal, of the KL term at the origin):                         [1] Eq. 16 [M]
        mu:  log^2(1 + e^rho)      rho: log^2(1 + e^rho) (1 + e^rho)^2 / (2 e^{2 rho})
    D_KL ~= 1/2 lambda^2 grad^T H^-1 grad,  lambda = 0.01                  [1] Eq. 17 [M]
    KL_t <- KL_t / mean(medians of the KLs of the last 10 batches)    (released code)
    BNN: ELBO on a replay pool, KL[q||p] / 5 - E_q log p(D|theta), p = N(0, 0.5^2),
         Gaussian likelihood of sd 5, local reparameterisation, 10 samples      [1] Sec. 2.2

The per-transition KL of [1] Eq. 17 is computed in closed form for every transition of a
rollout at once (a vmapped per-sample gradient, no parameter update is applied), and the
BNN trains on its replay pool inside the same jitted `update`. (The equations match the
released dynamics/bnn.py; their numbers 16/17 in [1] are from memory, not checked.)

Reproduce (CPU demo, about 2 minutes on 2 loaded cores; VIME vs the same PPO without the bonus):
    python exploration/vime.py --preset quick --num-seeds 8
    python exploration/vime.py --preset quick --num-seeds 8 --eta 0
Measured after the KL-queue fix (loaded 2-core CPU, load ~10; 8 seeds, 2048 steps; 107 s
wall, 31 CPU-s): distinct cells of FourRooms' 104, VIME 58 97 102 102 62 90 66 58 (median
78, mean 79.4) vs PPO (eta = 0, same keys) 58 95 60 93 42 71 69 55 (median 64.5, mean
67.9); paired gaps 0 2 42 9 20 19 -3 3 (before the fix: 58 97 100 102 64 90 66 58). The
plot, both arms in one program (the same numbers, 128 s wall):
    python exploration/vime.py --plot exploration/vime.png
Paper-scale preset (GPU; it cannot show VIME as it stands: its task is not sparse, below):
    python exploration/vime.py --preset paper
[1] Fig. 1 (a-c) (per an overview of 1605.09674 [M]): on sparse MountainCar, CartpoleSwingup
and HalfCheetah TRPO + VIME reaches the goal where TRPO (also with L2 prediction-error
bonuses) mostly does not; curves only.

Differences from the paper:
- The learner is the shared PPO (common.rl.make_ppo with a Bonus), not TRPO with a linear
  baseline; eta multiplies the normalised KL inside the bonus, and the PPO reward is
  r + eta KL / median. PPO's hyperparameters are the file's, not [1]'s TRPO step 0.01.
- The KL uses [1] Eq. 17's 1/2; the released code's fast_kl_div omits it (a constant the
  median normalisation divides out), so the released sampler's [0, 1000] clip, applied
  here after the 1/2, bites at the code's KL 2000.
- The released code draws one local-reparameterisation noise vector per layer for the
  whole minibatch; here each sample has its own noise (Kingma et al. 2015).
- The BNN is trained inside `update` after the KLs of the rollout were computed (the
  released order: KL with the model of the previous iteration, then fit), for
  `bnn_updates` Adam steps on minibatches of 10 from the pool, once the pool holds 500
  transitions. Inputs (s, a) are whitened with the pool's mean and std, as in the code;
  targets s' with their own pool moments, where the code uses the observations' moments
  for s' too (parallel_sampler_expl.py:70-76, and in the fit). The released code sets the
  first iteration's KL to 0 and queues no median for it (itr > 0); so does this file.
- Discrete actions enter the BNN one-hot. Transitions that end an episode (next_obs is the
  next episode's first) get KL 0 and never enter the pool; the code's pool pairs
  next-observations across episode boundaries (batch_polopt_expl.py:69-80).
- Paper preset: gymnax MountainCarContinuous in place of rllab's sparse MountainCar. It is
  not sparse (-0.1 a^2 per step, +100 at the goal): eta 1e-4 x a normalised KL of ~1 sits
  ~1000x below the action cost, `evaluate`'s distinct_cells is always 0 there (no grid),
  and its episodes last 999 steps, not rllab's 500. A sparse wrapper, success reporting
  and a 500-step cap need common/envs: not built. The bonus settings are the released
  code's defaults (algos/batch_polopt_expl.py): 10 envs x 500 steps = batch_size 5,000
  (:114-115), a 100k pool, min 500, 500 BNN steps of 10 transitions at lr 1e-3
  (:135-148), BNN hidden (32,); [1]'s appendix gives the same for the classic tasks [M].
  Policy (32,): the appendix's classic-task policy [M]. eta 1e-4 is the only released
  value (experiments/run_trpo_expl.py, SwimmerGather, with a 50k batch, a 1M pool, 5000
  BNN steps at lr 1e-4 and a (64, 32) policy); MountainCar's eta is not
  checked [M]. CPU preset: the repo's 4-rooms grid, coverage as the measure (as icm.py).
"""

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax

from common import envs, rl, run
from common.rl import Bonus, PPOConfig, make_ppo

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """PPO + VIME; bonus defaults are the released code's (algos/batch_polopt_expl.py)."""

    env_id: str = "MountainCarContinuous-v0"
    """environment id (gymnax, navix or the repo's own envs)"""
    total_timesteps: int = 2_500_000
    """environment steps (n_itr 500 iterations of 5,000 samples)"""
    num_envs: int = 10
    """parallel environments"""
    num_steps: int = 500
    """rollout length per env per update (10 x 500 = the code's batch_size 5,000)"""
    lr: float = 3e-4
    """PPO Adam learning rate"""
    num_epochs: int = 10
    """PPO optimisation epochs per rollout"""
    num_minibatches: int = 10
    """PPO minibatches per epoch"""
    gamma: float = 0.99
    """discount"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    clip_coef: float = 0.2
    """PPO ratio clip epsilon"""
    ent_coef: float = 0.0
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """global gradient-norm clip of the PPO update"""
    hidden: tuple[int, ...] = (32,)
    """policy and value MLP hidden sizes ([1]'s classic-task policy [M])"""
    eta: float = 1e-4
    """[1] Sec. 2.1: weight of the normalised KL in r + eta KL (0: plain PPO; run_trpo_expl)"""
    bnn_hidden: tuple[int, ...] = (32,)
    """hidden sizes of the BNN dynamics model (unn_n_hidden)"""
    prior_sd: float = 0.5
    """standard deviation of the BNN's Gaussian prior p(theta) = N(0, prior_sd^2)"""
    likelihood_sd: float = 5.0
    """standard deviation of the Gaussian likelihood p(s' | s, a; theta)"""
    num_samples: int = 10
    """Monte Carlo weight samples per likelihood (snn_n_samples)"""
    num_batches: int = 5
    """the ELBO's KL[q||p] is divided by this (the code's n_batches)"""
    bnn_lr: float = 1e-3
    """Adam learning rate of the BNN (unn_learning_rate)"""
    bnn_updates: int = 500
    """BNN Adam steps after each rollout (n_updates_per_sample)"""
    bnn_batch_size: int = 10
    """transitions per BNN step, drawn from the replay pool (pool_batch_size)"""
    pool_size: int = 100_000
    """replay pool capacity in transitions (replay_pool_size)"""
    min_pool_size: int = 500
    """the BNN trains only once the pool holds this many transitions"""
    step_lambda: float = 0.01
    """[1] Eq. 17: lambda, the step of the second-order update"""
    kl_queue: int = 10
    """the KL is divided by the mean of the last kl_queue batches' medians (kl_q_len)"""
    max_episode_steps: int = 100
    """GridMaze and navix only: episode cap in steps"""
    coverage_grid: int = 32
    """side of the grid on which distinct visited cells are counted (grid envs)"""
    dtype: str = "float32"
    """compute dtype of the BNN's matmuls (float32 or bfloat16; KLs stay float32)"""

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // self.batch_size

    @property
    def steps_per_update(self) -> int:
        return self.batch_size

    def validate(self):
        if self.num_updates < 1:
            raise ValueError(
                f"total_timesteps={self.total_timesteps} is less than one rollout "
                f"(num_envs * num_steps = {self.batch_size})"
            )
        if self.batch_size % self.num_minibatches:
            raise ValueError(
                f"num_envs * num_steps = {self.batch_size} is not divisible by "
                f"num_minibatches={self.num_minibatches}"
            )
        counts = "num_envs num_steps num_epochs num_minibatches num_samples num_batches kl_queue"
        for name in f"{counts} bnn_batch_size pool_size max_episode_steps coverage_grid".split():
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in "bnn_updates min_pool_size eta ent_coef vf_coef".split():
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        for name in "lr clip_coef max_grad_norm prior_sd likelihood_sd bnn_lr step_lambda".split():
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if min(self.hidden + self.bnn_hidden, default=1) < 1:
            raise ValueError(
                f"hidden={self.hidden} and bnn_hidden={self.bnn_hidden} must be sizes >= 1"
            )
        if self.min_pool_size > self.pool_size:  # the BNN would never train
            raise ValueError(
                f"min_pool_size={self.min_pool_size} exceeds pool_size={self.pool_size}"
            )
        if self.pool_size < self.batch_size:  # one rollout's write slots would collide
            raise ValueError(f"pool_size={self.pool_size} is less than a rollout {self.batch_size}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")


PRESETS = {
    # CPU demo: the repo's 4-rooms grid (104 cells, start in one corner room), coverage as
    # the measure, 8 envs x 32 steps; the bonus is scaled to matter against PPO's entropy.
    "quick": dict(
        env_id="GridMaze-FourRooms",
        total_timesteps=2048,
        num_envs=8,
        num_steps=32,
        lr=1e-3,
        num_epochs=4,
        num_minibatches=4,
        ent_coef=0.01,
        hidden=(64, 64),
        eta=1.0,
        bnn_updates=50,
        bnn_lr=1e-3,
        pool_size=4096,
        min_pool_size=256,
    ),
    "paper": dict(),
}


def make_env(cfg: Config):
    if cfg.env_id.startswith(("Navix-", "GridMaze-")):
        env = envs.make(cfg.env_id, cfg.num_envs, max_steps=cfg.max_episode_steps)
    else:
        env = envs.make(cfg.env_id, cfg.num_envs)
    return envs.Coverage(env, cfg.coverage_grid)


# --- NETWORKS: the BNN, fully factorised Gaussian weights ([1] Sec. 2.2) ---


def softplus_inv(sigma):
    """rho with log(1 + e^rho) = sigma (the code's std_to_log)."""
    return jnp.log(jnp.expm1(sigma))


def bnn_init(key, sizes, prior_sd):
    """phi = [{mu, rho, b_mu, b_rho} per layer]: mu ~ N(0, 1) (lasagne Normal(1., 0.) in
    the code), rho = softplus^-1(prior_sd), so q starts with the prior's spread."""
    layers = []
    for k, (n_in, n_out) in zip(
        jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:], strict=True), strict=True
    ):
        k_w, k_b = jax.random.split(k)
        rho = softplus_inv(jnp.float32(prior_sd))
        layers.append(
            dict(
                mu=jax.random.normal(k_w, (n_in, n_out)),
                rho=jnp.full((n_in, n_out), rho),
                b_mu=jax.random.normal(k_b, (n_out,)),
                b_rho=jnp.full((n_out,), rho),
            )
        )
    return layers


def bnn_apply(phi, x, key, dtype=jnp.float32):
    """One draw of the BNN's output with the local reparameterisation trick (Kingma et al.
    2015; the code's get_output_for_reparametrization): each unit's pre-activation is
    N(x mu + b_mu, x^2 sigma^2 + sigma_b^2). ReLU hidden layers, linear output. x [B, D]."""
    keys = jax.random.split(key, len(phi))
    for i, (layer, k) in enumerate(zip(phi, keys, strict=True)):
        sd, b_sd = jax.nn.softplus(layer["rho"]), jax.nn.softplus(layer["b_rho"])
        mean = jnp.dot(x.astype(dtype), layer["mu"].astype(dtype)).astype(jnp.float32)
        var = jnp.dot((x**2).astype(dtype), (sd**2).astype(dtype)).astype(jnp.float32)
        mean, var = mean + layer["b_mu"], var + b_sd**2
        x = mean + jnp.sqrt(var) * jax.random.normal(k, mean.shape)
        if i < len(phi) - 1:
            x = jax.nn.relu(x)
    return x


def log_likelihood(phi, x, y, key, num_samples, likelihood_sd, dtype=jnp.float32):
    """(1/S) sum_s sum log N(y; f(x; theta_s), likelihood_sd^2) over the batch and the
    outputs, theta_s ~ q_phi (the code's loss: _log_prob_normal summed, / n_samples)."""

    def one(k):
        pred = bnn_apply(phi, x, k, dtype)
        return (
            -jnp.log(likelihood_sd)
            - 0.5 * jnp.log(2 * jnp.pi)
            - (y - pred) ** 2 / (2 * likelihood_sd**2)
        ).sum()

    return jax.vmap(one)(jax.random.split(key, num_samples)).mean()


# --- LOSS ---


def gaussian_kl(mu_p, sd_p, mu_q, sd_q):
    """D_KL[N(mu_p, sd_p^2) || N(mu_q, sd_q^2)] summed over a factorised Gaussian."""
    return (jnp.log(sd_q / sd_p) + (sd_p**2 + (mu_p - mu_q) ** 2) / (2 * sd_q**2) - 0.5).sum()


def kl_q_q(phi_new, phi_old):
    """D_KL[q_phi_new || q_phi_old] over every weight and bias."""
    total = 0.0
    for n, o in zip(phi_new, phi_old, strict=True):
        for m, r in (("mu", "rho"), ("b_mu", "b_rho")):
            total += gaussian_kl(n[m], jax.nn.softplus(n[r]), o[m], jax.nn.softplus(o[r]))
    return total


def kl_q_prior(phi, prior_sd):
    """D_KL[q_phi || p], p = N(0, prior_sd^2) per weight."""
    total = 0.0
    for layer in phi:
        for m, r in (("mu", "rho"), ("b_mu", "b_rho")):
            total += gaussian_kl(layer[m], jax.nn.softplus(layer[r]), 0.0, prior_sd)
    return total


def elbo_loss(phi, x, y, key, cfg: Config):
    """[1] Sec. 2.2: the negative ELBO on a minibatch of the pool,
    KL[q_phi || p] / num_batches - E_q log p(D | theta)."""
    ll = log_likelihood(phi, x, y, key, cfg.num_samples, cfg.likelihood_sd, jnp.dtype(cfg.dtype))
    return kl_q_prior(phi, cfg.prior_sd) / cfg.num_batches - ll


def inverse_hessian(phi):
    """[1] Eq. 16: diagonal H^-1 of l at the origin (of its KL term, the code's invH): for
    mu sigma^2, for rho sigma^2 / (2 sigmoid(rho)^2), sigma = log(1 + e^rho)."""
    out = []
    for layer in phi:
        inv = {}
        for m, r in (("mu", "rho"), ("b_mu", "b_rho")):
            sd = jax.nn.softplus(layer[r])
            inv[m] = sd**2
            inv[r] = sd**2 / (2 * jax.nn.sigmoid(layer[r]) ** 2)
        out.append(inv)
    return out


def one_step_kl(phi, x, y, key, cfg: Config):
    """[1] Eq. 17 for ONE transition (x [D], y [O]): 1/2 lambda^2 grad^T H^-1 grad with
    grad = grad_phi of -E_q log p(y | x; theta) at phi (the KL term of l is 0 there)."""
    grad = jax.grad(
        lambda p: (
            -log_likelihood(
                p, x[None], y[None], key, cfg.num_samples, cfg.likelihood_sd, jnp.dtype(cfg.dtype)
            )
        )
    )(phi)
    terms = jax.tree.map(lambda g, h: (g**2 * h).sum(), grad, inverse_hessian(phi))
    return 0.5 * cfg.step_lambda**2 * sum(jax.tree.leaves(terms))


def information_gain(phi, x, y, key, cfg: Config):
    """One_step_kl for every transition at once: x [B, D], y [B, O] -> KL [B], clipped to
    [0, 1000] as in the released sampler."""
    kls = jax.vmap(lambda xi, yi, k: one_step_kl(phi, xi, yi, k, cfg))(
        x, y, jax.random.split(key, x.shape[0])
    )
    return jnp.clip(kls, 0.0, 1000.0)


def median_normalise(kl, valid, queue, count):
    """The released code's use_kl_ratio_q: push the median of this batch's KLs into a queue
    of the last len(queue) medians, divide the KLs by the queue's mean. Returns
    (kl / mean, queue, count)."""
    med = jnp.nanmedian(jnp.where(valid, kl, jnp.nan))
    med = jnp.where(valid.any(), med, 0.0)
    queue = jnp.roll(queue, 1).at[0].set(med)
    count = count + 1
    filled = jnp.arange(queue.shape[0]) < count
    mean = (queue * filled).sum() / jnp.minimum(count, queue.shape[0])
    return kl / jnp.maximum(mean, 1e-8), queue, count


# --- REPLAY POOL ---


def pool_add(pool, x, y, valid):
    """Write the valid rows of x [B, D], y [B, O] into the circular pool."""
    cap = pool["x"].shape[0]
    slot = (pool["top"] + jnp.cumsum(valid) - 1) % cap
    slot = jnp.where(valid, slot, cap)  # out of range: dropped
    n = valid.sum()
    return dict(
        x=pool["x"].at[slot].set(x, mode="drop"),
        y=pool["y"].at[slot].set(y, mode="drop"),
        top=(pool["top"] + n) % cap,
        size=jnp.minimum(pool["size"] + n, cap),
    )


def pool_moments(pool):
    """Mean and std of the filled inputs and targets (the code's mean_obs_act); the
    identity while the pool is empty."""
    filled = (jnp.arange(pool["x"].shape[0]) < pool["size"])[:, None]
    n = jnp.maximum(pool["size"], 1)

    def moments(v):
        mean = (v * filled).sum(0) / n
        std = jnp.sqrt((((v - mean) ** 2) * filled).sum(0) / n)
        empty = pool["size"] == 0
        return jnp.where(empty, 0.0, mean), jnp.where(empty, 1.0, std)

    return moments(pool["x"]), moments(pool["y"])


# --- BONUS ---


def make_bonus(cfg: Config, env) -> Bonus:
    """VIME as a `common.rl.Bonus`. The BNN is not trained by PPO's optimiser: its params,
    its own Adam state, the replay pool and the KL-median queue are statistics, updated in
    `reward` (KLs first, then the pool and the BNN's fit). eta is a traced statistic, so
    one compiled program runs VIME seeds beside eta = 0 (plain PPO) seeds."""
    obs_dim = math.prod(env.observation_shape)
    discrete = env.num_actions is not None
    act_dim = env.num_actions if discrete else int(env.action_shape[0])
    sizes = (obs_dim + act_dim, *cfg.bnn_hidden, obs_dim)
    tx = optax.adam(cfg.bnn_lr)

    def inputs(b):
        obs = b["obs"].reshape(*b["obs"].shape[:2], -1).astype(jnp.float32)
        nxt = b["next_obs"].reshape(*obs.shape).astype(jnp.float32)
        act = (
            jax.nn.one_hot(b["action"], act_dim)
            if discrete
            else b["action"].reshape(*obs.shape[:2], -1).astype(jnp.float32)
        )
        x = jnp.concatenate([obs, act], -1).reshape(-1, obs_dim + act_dim)  # [T*N, D]
        return x, nxt.reshape(-1, obs_dim), ~b["done"].reshape(-1)

    def init(key, obs):
        k_bnn, key = jax.random.split(key)
        phi = bnn_init(k_bnn, sizes, cfg.prior_sd)
        pool = dict(
            x=jnp.zeros((cfg.pool_size, sizes[0])),
            y=jnp.zeros((cfg.pool_size, obs_dim)),
            top=jnp.zeros((), jnp.int32),
            size=jnp.zeros((), jnp.int32),
        )
        stats = dict(
            phi=phi,
            opt=tx.init(phi),
            pool=pool,
            key=key,
            queue=jnp.zeros(cfg.kl_queue),
            count=jnp.zeros((), jnp.int32),
            eta=jnp.asarray(cfg.eta, jnp.float32),
            elbo=jnp.zeros(()),
            kl=jnp.zeros(()),
        )
        return {}, stats

    def reward(params, stats, b):
        key, k_kl, k_fit = jax.random.split(stats["key"], 3)
        x, y, valid = inputs(b)
        (x_mean, x_std), (y_mean, y_std) = pool_moments(stats["pool"])
        xn, yn = (x - x_mean) / (x_std + 1e-8), (y - y_mean) / (y_std + 1e-8)
        kl = information_gain(stats["phi"], xn, yn, k_kl, cfg)  # [1] Eq. 17, [T*N]
        # the code: no KL and no queue entry in the first iteration (itr > 0 only)
        first = stats["pool"]["size"] == 0
        kl = jnp.where(valid & ~first, kl, 0.0)
        r, queue, count = median_normalise(kl, valid & ~first, stats["queue"], stats["count"])
        queue = jnp.where(first, stats["queue"], queue)
        count = jnp.where(first, stats["count"], count)

        # --- the BNN's fit on the replay pool ([1] Sec. 2.2; the code's train_fn) ---
        pool = pool_add(stats["pool"], x, y, valid)
        (x_mean, x_std), (y_mean, y_std) = pool_moments(pool)

        def step(carry, k):
            phi, opt = carry
            k_idx, k_lik = jax.random.split(k)
            idx = jax.random.randint(k_idx, (cfg.bnn_batch_size,), 0, jnp.maximum(pool["size"], 1))
            bx = (pool["x"][idx] - x_mean) / (x_std + 1e-8)
            by = (pool["y"][idx] - y_mean) / (y_std + 1e-8)
            loss, g = jax.value_and_grad(elbo_loss)(phi, bx, by, k_lik, cfg)
            u, opt = tx.update(g, opt, phi)
            return (optax.apply_updates(phi, u), opt), loss

        (phi, opt), losses = jax.lax.scan(
            step, (stats["phi"], stats["opt"]), jax.random.split(k_fit, cfg.bnn_updates)
        )
        fit = pool["size"] >= cfg.min_pool_size
        phi, opt = jax.tree.map(
            lambda new, old: jnp.where(fit, new, old), (phi, opt), (stats["phi"], stats["opt"])
        )
        elbo = jnp.where(fit, losses.mean() if cfg.bnn_updates else 0.0, 0.0)
        kl_mean = kl.sum() / jnp.maximum(valid.sum(), 1)
        new = dict(
            phi=phi,
            opt=opt,
            pool=pool,
            key=key,
            queue=queue,
            count=count,
            eta=stats["eta"],
            elbo=elbo,
            kl=kl_mean,
        )
        return stats["eta"] * r.reshape(b["done"].shape), new

    def loss(params, stats, mb):
        return 0.0, {"losses/bnn_elbo": stats["elbo"], "charts/kl": stats["kl"]}

    return Bonus(init, reward, loss)


# --- TRAIN ---


def ppo_config(cfg: Config) -> PPOConfig:
    # r = r^e + r^i (PPO's ext_coef = int_coef = 1): eta is applied inside the Bonus
    return rl.ppo_config(cfg, anneal_lr=False)


def learner(cfg: Config):
    env = make_env(cfg)
    return make_ppo(env, ppo_config(cfg), None, make_bonus(cfg, env))


def init(key, cfg: Config):
    return learner(cfg)[0](key)


def update(state, cfg: Config):
    state, metrics = learner(cfg)[1](state)
    metrics["charts/distinct_cells"] = state.env_state.visited.sum()
    return state, metrics


def evaluate(state, cfg: Config):
    """Coverage at the end of training: distinct cells visited (grid envs)."""
    return {"distinct_cells": state.env_state.visited.sum()}


# --- MAIN ---


def plot_runs(out: str, seeds: int = 8):
    """Distinct cells against env steps on the quick preset, `seeds` seeds per arm: VIME
    and the same PPO with eta = 0 on the same keys, in one compiled program (eta is a
    traced statistic of the Bonus)."""
    import matplotlib.pyplot as plt
    import numpy as np

    from common import plot

    c = Config(**PRESETS["quick"])

    def train(key, eta):
        state = init(key, c)
        state = state.replace(bonus_stats={**state.bonus_stats, "eta": eta})
        return jax.lax.scan(lambda s, _: update(s, c), state, None, c.num_updates)[1]

    keys = jax.random.split(jax.random.PRNGKey(0), seeds)
    etas = jnp.array([c.eta] * seeds + [0.0] * seeds)
    metrics = jax.jit(jax.vmap(train))(jnp.concatenate([keys, keys]), etas)
    cells = np.asarray(metrics["charts/distinct_cells"])  # (2 seeds, updates)
    steps = np.arange(1, cells.shape[1] + 1) * c.batch_size
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for color, label, arm in (
        ("C0", f"VIME (eta = {c.eta:g})", cells[:seeds]),
        ("C1", "PPO (eta = 0)", cells[seeds:]),
    ):
        ax.plot(steps, np.median(arm, 0), color=color, label=label)
        ax.fill_between(steps, arm.min(0), arm.max(0), color=color, alpha=0.2)
        print(label, arm[:, -1], "median", np.median(arm[:, -1]), "mean", arm[:, -1].mean())
    ax.set(
        xlabel="environment steps",
        ylabel="distinct cells visited (of 104)",
        title=f"FourRooms, {seeds} seeds per arm (median, min-max)",
    )
    ax.title.set_fontsize(10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return plot.save_png(fig, out)


SUMMARY = "distinct_cells charts/episodic_return charts/intrinsic_reward charts/kl".split()


def main(argv=None):
    flags, argv = run.pop_flags(argv, "--plot")
    if flags["--plot"]:
        return plot_runs(flags["--plot"])
    return run.main(
        Config,
        init,
        update,
        presets=PRESETS,
        evaluate=evaluate,
        argv=argv,
        doc=__doc__,
        summary_keys=[*SUMMARY, "losses/bnn_elbo"],
    )


if __name__ == "__main__":
    main()
