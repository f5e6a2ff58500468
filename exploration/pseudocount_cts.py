"""PPO + pseudo-counts from a CTS density model over frames (E8).

[1] M. G. Bellemare, S. Srinivasan, G. Ostrovski, T. Schaul, D. Saxton, R. Munos. "Unifying
    Count-Based Exploration and Intrinsic Motivation." NIPS 2016, arXiv:1606.01868.
[2] J. Veness, K. S. Ng, M. Hutter, M. Bowling. "Context Tree Switching." DCC 2012,
    arXiv:1111.3182 (the CTS mixture).
[3] M. G. Bellemare, J. Veness, E. Talvitie. "Skip Context Tree Switching." ICML 2014: the
    model of [1]'s appendix, released as SkipCTS (M. Bellemare; python/cts/model.py). Plain
    CTS is used here (no skip contexts).

A density model rho over whole frames, trained online on every frame the agent sees, turns
into a count: after seeing x once more its probability should rise as an empirical
frequency would, N/n -> (N + 1)/(n + 1). Solving these two equations for (N, n):

    rho_n(x) = rho(x | x_1..x_n),  rho'_n(x) = rho(x | x_1..x_n x)  (recoding prob.) [1] Sec. 3
    N_hat_n(x) = rho_n(x) (1 - rho'_n(x)) / (rho'_n(x) - rho_n(x))                  [1] Eq. 2
    PG_n(x) = log rho'_n(x) - log rho_n(x)  (prediction gain);
    N_hat_n(x) ~ (exp(PG_n(x)) - 1)^-1   (`--count pg`)                            [1] Sec. 4
    r^+(x) = beta (N_hat_n(x) + 0.01)^-1/2,  beta = 0.05                            [1] Sec. 5

The density model ([1] App.: "CTS", the model of [3] without its skip contexts): frames
downsampled to 42x42 with 8 grey levels; the probability of a frame is the product over
pixel locations of a location-dependent model of the pixel's level given its L-shaped
context (left, up, up-left, up-right neighbours; 0 outside the frame). Each pixel's model
is a context tree of depth 4 over that context: a node at depth d holds a Dirichlet
estimator with the Perks prior 1/L per level, p_e(s) = (c_s + 1/L) / (c + 1), and mixes
its own prediction with its child's through switching weights ([2]; alpha_n = 1/(n + 1)
after n frames):

    p_d = (w_stay p_e,d + w_split p_{d+1}) / (w_stay + w_split),  p_4 = p_e,4
    w_stay <- (1 - alpha) w_stay p_e,d + alpha w_split p_{d+1}
    w_split <- (1 - alpha) w_split p_{d+1} + alpha w_stay p_e,d                       [2] Alg. 1

`cts_step` predicts the frame (log rho), updates every node on each pixel's path (counts
and weights), and predicts it again with the updated model (log rho'): the "update a copy,
re-query" of [1], and rho'_n = rho_{n+1} since the model sees the frames one at a time, in
order (time step by time step, env by env within one). It returns PG as the sum over pixels
of each pixel's log rho' - log rho, not as the difference of the two frame sums (~-1000 in
float32, which would round PG to ~1e-4). Everything lives in the state (counts int32
(pixels, nodes, levels), log-weights, n) and runs inside the jitted `update`.

Reproduce (CPU demo, loaded 2-core CPU; CTS bonus vs the same PPO with beta = 0):
    python exploration/pseudocount_cts.py --preset quick --num-seeds 8
    python exploration/pseudocount_cts.py --preset quick --num-seeds 8 --beta 0
    python exploration/pseudocount_cts.py --preset quick --num-seeds 8 --count pg
    python exploration/pseudocount_cts.py --plot exploration/pseudocount_cts.png
Measured (loaded 2-core CPU, load average ~18; 8 seeds, 8,192 steps; distinct cells of
DeepSea-16's 136 + 17 end positions, the seeds' final values and median):
    CTS pseudo-count   151 143 146 151 151 147 145 146   median 146.5, mean 147.5
    CTS, PG count      151 143 146 144 151 147 145 146   median 146
    PPO (beta = 0)     116 110 119 121 127 122 126 130   median 121.5, mean 121.4
Treasure found (positive episodes) by 3 of 8 CTS seeds, 0 of 8 PPO seeds. The PG count is
almost the exact one here: a 16 x 16 binary frame's rho' is far below 1. Wall time: 5.5-7.5
min for the three arms of `--plot` (77 CPU-s in all) [plot: pseudocount_cts.png].
Paper setting (GPU; Montezuma's Revenge through envpool; rooms visited is the measure):
    python exploration/pseudocount_cts.py --preset paper
[1] Fig. 3 / Sec. 5: DQN + CTS pseudo-counts (with a mixed Monte-Carlo return) visits 15
rooms of Montezuma's Revenge in 50M frames (DQN: 2); A3C+ (A3C with the bonus) improves
on A3C in the hard games [M] (numbers from memory, not checked here).

Differences from the paper:
- The learner is the repo's PPO (common.rl.make_ppo, the density model as a Bonus) in the
  place of A3C+ ([1] Sec. 5.2: A3C + bonus); the DQN agent with its mixed Monte-Carlo
  return ([1] Sec. 5.1) is not built. PPO's Atari values for the paper preset (128 envs x
  128 steps, lr 2.5e-4, clip 0.1); A3C's torso (16 8x8/4, 32 4x4/2, dense 256) on envpool's
  42x42 grey frames (4 stacked); 50M agent steps = 200M frames [M].
- The bonus is that of the frame the action was taken in (each frame is fed to the model
  exactly once, in order); the terminal frame of an episode is never seen (auto-reset).
- The switching weights are kept normalised (log w_stay, log w_split minus their
  logsumexp after each update): the mixture is unchanged, float32 does not drift.
- CTS is not learning-positive in general (nearly so in practice [M]); where
  rho' <= rho the prediction gain is floored at 1e-10 (a huge count, bonus ~ 0), as
  utils/fast_cts.pyx floors prob_ratio - 1 (pseudo-counts at most 1e10).
- The switching update is simultaneous as in [2] Alg. 1 (both new weights from the old
  ones); the SkipCTS / fast_cts code updates w_split from the already-updated w_stay.
- Float32 throughout: pseudo-counts of frames seen ~1e6 times are imprecise (their bonus
  is ~0 either way).
- The context order down the tree is left, up, up-left, up-right, as in fast_cts.pyx's
  _update and SkipCTS's CTSNode.update; the Perks prior and alpha_n = 1/(n + 1) follow the
  SkipCTS code (read, not copied). 42x42, 8 levels, depth 4 and beta = 0.05 agree with
  the public ports (steveKapturowski/tensorflow-rl utils/fast_cts.pyx); [1]'s equation
  and section numbers here are from memory [M].
- The model sees a rollout's frames in one sequential `lax.scan` (num_envs x num_steps
  steps per update, 16,384 at the paper preset): exact online order, but a serial cost
  that no batch size amortises.
- CPU preset: gymnax DeepSea (bsuite), whose observation is an N x N binary image (1 where
  the agent is): 2 levels, no downsampling; coverage (distinct cells) is the measure.
"""

