"""PPO + Random Network Distillation (RND).

[1] Y. Burda, H. Edwards, A. Storkey, O. Klimov. "Exploration by Random Network
    Distillation." ICLR 2019, arXiv:1810.12894. Reference code: openai/random-network-distillation.

A fixed, randomly initialised target network f maps an observation to an embedding; a
predictor f_hat is trained to match it on the states the agent visits. Its error is large
on novel states and shrinks on familiar ones, so it is an exploration bonus:

    r^i_t = || f_hat(s_{t+1}; theta) - f(s_{t+1}) ||^2                        [1] Sec. 2.2
    s is whitened by running observation statistics and clipped to [-5, 5]     [1] Sec. 2.4
    r^i_t <- r^i_t / std(R^i),  R^i the running discounted intrinsic return    [1] Sec. 2.4
    V = V_E + V_I: two value heads; the intrinsic stream is non-episodic       [1] Sec. 2.3
    A = c_E A_E + c_I A_I with c_E = 2, c_I = 1, gamma_E = 0.999, gamma_I = 0.99 [1] Sec. 3.3

The predictor minimises the same squared error on a random 25% of each minibatch, a fresh
draw for every minibatch as in the released code ([1] App. A.2 "proportion of experience
used for training predictor").

Reproduce (CPU demo, about 2 minutes on 2 cores; RND vs the same PPO without the bonus):
    python exploration/rnd.py --preset quick --num-seeds 4
    python exploration/rnd.py --preset quick --num-seeds 4 --int-coef 0
Paper setting (GPU; Montezuma's Revenge through envpool, 128 envs, 30K rollouts):
    python exploration/rnd.py --preset paper
[1] Table 1 / Fig. 7: mean episodic return 8152 on Montezuma's Revenge (3 seeds,
1.97B frames); "consistently finds more than half of the rooms".

Differences from the paper:
- The CPU preset runs on a navix DoorKey maze with symbolic (vector) observations, so the
  policy and RND networks are MLPs; the paper's convolutional networks are used for pixels.
- The policy CNN follows [1]'s released code in shape (conv 32-8/4, 64-4/2, 64-4/1, dense
  256, dense 448, a residual dense 448 per head) and its orthogonal gains (sqrt 2 in the
  torso, 0.1 in the residual layers, 0.01 in the heads).
- One Adam optimiser updates policy and predictor together, as in [1]'s released code. That
  code computes a global-norm clip at 1.0 and then applies the unclipped gradients, so in
  effect it does not clip: `max_grad_norm` 0 (no clip) is the default here; the `quick`
  preset clips at 0.5 (CleanRL's port).
- Advantages are not normalised by default (`norm_adv`), as in [1]'s released code; the
  `quick` preset normalises them per minibatch (CleanRL's port).
- Frames: envpool's Atari preprocessing (84x84 grey, max-pool over 2 frames, frame skip 4,
  stack 4, sticky actions 0.25); the RND networks see the last frame only, as in [1].
- The intrinsic reward of the step that ends an episode uses the auto-reset observation
  (the first of the next episode), as every auto-resetting vectorised implementation does.
- The reward is the squared error summed over features (as in [1]); the predictor's loss
  averages it over features (a constant factor, as in the released code and CleanRL).
- The observation statistics start from num_steps x 50 = 6,400 random-agent steps per env
  (the released code and CleanRL), updated one step at a time rather than in blocks of 128
  (the same moments).
- The `quick` CPU preset departs from Table 5 to fit a 2-core CPU: 32 envs x 32 steps,
  200k steps, lr 1e-3, entropy 0.01, RND output 32, 200-step episodes, no reward clip,
  50 warm-up steps, advantages normalised per minibatch and a gradient clip of 0.5.
"""

from dataclasses import dataclass
from typing import Any

