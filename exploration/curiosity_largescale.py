"""Large-scale curiosity: PPO on the forward-dynamics error in a feature space, and nothing else.

[1] Y. Burda, H. Edwards, D. Pathak, A. Storkey, T. Darrell, A. A. Efros. "Large-Scale Study
    of Curiosity-Driven Learning." ICLR 2019, arXiv:1808.04355. Reference code:
    openai/large-scale-curiosity (TensorFlow; run.py, dynamics.py, auxiliary_tasks.py,
    cppo_agent.py, read at its newest commit).

The agent never sees the game's reward. An embedding phi maps an observation to features, a
forward model f predicts phi(s_{t+1}) from phi(s_t) and a_t, and its error is the reward:

    r_t = || f(phi(s_t), a_t) - phi(s_{t+1}) ||^2                          [1] Sec. 2, Eq. 1
    f is trained on the same error with phi held fixed (stop-gradient: the features are
    not pulled together by f's loss; the released code, issue #3)
    phi, one of four feature spaces ([1] Sec. 2.1, `--features`):
      pixels  phi(x) = x (the whitened observation)
      rf      a fixed, randomly initialised conv net (never trained)
      vae     the mean of q(z|x) of a VAE trained jointly: max E_q[log p(x|z)] - KL(q || N(0,I))
      idf     inverse-dynamics features: phi trained by -log p(a_t | phi(s_t), phi(s_{t+1}))
    r_t <- r_t / std(R_t),  R_t = gamma R_{t-1} + r_t, a running estimate ([1] Sec. 2.2)
    observations whitened by a random agent's per-pixel mean and one scalar std ([1] Sec. 2.2)
    no episode ends: GAE bootstraps through `done` ("infinite horizon", [1] Sec. 2.3)
    PPO: 128 envs x 128 steps, gamma 0.99, lambda 0.95, lr 1e-4, 3 epochs, 8 minibatches,
    entropy 0.001, clip 0.1; one Adam step on L_PPO + L_f + L_phi ([1] App. A, run.py)

Reproduce (CPU demo; one compiled program per feature space, intrinsic reward only):
    python exploration/curiosity_largescale.py --preset quick --num-seeds 4 --features rf
    python exploration/curiosity_largescale.py --preset quick --num-seeds 4 --int-coef 0
    python exploration/curiosity_largescale.py --plot exploration/curiosity_largescale.png
Measured (`--plot`: the quick preset, DeepSea-16 as a 16x16 image, 153 reachable cells,
16,384 steps, 4 seeds per arm, distinct cells at the end, median; 2-core CPU, loaded, 192 s
CPU for the five programs): rf 147 (143-151), pixels 145.5 (140-148), idf 143.5 (138-148),
vae 142.5 (141-147), PPO with no reward 135.5 (135-143). The treasure (never trained on)
was found by 2 rf seeds (3 episodes) and 1 idf seed (2 episodes), by no other arm.
Paper setting (GPU; Atari through envpool, 84x84 grey, 4 frames, 128 envs, 1e8 steps):
    python exploration/curiosity_largescale.py --preset paper --features rf
[1] Fig. 2: with no extrinsic reward, the 54 Atari games' extrinsic return grows during
training for most games; random features and IDF do best, pixels worst (curves only).

Differences from the paper:
- The CPU preset runs on bsuite DeepSea (an N x N binary image, one frame: it is Markov),
  so the torso of phi and of the policy is an MLP on the flattened image; Atari uses the
  released conv torso (32-8/4, 64-4/2, 64-3/1, leaky ReLU, linear 512). No batch norm in
  phi ([1] Sec. 2.2 mentions it for RF; the released code leaves it off by default).
- The error is averaged over the features (the released code's reduce_mean); Eq. 1 sums.
  The normaliser divides the scale out either way.
- Pixels: the forward model is the same residual MLP with a |x|-wide output, not the
  released code's U-Net; the VAE decoder is an MLP (Gaussian, softplus scale) instead of
  its deconvolution stack.
- The reward normaliser divides by sqrt(var + 1e-8) (the code: no epsilon), so a run with
  no reward at all (`--int-coef 0`, the baseline) stays finite.
- Atari: envpool's preprocessing (max-pool, frame skip 4, 30 no-ops, 4 frames, 84x84),
  4,500-step episodes (the code's ExtraTimeLimit), no sticky actions.
- The observation statistics come from `obs_norm_steps` random steps over all envs (the
  code: 10,000 steps of one env).
"""