from dataclasses import dataclass

import distrax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from common import envs, rl, run
from common.nets import NatureCNN, orthogonal
from common.rl import Bonus, PPOConfig, make_ppo

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """PPO + CTS pseudo-count bonus; density-model and bonus defaults are [1]'s."""

    env_id: str = "MontezumaRevenge-v5"
    """environment id (envpool Atari, or gymnax DeepSea-bsuite-<N>: an N x N image)"""
    total_timesteps: int = 50_000_000
    """environment steps (200M frames [M])"""
    num_envs: int = 128
    """parallel environments"""
    num_steps: int = 128
    """rollout length"""
    lr: float = 2.5e-4
    """Adam learning rate (constant)"""
    num_epochs: int = 4
    """PPO optimisation epochs per rollout"""
    num_minibatches: int = 4
    """PPO minibatches per epoch"""
    gamma: float = 0.99
    """discount ([1]: 0.99)"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    clip_coef: float = 0.1
    """PPO ratio clip epsilon"""
    ent_coef: float = 0.01
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """global gradient-norm clip"""
    hidden: tuple[int, ...] = (64, 64)
    """non-pixel observations: hidden sizes of the policy and value MLPs"""
    beta: float = 0.05
    """bonus scale, r^+ = beta (N_hat + 0.01)^-1/2 ([1] Sec. 5; 0: plain PPO, model kept)"""
    count: str = "pseudo"
    """pseudo-count: "pseudo" ([1] Eq. 2, exact) or "pg" ((exp(PG) - 1)^-1, [1] Sec. 4)"""
    levels: int = 8
    """L, quantisation levels of a pixel ([1]: 8 grey levels)"""
    obs_high: float = 256.0
    """observations lie in [0, obs_high): level = floor(x L / obs_high) (Atari: 256)"""
    context_length: int = 4
    """D, depth of each pixel's context tree: left, up, up-left, up-right ([1]: 4)"""
    frame_size: int = 42
    """Atari: side of the downsampled grey frame the model and policy see ([1]: 42)"""
    sticky_action_prob: float = 0.0
    """Atari only: repeat the previous action with this probability"""
    max_episode_steps: int = 4500
    """Atari episode cap in agent steps (18,000 frames)"""
    coverage_grid: int = 32
    """side of the grid on which distinct visited cells are counted (grid envs)"""

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // self.batch_size

    @property
    def steps_per_update(self) -> int:
        return self.batch_size

    @property
    def is_atari(self) -> bool:
        return self.env_id.endswith("-v5")

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
        if self.count not in ("pseudo", "pg"):
            raise ValueError(f"count={self.count!r} must be 'pseudo' or 'pg'")
        if self.levels < 2:
            raise ValueError(f"levels={self.levels} must be >= 2")
        if not 0 <= self.context_length <= 4:
            raise ValueError(
                f"context_length={self.context_length} must be in 0..4 "
                "(left, up, up-left, up-right)"
            )
        if self.levels ** (self.context_length + 1) >= 2**31:
            raise ValueError(
                f"levels^(context_length + 1) = "
                f"{self.levels ** (self.context_length + 1)} overflows int32 nodes"
            )
        for name in ("beta", "ent_coef", "vf_coef"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("obs_high", "lr", "clip_coef", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("frame_size", "max_episode_steps", "coverage_grid"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not self.is_atari:
            envs.check_id(self.env_id)


PRESETS = {
    # CPU demo: bsuite DeepSea N = 16 as an image (16 x 16 binary, 2 levels); 136 cells of
    # the lower triangle plus the 17 end positions below it; coverage is the measure.
    "quick": dict(
        env_id="DeepSea-bsuite-16",
        total_timesteps=8192,
        num_envs=16,
        num_steps=32,
        lr=1e-3,
        clip_coef=0.2,
        levels=2,
        obs_high=2.0,
    ),
    "paper": dict(),
}


# --- ENVIRONMENT ---


def make_env(cfg: Config):
    if cfg.is_atari:  # 42x42 grey, 4 frames, frame skip 4 (envpool's preprocessing)
        env = envs.make(
            cfg.env_id,
            cfg.num_envs,
            img_height=cfg.frame_size,
            img_width=cfg.frame_size,
            stack_num=4,
            repeat_action_probability=cfg.sticky_action_prob,
            max_episode_steps=cfg.max_episode_steps,
            episodic_life=False,
            reward_clip=True,
        )
        return envs.Coverage(env, cfg.coverage_grid, rooms=True)
    return envs.Coverage(envs.make(cfg.env_id, cfg.num_envs), cfg.coverage_grid)


def frame_of(obs, pixels: bool):
    """The frame the density model sees: Atari's last stacked frame (..., H, W); other
    observations as they are, a vector read as a 1 x D image."""
    if pixels:
        return obs[..., -1, :, :]
    return obs if obs.ndim >= 2 else obs[None]


def quantize(frame, levels: int, obs_high: float):
    """Pixel levels floor(x L / obs_high), clipped to [0, L - 1], int32."""
    q = jnp.floor(frame.astype(jnp.float32) * (levels / obs_high)).astype(jnp.int32)
    return jnp.clip(q, 0, levels - 1)


# --- NETWORKS ---


class PixelPolicy(nn.Module):
    """A3C's torso (NIPS DQN: 16 8x8/4, 32 4x4/2, dense 256) with policy and value heads."""

    num_actions: int

    @nn.compact
    def __call__(self, obs):
        x = NatureCNN(features=256, layers=((16, 8, 4), (32, 4, 2)))(jnp.moveaxis(obs, -3, -1))
        logits = nn.Dense(self.num_actions, kernel_init=orthogonal(0.01))(x)
        value = nn.Dense(1, kernel_init=orthogonal(1.0))(x)[..., 0]
        return distrax.Categorical(logits=logits), value


# --- DENSITY MODEL (CTS over L-shaped pixel contexts) ---


def num_nodes(levels: int, depth: int) -> int:
    """Nodes of one pixel's context tree: 1 + L + ... + L^D."""
    return sum(levels**d for d in range(depth + 1))


def cts_init(shape, levels: int, depth: int):
    """An empty model of frames of `shape` (H, W): counts (H W, nodes, L), log-weights
    (H W, nodes, 2) = log(1/2) each (stay, split), n = 0 frames."""
    p, m = int(np.prod(shape)), num_nodes(levels, depth)
    return {
        "counts": jnp.zeros((p, m, levels), jnp.int32),
        "log_w": jnp.full((p, m, 2), np.log(0.5), jnp.float32),
        "n": jnp.zeros((), jnp.int32),
    }


def contexts(x, depth: int):
    """Each pixel's L-shaped context (left, up, up-left, up-right; 0 outside), the first
    `depth` of them: x (H, W) int -> (H W, depth)."""
    pad = jnp.pad(x, 1)  # (H + 2, W + 2)
    h, w = x.shape
    ctx = [pad[1:-1, :-2], pad[:-2, 1:-1], pad[:-2, :-2], pad[:-2, 2:]][:depth]
    return jnp.stack(ctx, -1).reshape(h * w, depth) if depth else jnp.zeros((h * w, 0), x.dtype)


def node_index(ctx, levels: int):
    """Node at depth d on each pixel's path: offset_d + code of the first d context levels
    (L-ary, first symbol most significant). ctx (P, D) -> (P, D + 1)."""
    depth = ctx.shape[-1]
    code, out = jnp.zeros(ctx.shape[:-1], jnp.int32), []
    for d in range(depth + 1):
        out.append(num_nodes(levels, d - 1) + code if d else code)
        if d < depth:
            code = code * levels + ctx[..., d]
    return jnp.stack(out, -1)


def _path(model, x, levels: int, depth: int):
    """What frame x (H, W) reads on each pixel's path of nodes: (levels xs (P,), nodes
    (P, D+1), counts of x's level c_x (P, D+1), totals c (P, D+1), log-weights (P, D+1, 2))."""
    xs = x.reshape(-1)
    nodes = node_index(contexts(x, depth), levels)
    rows = jnp.arange(xs.shape[0])[:, None]
    counts = model["counts"][rows, nodes]  # (P, D+1, L)
    c_x = jnp.take_along_axis(counts, xs[:, None, None], -1)[..., 0]
    return xs, nodes, c_x, counts.sum(-1), model["log_w"][rows, nodes]


def estimator(c_x, c, levels: int):
    """log p_e(x) of a node's Dirichlet estimator with the Perks prior 1/L per level:
    (c_x + 1/L) / (c + 1)."""
    return jnp.log((c_x + 1.0 / levels) / (c + 1.0))


def mixture(lp_est, log_w):
    """[2]: p_d = (w_stay p_e,d + w_split p_{d+1}) / (w_stay + w_split) from the leaf
    (p_D = p_e,D) up to the root. lp_est (P, D+1), log_w (P, D+1, 2) -> log p_d (P, D+1)."""
    depth = lp_est.shape[-1] - 1
    mix = [lp_est[:, depth]]
    for d in range(depth - 1, -1, -1):
        num = jnp.logaddexp(log_w[:, d, 0] + lp_est[:, d], log_w[:, d, 1] + mix[0])
        mix.insert(0, num - jnp.logaddexp(log_w[:, d, 0], log_w[:, d, 1]))
    return jnp.stack(mix, -1)


def switch(log_w, lp_est, lp_mix, n):
    """[2] Alg. 1 at the inner nodes after the n-th frame, alpha = 1/(n + 1):
    w_stay <- (1 - alpha) w_stay p_e,d + alpha w_split p_{d+1}, and symmetrically; kept
    normalised (the mixture only reads their ratio). log_w (P, D, 2) -> (P, D, 2)."""
    n = n.astype(jnp.float32)
    log_a, log_1ma = -jnp.log1p(n), jnp.log(n) - jnp.log1p(n)
    stay, split = log_w[..., 0] + lp_est[:, :-1], log_w[..., 1] + lp_mix[:, 1:]
    new = jnp.stack(
        [
            jnp.logaddexp(log_1ma + stay, log_a + split),
            jnp.logaddexp(log_1ma + split, log_a + stay),
        ],
        -1,
    )
    return new - jax.nn.logsumexp(new, -1, keepdims=True)


def cts_log_prob(model, x, levels: int, depth: int):
    """log rho(x) of each pixel of frame x (H, W) under the model: (P,) (the frame's log
    probability is their sum)."""
    _, _, c_x, c, log_w = _path(model, x, levels, depth)
    return mixture(estimator(c_x, c, levels), log_w)[:, 0]


def cts_step(model, x, levels: int, depth: int):
    """[1] Sec. 3 for one frame: log rho_n(x); the model updated with x (counts + 1 at every
    node of each pixel's path, the inner nodes' switching weights); and log rho'_n(x), the
    updated model's probability of x (= `cts_log_prob` of the new model, computed from the
    same path without reading the tables again). Returns (model, log_rho, pg): PG = log rho'
    - log rho summed over pixels as per-pixel differences (a difference of the two float32
    frame sums, each ~-1000, would round PG to ~1e-4)."""
    xs, nodes, c_x, c, log_w = _path(model, x, levels, depth)
    lp_est = estimator(c_x, c, levels)
    lp_mix = mixture(lp_est, log_w)
    n = model["n"] + 1
    log_w = log_w.at[:, :depth].set(switch(log_w[:, :depth], lp_est, lp_mix, n))
    lp_mix_new = mixture(estimator(c_x + 1, c + 1, levels), log_w)  # recoding probability
    rows = jnp.arange(xs.shape[0])[:, None]
    model = {
        "counts": model["counts"].at[rows, nodes, xs[:, None]].add(1, unique_indices=True),
        "log_w": model["log_w"].at[rows, nodes].set(log_w, unique_indices=True),
        "n": n,
    }
    return model, lp_mix[:, 0].sum(), (lp_mix_new[:, 0] - lp_mix[:, 0]).sum()


# --- PSEUDO-COUNT AND BONUS ---

MIN_PG = 1e-10
"""Floor of the prediction gain where the model was not learning-positive (rho' <= rho);
fast_cts.pyx's floor of prob_ratio - 1 (pseudo-counts at most 1e10)."""


def pseudo_count(log_rho, pg):
    """[1] Eq. 2: N_hat = rho (1 - rho') / (rho' - rho) = (1 - rho') / (exp(PG) - 1), in
    log space (whole frames have log rho ~ -1000), PG = log rho' - log rho."""
    return -jnp.expm1(log_rho + pg) / jnp.expm1(jnp.maximum(pg, MIN_PG))


def pg_count(log_rho, pg):
    """[1] Sec. 4: N_hat ~ (exp(PG) - 1)^-1, PG = log rho' - log rho (an upper bound of Eq. 2's
    count, equal when rho' << 1; log rho is not read)."""
    return 1.0 / jnp.expm1(jnp.maximum(pg, MIN_PG))


def count_bonus(n_hat, beta):
    """[1] Sec. 5: r^+ = beta (N_hat + 0.01)^-1/2."""
    return beta * jax.lax.rsqrt(n_hat + 0.01)


def make_bonus(cfg: Config, pixels: bool) -> Bonus:
    """The CTS pseudo-count as a `common.rl.Bonus`: no params; stats = the density model,
    beta (traced, so seeds with beta = 0 run plain PPO in the same program) and the last
    rollout's median pseudo-count and prediction gain."""
    count_fn = pseudo_count if cfg.count == "pseudo" else pg_count

    def init(key, obs):
        shape = frame_of(obs[0], pixels).shape
        return {}, {
            **cts_init(shape, cfg.levels, cfg.context_length),
            "beta": jnp.asarray(cfg.beta, jnp.float32),
            "count": jnp.zeros(()),
            "pg": jnp.zeros(()),
        }

    def reward(params, stats, b):
        frames = quantize(frame_of(b["obs"], pixels), cfg.levels, cfg.obs_high)
        t, n = frames.shape[:2]
        frames = frames.reshape(t * n, *frames.shape[2:])  # time-major, env-minor order

        def step(model, x):
            model, lr, pg = cts_step(model, x, cfg.levels, cfg.context_length)
            return model, (lr, pg)

        model = {k: stats[k] for k in ("counts", "log_w", "n")}
        model, (log_rho, pg) = jax.lax.scan(step, model, frames)
        n_hat = count_fn(log_rho, pg)
        r = count_bonus(n_hat, stats["beta"]).reshape(t, n)
        return r, {
            **stats,
            **model,
            "count": jnp.median(n_hat),
            "pg": jnp.median(pg),
        }

    def loss(params, stats, mb):
        return 0.0, {}

    return Bonus(init, reward, loss)


# --- TRAIN ---


def ppo_config(cfg: Config) -> PPOConfig:
    return rl.ppo_config(cfg, anneal_lr=False)


def learner(cfg: Config):
    env = make_env(cfg)
    policy = PixelPolicy(env.num_actions) if cfg.is_atari else None  # None: rl.ActorCritic
    return make_ppo(env, ppo_config(cfg), policy, make_bonus(cfg, cfg.is_atari))


def init(key, cfg: Config):
    return learner(cfg)[0](key)


def update(state, cfg: Config):
    state, metrics = learner(cfg)[1](state)
    metrics["charts/distinct_cells"] = state.env_state.visited.sum()
    metrics["charts/pseudo_count"] = state.bonus_stats["count"]
    metrics["charts/prediction_gain"] = state.bonus_stats["pg"]
    return state, metrics


def evaluate(state, cfg: Config):
    """Coverage at the end of training: distinct grid cells (Atari: rooms) visited."""
    return {"distinct_cells": state.env_state.visited.sum()}


# --- MAIN ---


def plot_runs(out: str, seeds: int = 8):
    """Distinct cells against env steps on the quick preset, `seeds` seeds each: the CTS
    pseudo-count bonus, its prediction-gain variant, and the same PPO with beta = 0."""
    import matplotlib.pyplot as plt

    from common import plot

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for color, label, over in (
        ("C0", "CTS pseudo-count", {}),
        ("C2", "CTS, PG count", {"count": "pg"}),
        ("C1", "PPO (beta = 0)", {"beta": 0.0}),
    ):
        c = Config(**{**PRESETS["quick"], **over})
        train = jax.jit(jax.vmap(run.make_train(init, update, c)))
        _, metrics = train(jax.random.split(jax.random.PRNGKey(0), seeds))
        cells = np.asarray(metrics["charts/distinct_cells"])  # (seeds, updates)
        steps = np.arange(1, cells.shape[1] + 1) * c.batch_size
        ax.plot(steps, np.median(cells, 0), color=color, label=label)
        ax.fill_between(steps, cells.min(0), cells.max(0), color=color, alpha=0.2)
        print(label, cells[:, -1])
    ax.set(
        xlabel="environment steps",
        ylabel="distinct cells visited",
        title=f"DeepSea-16 as an image, {seeds} seeds (median, min-max)",
    )
    ax.title.set_fontsize(10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return plot.save_png(fig, out)


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
        summary_keys=[
            "distinct_cells",
            "charts/episodic_return",
            "charts/intrinsic_reward",
            "charts/pseudo_count",
        ],
    )


if __name__ == "__main__":
    main()