import distrax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from common import envs, run
from common.nets import MLP, NatureCNN, orthogonal
from common.rl import RunningMeanStd, episode_metrics, gae, minibatch_epochs, ppo_loss, rollout

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """PPO + RND; defaults are [1] Table 5 (Montezuma's Revenge)."""

    env_id: str = "MontezumaRevenge-v5"
    """environment id (envpool Atari, navix, gymnax or the repo's own envs)"""
    total_timesteps: int = 491_520_000
    """environment steps (30K rollouts x 128 steps x 128 envs = 1.97B frames)"""
    num_envs: int = 128
    """parallel environments"""
    num_steps: int = 128
    """rollout length"""
    lr: float = 1e-4
    """Adam learning rate (constant)"""
    num_epochs: int = 4
    """optimisation epochs per rollout"""
    num_minibatches: int = 4
    """minibatches per epoch"""
    gamma_ext: float = 0.999
    """extrinsic discount gamma_E"""
    gamma_int: float = 0.99
    """intrinsic discount gamma_I"""
    gae_lambda: float = 0.95
    """GAE lambda for both streams"""
    ext_coef: float = 2.0
    """extrinsic advantage coefficient c_E"""
    int_coef: float = 1.0
    """intrinsic advantage coefficient c_I (0: no bonus; V_I and the predictor still train)"""
    clip_coef: float = 0.1
    """PPO ratio clip epsilon"""
    ent_coef: float = 0.001
    """entropy bonus coefficient"""
    vf_coef: float = 1.0
    """value loss coefficient (sum of both heads' losses)"""
    max_grad_norm: float = 0.0
    """global gradient-norm clip (0: none, as [1]'s released code in effect)"""
    norm_adv: bool = False
    """normalise advantages per minibatch (CleanRL; [1]'s released code does not)"""
    update_proportion: float = 0.25
    """fraction of each batch the predictor trains on"""
    obs_norm_init_steps: int = 6_400
    """random-agent steps (per env) that initialise the observation statistics (num_steps x 50)"""
    obs_clip: float = 5.0
    """clip of the whitened observation fed to the RND networks"""
    clip_ext_reward: bool = True
    """clip extrinsic rewards to [-1, 1] ([1] Table 5)"""
    sticky_action_prob: float = 0.25
    """Atari only: repeat the previous action with this probability"""
    max_episode_frames: int = 18_000
    """Atari only: episode cap in frames (4 per step)"""
    max_episode_steps: int = 1_000
    """navix mazes only: episode cap in steps"""
    hidden: tuple[int, ...] = (64, 64)
    """vector observations: hidden sizes of the policy MLP"""
    rnd_hidden: tuple[int, ...] = (64, 64)
    """vector observations: hidden sizes of the target and predictor MLPs"""
    rnd_features: int = 512
    """output size of the target and predictor networks"""
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
            raise ValueError(f"total_timesteps={self.total_timesteps} is less than one rollout "
                             f"(num_envs * num_steps = {self.batch_size})")
        if self.batch_size % self.num_minibatches:
            raise ValueError(f"num_envs * num_steps = {self.batch_size} is not divisible by "
                             f"num_minibatches={self.num_minibatches}")
        if not 0 < self.update_proportion <= 1:
            raise ValueError(f"update_proportion={self.update_proportion} must be in (0, 1]")
        if self.int_coef < 0 or self.ext_coef < 0:
            raise ValueError("ext_coef and int_coef must be >= 0")


PRESETS = {
    # CPU demo: a navix DoorKey maze, sparse reward (open the door with the key, reach goal).
    "quick": dict(env_id="Navix-DoorKey-16x16-v0", total_timesteps=200_000, num_envs=32,
                  num_steps=32, lr=1e-3, ent_coef=0.01, rnd_features=32, clip_ext_reward=False,
                  max_episode_steps=200, obs_norm_init_steps=50, norm_adv=True, max_grad_norm=0.5),
    "paper": dict(),
}


def make_env(cfg: Config):
    """The batched env, wrapped to count the distinct cells (rooms) it visits."""
    if cfg.is_atari:
        env = envs.make(cfg.env_id, cfg.num_envs, repeat_action_probability=cfg.sticky_action_prob,
                        max_episode_steps=cfg.max_episode_frames // 4, episodic_life=False,
                        reward_clip=False)
    elif cfg.env_id.startswith("Navix-"):
        env = envs.make(cfg.env_id, cfg.num_envs, max_steps=cfg.max_episode_steps)
    else:
        env = envs.make(cfg.env_id, cfg.num_envs)
    return envs.Coverage(env, cfg.coverage_grid, rooms=cfg.is_atari)


def make_optimizer(cfg: Config):
    """One Adam for policy and predictor; a global-norm clip only when max_grad_norm > 0."""
    adam = optax.adam(cfg.lr)
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adam) \
        if cfg.max_grad_norm > 0 else adam


# --- NETWORKS ---


def _hwc(obs):
    """envpool frames come channel-first (..., 4, 84, 84); convs want (..., 84, 84, 4)."""
    return jnp.moveaxis(obs, -3, -1)