import math
from dataclasses import dataclass
from typing import Any

import distrax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from common import envs, run
from common.nets import MLP, orthogonal
from common.rl import RunningMeanStd, episode_metrics, gae, minibatch_epochs, ppo_loss, rollout

FEATURES = ("pixels", "rf", "vae", "idf")

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """Curiosity-only PPO; defaults are [1] App. A and the released run.py."""

    env_id: str = "Breakout-v5"
    """environment id (envpool Atari, or gymnax DeepSea-bsuite-<N>: an N x N image)"""
    features: str = "rf"
    """feature space phi: pixels, rf (random features), vae or idf (inverse dynamics)"""
    total_timesteps: int = 100_000_000
    """environment steps (run.py's num_timesteps)"""
    num_envs: int = 128
    """parallel environments"""
    num_steps: int = 128
    """rollout length"""
    lr: float = 1e-4
    """Adam learning rate (constant)"""
    num_epochs: int = 3
    """PPO optimisation epochs per rollout"""
    num_minibatches: int = 8
    """PPO minibatches per epoch"""
    gamma: float = 0.99
    """discount (also of the return whose std normalises the reward)"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    clip_coef: float = 0.1
    """PPO ratio clip epsilon"""
    ent_coef: float = 0.001
    """entropy bonus coefficient"""
    vf_coef: float = 1.0
    """value loss coefficient (times 1/2 mean squared error)"""
    ext_coef: float = 0.0
    """weight of the clipped game reward (0: curiosity only, [1]'s setting)"""
    int_coef: float = 1.0
    """weight of the curiosity reward (0: PPO with no reward at all, the baseline)"""
    use_done: bool = False
    """let episode ends cut the bootstrap ([1]: off, the infinite-horizon setting)"""
    feature_dim: int = 512
    """size of phi (not pixels)"""
    hidden: int = 512
    """units of the policy's, inverse model's and forward model's hidden layers"""
    forward_blocks: int = 4
    """residual blocks of the forward model (each two dense layers, a_t fed to each)"""
    mlp_hidden: tuple[int, ...] = (64,)
    """non-Atari images: hidden sizes of the MLP torso of phi and of the policy"""
    obs_norm_steps: int = 10_000
    """random-agent steps (all envs together) behind the observation statistics"""
    frame_stack: int = 4
    """Atari only: frames stacked in an observation"""
    frame_size: int = 84
    """Atari only: side of the grey frame"""
    max_episode_steps: int = 4_500
    """Atari only: episode cap in agent steps (run.py's max-episode-steps)"""
    coverage_grid: int = 32
    """side of the grid on which distinct visited cells are counted (DeepSea)"""

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
        if self.features not in FEATURES:
            raise ValueError(f"features={self.features!r} must be one of {', '.join(FEATURES)}")
        if self.num_updates < 1:
            raise ValueError(f"total_timesteps={self.total_timesteps} is less than one rollout "
                             f"(num_envs * num_steps = {self.batch_size})")
        if self.batch_size % self.num_minibatches:
            raise ValueError(f"num_envs * num_steps = {self.batch_size} is not divisible by "
                             f"num_minibatches={self.num_minibatches}")
        for name in ("num_envs", "num_steps", "num_epochs", "num_minibatches", "feature_dim",
                     "hidden", "obs_norm_steps", "frame_stack", "frame_size",
                     "max_episode_steps", "coverage_grid"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.forward_blocks < 0 or min(self.mlp_hidden, default=1) < 1:
            raise ValueError("forward_blocks must be >= 0 and mlp_hidden sizes >= 1")
        for name in ("lr", "clip_coef"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("gamma", "gae_lambda"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1]")
        for name in ("ent_coef", "vf_coef", "ext_coef", "int_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if not self.is_atari:
            envs.check_id(self.env_id)


PRESETS = {
    # CPU demo: bsuite DeepSea N = 16 as a 16 x 16 image; a random walk hugs the left edge,
    # the treasure is at the bottom right; coverage of the 153 reachable cells is the measure.
    "quick": dict(env_id="DeepSea-bsuite-16", total_timesteps=16_384, num_envs=16,
                  num_steps=32, lr=1e-3, num_epochs=3, num_minibatches=4, ent_coef=0.01,
                  feature_dim=32, hidden=64, forward_blocks=1, mlp_hidden=(64,),
                  obs_norm_steps=512),
    "paper": dict(),
}


# --- ENVIRONMENT ---


def make_env(cfg: Config):
    if cfg.is_atari:  # run.py: NoopReset(30), MaxAndSkip(4), 84x84 grey, FrameStack(4)
        env = envs.make(cfg.env_id, cfg.num_envs, img_height=cfg.frame_size,
                        img_width=cfg.frame_size, stack_num=cfg.frame_stack, noop_max=30,
                        repeat_action_probability=0.0, max_episode_steps=cfg.max_episode_steps,
                        episodic_life=False, reward_clip=False)
    else:
        env = envs.make(cfg.env_id, cfg.num_envs)
    return envs.Coverage(env, cfg.coverage_grid, rooms=cfg.env_id.startswith("Montezuma"))


# --- NETWORKS ---


class Torso(nn.Module):
    """The released small_convnet on Atari frames (..., C, H, W) (leaky ReLU, linear `out`);
    an MLP of `mlp_hidden` then a linear `out` on any other (flattened) image."""

    out: int
    atari: bool
    mlp_hidden: tuple[int, ...]
    obs_ndim: int

    @nn.compact
    def __call__(self, x):
        if self.atari:
            x = jnp.moveaxis(x, -3, -1)
            for ch, k, s in ((32, 8, 4), (64, 4, 2), (64, 3, 1)):
                x = nn.leaky_relu(nn.Conv(ch, (k, k), (s, s), padding="VALID")(x))
            x = x.reshape(*x.shape[:-3], -1)
        else:
            x = MLP(self.mlp_hidden, activation=nn.leaky_relu)(
                x.reshape(*x.shape[:x.ndim - self.obs_ndim], -1))
        return nn.Dense(self.out)(x)


class Policy(nn.Module):
    """cnn_policy.py: its own torso to 512 features, two ReLU dense `hidden`, two heads."""

    num_actions: int
    torso: Torso
    hidden: int

    @nn.compact
    def __call__(self, obs):
        x = nn.relu(nn.Dense(self.hidden, kernel_init=orthogonal())(self.torso(obs)))
        x = nn.relu(nn.Dense(self.hidden, kernel_init=orthogonal())(x))
        logits = nn.Dense(self.num_actions, kernel_init=orthogonal(0.01))(x)
        return distrax.Categorical(logits=logits), nn.Dense(1)(x)[..., 0]


class Curiosity(nn.Module):
    """phi (per `features`), the inverse model (idf), the VAE decoder (vae) and the forward
    model f of dynamics.py: dense `hidden` leaky ReLU on [phi, a], `blocks` residual blocks
    x + W2 [W1 [x, a] leaky ReLU, a], a linear output to |phi|; a = one-hot action."""

    features: str
    num_actions: int
    torso: Torso
    obs_dim: int
    width: int  # |phi|
    hidden: int
    blocks: int

    def setup(self):
        if self.features == "idf":
            self.inv = nn.Sequential([nn.Dense(self.hidden), nn.relu,
                                      nn.Dense(self.num_actions)])
        if self.features == "vae":
            self.dec = nn.Sequential([nn.Dense(self.hidden), nn.leaky_relu,
                                      nn.Dense(2 * self.obs_dim)])
        self.f_in = nn.Dense(self.hidden)
        self.f_res = [(nn.Dense(self.hidden), nn.Dense(self.hidden)) for _ in range(self.blocks)]
        self.f_out = nn.Dense(self.width)

    def posterior(self, x):
        """vae: q(z|x) = N(mean, softplus(s)) from the encoder's 2|phi| outputs."""
        mean, s = jnp.split(self.torso(x), 2, -1)
        return mean, jax.nn.softplus(s)

    def embed(self, x):
        """phi(x) of a whitened observation x."""
        if self.features == "pixels":
            return x.reshape(*x.shape[:x.ndim - self.torso.obs_ndim], -1)
        if self.features == "vae":
            return self.posterior(x)[0]  # the mean only goes to the dynamics
        return self.torso(x)

    def inverse(self, phi, phi_next):  # idf: logits of p(a | phi(s), phi(s'))
        return self.inv(jnp.concatenate([phi, phi_next], -1))

    def decode(self, z):  # vae: p(x|z) = N(mean, softplus(s)) over the flattened pixels
        mean, s = jnp.split(self.dec(z), 2, -1)
        return mean, jax.nn.softplus(s)

    def forward(self, phi, action):  # f(phi(s), a)
        a = jax.nn.one_hot(action, self.num_actions)
        x = nn.leaky_relu(self.f_in(jnp.concatenate([phi, a], -1)))
        for d1, d2 in self.f_res:
            x = x + d2(jnp.concatenate([nn.leaky_relu(d1(jnp.concatenate([x, a], -1))), a], -1))
        return self.f_out(jnp.concatenate([x, a], -1))

    def __call__(self, x, action):  # for init: touches every layer
        phi = self.embed(x)
        out = [self.forward(phi, action)]
        if self.features == "idf":
            out.append(self.inverse(phi, phi))
        if self.features == "vae":
            out.append(self.decode(phi))
        return out


def networks(cfg: Config, env):
    obs_dim = math.prod(env.observation_shape)
    kw = dict(atari=cfg.is_atari, mlp_hidden=cfg.mlp_hidden, obs_ndim=len(env.observation_shape))
    policy = Policy(env.num_actions, Torso(cfg.feature_dim, **kw), cfg.hidden)
    width = obs_dim if cfg.features == "pixels" else cfg.feature_dim
    enc_out = 2 * cfg.feature_dim if cfg.features == "vae" else cfg.feature_dim
    cur = Curiosity(cfg.features, env.num_actions, Torso(enc_out, **kw), obs_dim, width,
                    cfg.hidden, cfg.forward_blocks)
    return policy, cur


# --- LOSSES ---


def whiten(obs, ob_mean, ob_std):
    """[1] Sec. 2.2: (x - per-pixel mean) / one scalar std, both from a random agent."""
    return (obs.astype(jnp.float32) - ob_mean) / ob_std


def forward_error(phi_hat, phi_next):
    """[1] Eq. 1 per sample: the squared error of f, averaged over features (dynamics.py)."""
    return ((phi_hat - phi_next) ** 2).mean(-1)


def intrinsic_reward(params, cur: Curiosity, x, x_next, action):
    """[1] Eq. 1: r_t = error of f(phi(s_t), a_t) against phi(s_{t+1}) on whitened obs."""
    phi = cur.apply(params, x, method=Curiosity.embed)
    phi_next = cur.apply(params, x_next, method=Curiosity.embed)
    return forward_error(cur.apply(params, phi, action, method=Curiosity.forward), phi_next)


def inverse_loss(logits, action):
    """IDF ([1] Sec. 2.1): -log p(a_t | phi(s_t), phi(s_{t+1})) per sample."""
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), action[..., None], -1)[..., 0]


def negative_elbo(mean, scale, rec_mean, rec_scale, x):
    """VAE ([1] Sec. 2.1, auxiliary_tasks.py): KL(N(mean, scale) || N(0, I)) summed over z
    minus log N(x | rec_mean, rec_scale) summed over pixels, per sample."""
    kl = (0.5 * (mean**2 + scale**2 - 1.0) - jnp.log(scale)).sum(-1)
    log_lik = distrax.Normal(rec_mean, rec_scale).log_prob(x).sum(-1)
    return kl - log_lik


def curiosity_loss(params, cur: Curiosity, x, x_next, action, x_noisy, key):
    """L_f + L_phi on a minibatch of whitened observations. L_f: f's error with phi(s_t) and
    phi(s_{t+1}) held fixed (stop_gradient: f does not move the features, issue #3). L_phi:
    0 for pixels and rf (rf's phi never gets a gradient), the inverse loss for idf, the
    negative ELBO on `x_noisy` (dequantised by U(0, 1) before whitening) for vae."""
    phi = cur.apply(params, x, method=Curiosity.embed)
    phi_next = cur.apply(params, x_next, method=Curiosity.embed)
    phi_hat = cur.apply(params, jax.lax.stop_gradient(phi), action, method=Curiosity.forward)
    l_f = forward_error(phi_hat, jax.lax.stop_gradient(phi_next)).mean()
    if cur.features == "idf":
        l_phi = inverse_loss(cur.apply(params, phi, phi_next, method=Curiosity.inverse),
                             action).mean()
    elif cur.features == "vae":
        mean, scale = cur.apply(params, x, method=Curiosity.posterior)
        z = mean + scale * jax.random.normal(key, mean.shape)
        rec_mean, rec_scale = cur.apply(params, z, method=Curiosity.decode)
        l_phi = negative_elbo(mean, scale, rec_mean, rec_scale,
                              x_noisy.reshape(*x_noisy.shape[:mean.ndim - 1], -1)).mean()
    else:
        l_phi = jnp.zeros(())
    return l_f, l_phi


def forward_filter(rewems, r, gamma):
    """The running discounted return R_t = gamma R_{t-1} + r_t per env, never reset."""
    def step(ret, x):
        ret = ret * gamma + x
        return ret, ret

    return jax.lax.scan(step, rewems, r)  # (N,), (T, N)


def normalize_reward(r, rewems, rms: RunningMeanStd, *, gamma):
    """[1] Sec. 2.2 (cppo_agent.py): fold the rollout's T*N returns R_t into the running
    moments, then divide every r_t [T, N] by sqrt(var(R) + 1e-8) (no mean subtracted).
    Returns (r / std, rewems, rms)."""
    rewems, returns = forward_filter(rewems, r, gamma)
    rms = rms.update(returns)
    return r / jnp.sqrt(rms.var + 1e-8), rewems, rms


# --- STATE ---


@struct.dataclass
class State:
    params: Any  # {"policy": ..., "curiosity": ...}
    opt_state: Any
    env_state: Any
    obs: jax.Array
    ob_mean: jax.Array  # per-pixel mean of a random agent's observations
    ob_std: jax.Array  # scalar: the mean over pixels of their std
    rew_rms: RunningMeanStd  # moments of the running discounted return
    rewems: jax.Array  # (N,) running discounted return
    key: jax.Array
    int_coef: jax.Array  # cfg.int_coef, traced: one program runs curiosity and no-reward seeds


def init(key, cfg: Config) -> State:
    env = make_env(cfg)
    policy, cur = networks(cfg, env)
    k_pol, k_cur, k_env, k_warm, key = jax.random.split(key, 5)
    obs, env_state = env.reset(k_env)

    def warm(carry, k):  # [1] Sec. 2.2: a random agent's observations
        env_state, obs_rms = carry
        k_a, k_s = jax.random.split(k)
        a = jax.random.randint(k_a, (cfg.num_envs,), 0, env.num_actions)
        o, env_state, _, _, _ = env.step(env_state, a, k_s)
        return (env_state, obs_rms.update(o)), None

    n_warm = max(1, cfg.obs_norm_steps // cfg.num_envs)
    (env_state, obs_rms), _ = jax.lax.scan(
        warm, (env_state, RunningMeanStd.create(env.observation_shape).update(obs)),
        jax.random.split(k_warm, n_warm))
    ob_mean, ob_std = obs_rms.mean, jnp.sqrt(obs_rms.var).mean()
    obs, env_state = env.reset(k_env)  # start afresh: the warm-up is not exploration
    x = whiten(obs, ob_mean, ob_std)
    params = {"policy": policy.init(k_pol, obs),
              "curiosity": cur.init(k_cur, x, jnp.zeros(cfg.num_envs, jnp.int32))}
    return State(params, optax.adam(cfg.lr).init(params), env_state, obs, ob_mean, ob_std,
                 RunningMeanStd.create(), jnp.zeros(cfg.num_envs), key,
                 jnp.asarray(cfg.int_coef, jnp.float32))


# --- UPDATE ---


def update(state: State, cfg: Config):
    env = make_env(cfg)
    policy, cur = networks(cfg, env)

    def white(o):
        return whiten(o, state.ob_mean, state.ob_std)

    def act(obs, key):
        pi, value = policy.apply(state.params["policy"], white(obs))
        action = pi.sample(seed=key)
        return action, dict(logp=pi.log_prob(action), value=value)

    (env_state, obs, key), traj = rollout(env, act, state.env_state, state.obs, state.key,
                                          cfg.num_steps, keep_next_obs=True)  # (T, N, ...)

    # --- REWARD: curiosity only (ext_coef 0), normalised by the return's std ---
    r_int = intrinsic_reward(state.params["curiosity"], cur, white(traj["obs"]),
                             white(traj["next_obs"]), traj["action"])  # (T, N)
    r = cfg.ext_coef * jnp.clip(traj["reward"], -1, 1) + state.int_coef * r_int
    r, rewems, rew_rms = normalize_reward(r, state.rewems, state.rew_rms, gamma=cfg.gamma)
    _, last_value = policy.apply(state.params["policy"], white(obs))
    dones = traj["done"] if cfg.use_done else jnp.zeros_like(traj["done"])  # [1] Sec. 2.3
    adv, ret = gae(r, traj["value"], dones, last_value, cfg.gamma, cfg.gae_lambda)
    adv = (adv - adv.mean()) / (adv.std() + 1e-7)  # norm_adv over the whole rollout

    key, k_noise, k_epochs = jax.random.split(key, 3)
    noise = jax.random.uniform(k_noise, traj["obs"].shape)  # vae: dequantisation
    batch = dict(x=white(traj["obs"]), x_next=white(traj["next_obs"]),
                 x_noisy=white(traj["obs"] + noise), obs=traj["obs"], action=traj["action"],
                 logp=traj["logp"], value=traj["value"], adv=adv, ret=ret)
    batch = jax.tree.map(lambda v: v.reshape(-1, *v.shape[2:]), batch)  # (T*N, ...)

    def loss_fn(params, mb, k):
        pi, value = policy.apply(params["policy"], mb["x"])
        loss, m = ppo_loss(pi.log_prob(mb["action"]), mb["logp"], mb["adv"], pi.entropy(),
                           value, mb["value"], mb["ret"], cfg.clip_coef, cfg.vf_coef,
                           cfg.ent_coef)
        l_f, l_phi = curiosity_loss(params["curiosity"], cur, mb["x"], mb["x_next"],
                                    mb["action"], mb["x_noisy"], k)
        return loss + l_f + l_phi, {**m, "losses/forward": l_f, "losses/features": l_phi}

    params, opt_state, metrics = minibatch_epochs(
        k_epochs, state.params, state.opt_state, batch, loss_fn, optax.adam(cfg.lr),
        cfg.num_epochs, cfg.num_minibatches, loss_takes_key=True)
    metrics.update(episode_metrics(traj))  # the game's return: measured, never trained on
    metrics["charts/intrinsic_reward"] = r_int.mean()
    metrics["charts/distinct_cells"] = env_state.visited.sum()
    metrics["charts/positive_episodes"] = env_state.positives
    new = State(params, opt_state, env_state, obs, state.ob_mean, state.ob_std, rew_rms,
                rewems, key, state.int_coef)
    return new, metrics


def evaluate(state: State, cfg: Config):
    """Coverage at the end: distinct cells (DeepSea) or rooms (Montezuma) visited, and the
    episodes that found a positive game reward (never trained on)."""
    return {"distinct_cells": state.env_state.visited.sum(),
            "positive_episodes": state.env_state.positives}


# --- MAIN ---


def plot_runs(out: str, seeds: int = 4):
    """[1] Fig. 2 in small: distinct cells against env steps on the quick preset for each
    feature space and for PPO with no reward (rf with int_coef 0), `seeds` seeds each."""
    import matplotlib.pyplot as plt
    import numpy as np

    from common import plot

    keys = jax.random.split(jax.random.PRNGKey(0), seeds)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    arms = [(f, 1.0) for f in FEATURES] + [("rf", 0.0)]
    for i, (feat, coef) in enumerate(arms):
        c = Config(**{**PRESETS["quick"], "features": feat, "int_coef": coef})

        def train(key, c=c):
            return jax.lax.scan(lambda s, _: update(s, c), init(key, c), None, c.num_updates)[1]

        m = jax.device_get(jax.jit(jax.vmap(train))(keys))
        cells, pos = np.asarray(m["charts/distinct_cells"]), m["charts/positive_episodes"]
        steps = np.arange(1, cells.shape[1] + 1) * c.batch_size
        label = feat if coef else "no reward (PPO)"
        ax.plot(steps, np.median(cells, 0), color=f"C{i}", label=label)
        ax.fill_between(steps, cells.min(0), cells.max(0), color=f"C{i}", alpha=0.15)
        print(f"{label:16s} cells {cells[:, -1]} median {np.median(cells[:, -1])}  "
              f"treasure episodes {np.asarray(pos)[:, -1]}", flush=True)
    ax.set(xlabel="environment steps", ylabel="distinct cells visited",
           title=f"DeepSea-16 image, curiosity only, {seeds} seeds (median, min-max)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return plot.save_png(fig, out)


def main(argv=None):
    flags, argv = run.pop_flags(argv, "--plot")
    if flags["--plot"]:
        return plot_runs(flags["--plot"])
    return run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                    doc=__doc__, summary_keys=["distinct_cells", "positive_episodes",
                                               "charts/intrinsic_reward", "losses/forward",
                                               "losses/features"])


if __name__ == "__main__":
    main()