class Policy(nn.Module):
    """Actor with two critic heads V_E and V_I ([1] Sec. 2.3)."""

    num_actions: int
    pixels: bool
    hidden: tuple[int, ...] = (64, 64)
    obs_shape: tuple[int, ...] = ()

    @nn.compact
    def __call__(self, obs):
        if self.pixels:
            x = NatureCNN(features=256, layers=((32, 8, 4), (64, 4, 2), (64, 4, 1)))(_hwc(obs))
            x = nn.relu(nn.Dense(448, kernel_init=orthogonal())(x))
            a = x + nn.relu(nn.Dense(448, kernel_init=orthogonal(0.1))(x))
            c = x + nn.relu(nn.Dense(448, kernel_init=orthogonal(0.1))(x))
        else:
            x = obs.reshape(*obs.shape[:-len(self.obs_shape)], -1) if self.obs_shape else obs
            a, c = MLP(self.hidden)(x), MLP(self.hidden)(x)
        logits = nn.Dense(self.num_actions, kernel_init=orthogonal(0.01))(a)
        v_ext = nn.Dense(1, kernel_init=orthogonal(0.01))(c)[..., 0]
        v_int = nn.Dense(1, kernel_init=orthogonal(0.01))(c)[..., 0]
        return logits, v_ext, v_int


class RNDNet(nn.Module):
    """Target (`predictor=False`) or predictor network of [1] App. A.4.

    Pixels: conv 32-8/4, 64-4/2, 64-3/1 with leaky ReLU, then a linear 512 (target) or
    ReLU 512, ReLU 512, linear 512 (predictor). Vectors: an MLP of `hidden` then the same
    head structure.
    """

    predictor: bool
    pixels: bool
    hidden: tuple[int, ...]
    features: int
    obs_ndim: int = 1

    @nn.compact
    def __call__(self, x):
        if self.pixels:
            x = x[..., -1:, :, :]  # last frame only: (..., 1, 84, 84)
            x = _hwc(x)
            for ch, k, s in ((32, 8, 4), (64, 4, 2), (64, 3, 1)):
                x = nn.leaky_relu(nn.Conv(ch, (k, k), (s, s), padding="VALID",
                                          kernel_init=orthogonal())(x))
            x = x.reshape(*x.shape[:-3], -1)  # (..., 7*7*64)
            width = 512
        else:
            x = x.reshape(*x.shape[:-self.obs_ndim], -1)
            x = MLP(self.hidden, activation=nn.leaky_relu)(x)
            width = self.hidden[-1]
        if self.predictor:
            x = nn.relu(nn.Dense(width, kernel_init=orthogonal())(x))
            x = nn.relu(nn.Dense(width, kernel_init=orthogonal())(x))
        return nn.Dense(self.features, kernel_init=orthogonal())(x)


def networks(cfg: Config, env):
    pixels = len(env.observation_shape) == 3 and cfg.is_atari
    policy = Policy(env.num_actions, pixels, cfg.hidden, obs_shape=env.observation_shape)
    kw = dict(pixels=pixels, hidden=cfg.rnd_hidden, features=cfg.rnd_features,
              obs_ndim=len(env.observation_shape))
    return policy, RNDNet(predictor=False, **kw), RNDNet(predictor=True, **kw)


# --- LOSS ---


def prediction_error(target_params, pred_params, target, predictor, obs_norm, next_obs, clip):
    """f_hat(s') - f(s') [..., F] on the whitened, clipped next observation ([1] Sec. 2.4).
    Gradients reach the predictor's params only (the target's are not trained)."""
    x = obs_norm.normalize(next_obs.astype(jnp.float32), clip)
    return predictor.apply(pred_params, x) - target.apply(target_params, x)


def intrinsic_reward(target_params, pred_params, target, predictor, obs_norm, next_obs, clip):
    """[1] Sec. 2.2: r^i = ||f_hat(s') - f(s')||^2 on the whitened, clipped next observation."""
    err = prediction_error(target_params, pred_params, target, predictor, obs_norm, next_obs,
                           clip)
    return jnp.sum(err**2, axis=-1)


def forward_filter(rewems, r_int, gamma_int):
    """Running discounted intrinsic return R^i per env (for the reward normaliser)."""
    def step(r, x):
        r = r * gamma_int + x
        return r, r

    return jax.lax.scan(step, rewems, r_int)  # (N,), (T, N)


def normalize_intrinsic(r_int, rewems, rew_norm, *, gamma_int):
    """[1] Sec. 2.4: divide the rollout's r^i [T, N] by the running std of the intrinsic
    RETURN, not of the reward.

    R^i_t = gamma_I R^i_{t-1} + r^i_t per env, carried over from the last rollout in
    `rewems` [N] and across episode ends (the intrinsic stream is non-episodic, so `done` is
    not an argument). All T*N values R^i_t are folded into the running moments `rew_norm`,
    and every r^i_t is divided by the updated std (as in [1]'s released code, no epsilon and
    no mean subtraction). Returns (r_int / std(R^i), rewems, rew_norm).
    """
    rewems, disc_returns = forward_filter(rewems, r_int, gamma_int)
    rew_norm = rew_norm.update(disc_returns)
    return r_int / jnp.sqrt(rew_norm.var), rewems, rew_norm


def advantages(r_ext, r_int, v_ext, v_int, done, last_ext, last_int, *, gamma_ext, gamma_int,
               gae_lambda, ext_coef, int_coef):
    """[1] Sec. 2.3: GAE per stream, then A = c_E A_E + c_I A_I.

    The extrinsic stream is episodic (`done` [T, N] cuts its bootstrap and its GAE trace);
    the intrinsic stream is not (an episode end does not end the exploration "game", so
    V_I of the next episode's first state is bootstrapped through it). Each stream has its
    own discount. Returns (A, returns_ext, returns_int), the returns being the value targets.
    """
    adv_ext, ret_ext = gae(r_ext, v_ext, done, last_ext, gamma_ext, gae_lambda)
    adv_int, ret_int = gae(r_int, v_int, jnp.zeros_like(done), last_int, gamma_int, gae_lambda)
    return ext_coef * adv_ext + int_coef * adv_int, ret_ext, ret_int


def predictor_mask(key, n, *, proportion):
    """[1] App. A.2: the random `proportion` of a batch of n samples the predictor trains on."""
    return jax.random.uniform(key, (n,)) < proportion


def predictor_loss(err, mask):
    """[1] Sec. 2.2 / App. A.2: the predictor's regression loss on the errors
    f_hat(s') - f(s') [B, F] of a minibatch (`prediction_error`).

    Squared error averaged over the F features (the reward sums them; a constant factor, as
    in the released code), then averaged over the samples with `mask` true only (0 when
    none is).
    """
    m = mask.astype(jnp.float32)
    return ((err**2).mean(-1) * m).sum() / jnp.maximum(m.sum(), 1.0)


# --- STATE ---


@struct.dataclass
class State:
    params: Any  # {"policy": ..., "predictor": ...}
    target_params: Any  # fixed random target f
    opt_state: Any
    env_state: Any
    obs: jax.Array
    obs_norm: RunningMeanStd  # whitening statistics of observations (RND input)
    rew_norm: RunningMeanStd  # statistics of the discounted intrinsic return
    rewems: jax.Array  # (N,) running discounted intrinsic return
    key: jax.Array
    int_coef: jax.Array  # cfg.int_coef, traced: one program can run several (0: plain PPO)


def init(key, cfg: Config) -> State:
    env = make_env(cfg)
    policy, target, predictor = networks(cfg, env)
    k_pol, k_tgt, k_pred, k_env, k_warm, key = jax.random.split(key, 6)
    obs, env_state = env.reset(k_env)
    params = {"policy": policy.init(k_pol, obs), "predictor": predictor.init(k_pred, obs)}

    # [1] Sec. 2.4: initialise the observation normaliser with a random agent; training
    # starts from where it stopped (its last observation), with the coverage count at 0.
    def warm(carry, k):
        env_state, _, obs_norm = carry
        k_a, k_s = jax.random.split(k)
        a = jax.random.randint(k_a, (cfg.num_envs,), 0, env.num_actions)
        obs, env_state, _, _, _ = env.step(env_state, a, k_s)
        return (env_state, obs, obs_norm.update(obs)), None

    obs_norm = RunningMeanStd.create(env.observation_shape)
    (env_state, obs, obs_norm), _ = jax.lax.scan(
        warm, (env_state, obs, obs_norm), jax.random.split(k_warm, cfg.obs_norm_init_steps))
    env_state = env.restart(env_state)  # the warm-up steps do not count as exploration
    return State(params, target.init(k_tgt, obs), make_optimizer(cfg).init(params), env_state,
                 obs, obs_norm, RunningMeanStd.create(), jnp.zeros(cfg.num_envs), key,
                 jnp.asarray(cfg.int_coef, jnp.float32))


# --- UPDATE ---


def update(state: State, cfg: Config):
    env = make_env(cfg)
    policy, target, predictor = networks(cfg, env)

    # --- ROLLOUT --- (the shared rollout of common.rl; the policy has two value heads)
    def act(obs, key):
        logits, v_ext, v_int = policy.apply(state.params["policy"], obs)
        pi = distrax.Categorical(logits=logits)
        action = pi.sample(seed=key)
        return action, dict(logp=pi.log_prob(action), v_ext=v_ext, v_int=v_int)

    (env_state, obs, key), traj = rollout(env, act, state.env_state, state.obs, state.key,
                                          cfg.num_steps, keep_next_obs=True)  # (T, N, ...)

    # --- INTRINSIC REWARD ---
    r_int = intrinsic_reward(state.target_params, state.params["predictor"], target, predictor,
                             state.obs_norm, traj["next_obs"], cfg.obs_clip)  # (T, N)
    r_int_n, rewems, rew_norm = normalize_intrinsic(r_int, state.rewems, state.rew_norm,
                                                    gamma_int=cfg.gamma_int)  # [1] Sec. 2.4
    obs_norm = state.obs_norm.update(traj["next_obs"])
    r_ext = jnp.clip(traj["reward"], -1, 1) if cfg.clip_ext_reward else traj["reward"]

    # --- ADVANTAGES ---
    _, last_ext, last_int = policy.apply(state.params["policy"], obs)
    adv, ret_ext, ret_int = advantages(
        r_ext, r_int_n, traj["v_ext"], traj["v_int"], traj["done"], last_ext, last_int,
        gamma_ext=cfg.gamma_ext, gamma_int=cfg.gamma_int, gae_lambda=cfg.gae_lambda,
        ext_coef=cfg.ext_coef, int_coef=state.int_coef)

    # --- UPDATE ---
    batch = dict(obs=traj["obs"], next_obs=traj["next_obs"], action=traj["action"],
                 logp=traj["logp"], v_ext=traj["v_ext"], v_int=traj["v_int"], adv=adv,
                 ret_ext=ret_ext, ret_int=ret_int)
    batch = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), batch)  # (T*N, ...)

    def loss_fn(params, mb, k_mask):
        logits, v_ext, v_int = policy.apply(params["policy"], mb["obs"])
        pi = distrax.Categorical(logits=logits)
        a = mb["adv"]
        if cfg.norm_adv:
            a = (a - a.mean()) / (a.std() + 1e-8)
        # [1] Sec. 2.3: the clipped surrogate, and the two critics' losses summed
        loss, m = ppo_loss(pi.log_prob(mb["action"]), mb["logp"], a, pi.entropy(),
                           (v_ext, v_int), (mb["v_ext"], mb["v_int"]),
                           (mb["ret_ext"], mb["ret_int"]), cfg.clip_coef, cfg.vf_coef,
                           cfg.ent_coef)
        # Predictor regression on a fresh random 25% of this minibatch ([1] App. A.2), with
        # the observation statistics updated by this rollout.
        err = prediction_error(state.target_params, params["predictor"], target, predictor,
                               obs_norm, mb["next_obs"], cfg.obs_clip)
        mask = predictor_mask(k_mask, err.shape[0], proportion=cfg.update_proportion)
        fwd_loss = predictor_loss(err, mask)
        return loss + fwd_loss, {**m, "losses/rnd_forward": fwd_loss}

    key, k_epochs = jax.random.split(key)
    params, opt_state, metrics = minibatch_epochs(
        k_epochs, state.params, state.opt_state, batch, loss_fn, make_optimizer(cfg),
        cfg.num_epochs, cfg.num_minibatches, loss_takes_key=True)

    metrics.update(episode_metrics(traj))  # the mean return is 0 (logged NaN) when none ended
    metrics["charts/intrinsic_reward"] = r_int_n.mean()
    metrics["charts/distinct_cells"] = env_state.visited.sum()
    new = State(params, state.target_params, opt_state, env_state, obs, obs_norm, rew_norm,
                rewems, key, state.int_coef)
    return new, metrics


def evaluate(state: State, cfg: Config):
    """Coverage at the end of training: distinct cells (grid) or rooms (Atari) visited."""
    return {"distinct_cells": state.env_state.visited.sum()}


# --- MAIN ---


def main(argv=None):
    return run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                    doc=__doc__, summary_keys=["distinct_cells", "charts/episodic_return",
                                               "charts/intrinsic_reward", "losses/rnd_forward"])


if __name__ == "__main__":
    main()

