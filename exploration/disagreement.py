"""PPO + self-supervised exploration via disagreement.

[1] D. Pathak, D. Gandhi, A. Gupta. "Self-Supervised Exploration via Disagreement." ICML
    2019, arXiv:1906.04161. Reference code: pathak22/exploration-by-disagreement (TF; run.py,
    dynamics.py and rollouts.py at f9cb4a0), built on the large-scale curiosity code
    (Burda et al. 2018, arXiv:1808.04355).

An ensemble of K forward models predicts the features of the next state from the features
of this state and the action; each model trains on its own random part of the data. Where
the data determine the next state the models agree; where the agent has not been, they
disagree. The disagreement, not the prediction error, is the curiosity reward, so noise the
agent cannot predict (a noisy TV) stops being rewarding once the models have seen it:
they all learn its mean and agree.

    phi(s): a fixed random network (random features)                          [1] Sec. 3
    f_k(phi(s_t), a_t) ~ phi(s_{t+1}),  k = 1..K                                [1] Eq. 1
    L_k = || f_k(phi(s_t), a_t) - phi(s_{t+1}) ||^2 (mean over features), each model on
          its own random 80% of every minibatch (the code's dropout, keep 0.8)
    r^i_t = mean_features Var_k[ f_k(phi(s_t), a_t) ]                          [1] Eq. 2
    r^i_t <- r^i_t / std(R^i),  R^i the running discounted intrinsic return  (code: norm_rew)

`--bonus error` replaces the variance by the ensemble's mean prediction error (curiosity of
the forward-model kind, [1]'s baseline): on the noisy TV it stays high forever.

Reproduce (CPU demo, about a minute on 2 cores; FourRooms with a noisy TV in the start room):
    python exploration/disagreement.py --preset quick --num-seeds 8
    python exploration/disagreement.py --preset quick --num-seeds 8 --bonus error
Measured (2-core CPU, 8 seeds, 8,192 steps): share of sampled steps on the TV 6.1%
(disagreement) vs 9.6% (prediction error); distinct cells of 104: 100.5 vs 100.2.
Paper setting (GPU; Atari Breakout with sticky actions, pure curiosity, 128 envs):
    python exploration/disagreement.py --preset paper
[1] Fig. 3-4: on sticky-action Atari and the noisy-TV Unity maze, disagreement keeps
exploring where prediction-error curiosity stalls at the TV; [1] reports curves, no table.

Differences from the paper:
- The learner is the shared PPO (common.rl.make_ppo with a Bonus): one value head on
  r = ext_coef r^e + int_coef r^i with episodic GAE; the released code (large-scale
  curiosity) is non-episodic (use_news 0) for pure curiosity. Its PPO settings are used:
  lr 1e-4, 3 epochs, 8 minibatches, clip 0.1, entropy 0.001, gamma 0.99, lambda 0.95,
  advantages normalised per minibatch; the value loss is unclipped, coefficient 0.5 and a
  global-norm clip of 0.5 (the code's values are not given in its run.py).
- Pixels: the policy torso is the Nature DQN CNN with ReLU (the code: the same convs with
  leaky ReLU and a dense 512); the random-feature network is the same torso with leaky
  ReLU and a linear 512 on frames scaled to [0, 1] (the code whitens by a random agent's
  mean and std first).
- The forward models are the code's: dense hidden (leaky ReLU), 4 residual blocks of two
  dense layers, the one-hot action concatenated to the input of every layer, linear output.
  The differentiable variant of [1] Sec. 4 (the policy optimised through r^i) is not here.
- The intrinsic reward of the step that ends an episode is 0 (its next_obs is the next
  episode's first, not a real transition), and that transition trains no model.
- The CPU preset is a 4-rooms grid with (row, col) observations and a noisy TV (8 screen
  features of fresh noise while the agent stands on 4 cells of the start room), MLPs of
  width 64, random features of size 32, 8 envs x 32 steps, lr 1e-3.
"""

from dataclasses import dataclass

import distrax
import flax.linen as nn
import jax
import jax.numpy as jnp

from common import envs, rl, run
from common.nets import MLP, NatureCNN, orthogonal
from common.rl import Bonus, PPOConfig, RunningMeanStd, make_ppo

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """PPO + an ensemble-disagreement bonus; defaults are [1]'s released code (Atari)."""

    env_id: str = "Breakout-v5"
    """environment id (envpool Atari, navix, gymnax or the repo's own envs)"""
    total_timesteps: int = 100_000_000
    """environment steps (the code's num_timesteps)"""
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
    """discount"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    clip_coef: float = 0.1
    """PPO ratio clip epsilon"""
    ent_coef: float = 0.001
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """global gradient-norm clip"""
    num_models: int = 5
    """K, forward models in the ensemble"""
    keep_prob: float = 0.8
    """fraction of each minibatch each model trains on (the code's dropout keep_prob)"""
    bonus: str = "variance"
    """variance (disagreement, [1]) or error (mean prediction error of the ensemble)"""
    feature_dim: int = 512
    """size of the random features phi(s)"""
    model_hidden: int = 512
    """units of the forward models' hidden and residual layers"""
    ext_coef: float = 0.0
    """weight of the extrinsic reward (0: pure curiosity, as in [1]'s Atari runs)"""
    int_coef: float = 1.0
    """weight of the normalised intrinsic reward"""
    hidden: tuple[int, ...] = (64, 64)
    """vector observations: hidden sizes of the policy, value and random-feature MLPs"""
    sticky_action_prob: float = 0.25
    """Atari only: repeat the previous action with this probability"""
    max_episode_frames: int = 18_000
    """Atari only: episode cap in frames (4 per step; the code: 4500 steps)"""
    max_episode_steps: int = 100
    """GridMaze and navix only: episode cap in steps"""
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
        if self.bonus not in ("variance", "error"):
            raise ValueError(f"bonus={self.bonus!r} must be 'variance' or 'error'")
        if self.bonus == "variance" and self.num_models < 2:
            raise ValueError(f"num_models={self.num_models}: a disagreement needs >= 2 models")
        if not 0 < self.keep_prob <= 1:
            raise ValueError(f"keep_prob={self.keep_prob} must be in (0, 1]")


PRESETS = {
    # CPU demo: FourRooms with an uncontrollable noisy TV in the start room; coverage and the
    # share of steps spent at the TV are the measures.
    "quick": dict(env_id="GridMaze-FourRooms-NoisyTV", total_timesteps=8192, num_envs=8,
                  num_steps=32, lr=1e-3, num_minibatches=4, num_epochs=4, ent_coef=0.01,
                  clip_coef=0.2, feature_dim=32, model_hidden=64),
    "paper": dict(),
}


def make_env(cfg: Config):
    if cfg.is_atari:  # the code: 84x84 grey, 4 frames, action repeat 4, sticky actions
        env = envs.make(cfg.env_id, cfg.num_envs, repeat_action_probability=cfg.sticky_action_prob,
                        max_episode_steps=cfg.max_episode_frames // 4, episodic_life=False,
                        reward_clip=False)
    elif cfg.env_id.startswith(("Navix-", "GridMaze-")):
        env = envs.make(cfg.env_id, cfg.num_envs, max_steps=cfg.max_episode_steps)
    else:
        env = envs.make(cfg.env_id, cfg.num_envs)
    return envs.Coverage(env, cfg.coverage_grid, rooms=cfg.is_atari)


# --- NETWORKS ---


def _hwc(obs):
    """envpool frames (..., 4, 84, 84) uint8 -> (..., 84, 84, 4)."""
    return jnp.moveaxis(obs, -3, -1)


class PixelPolicy(nn.Module):
    """Nature CNN torso, dense 512; policy and value heads."""

    num_actions: int

    @nn.compact
    def __call__(self, obs):
        x = NatureCNN()(_hwc(obs))
        logits = nn.Dense(self.num_actions, kernel_init=orthogonal(0.01))(x)
        value = nn.Dense(1, kernel_init=orthogonal(1.0))(x)[..., 0]
        return distrax.Categorical(logits=logits), value


class RandomFeatures(nn.Module):
    """phi: a network left at its random initialisation ([1] Sec. 3, "random features")."""

    pixels: bool
    hidden: tuple[int, ...]
    features: int
    obs_ndim: int = 1

    @nn.compact
    def __call__(self, obs):
        if self.pixels:
            x = NatureCNN(activation=nn.leaky_relu, features=self.features)(_hwc(obs))
            return x
        x = obs.reshape(*obs.shape[:obs.ndim - self.obs_ndim], -1).astype(jnp.float32)
        return nn.Dense(self.features)(MLP(self.hidden, activation=nn.leaky_relu)(x))


class Dynamics(nn.Module):
    """One forward model f(phi, a) -> phi(s'): the released code's dense, 4 residual blocks
    and linear output, with the one-hot action concatenated to every layer's input."""

    num_actions: int
    hidden: int
    features: int
    blocks: int = 4

    @nn.compact
    def __call__(self, phi, action):
        a = jax.nn.one_hot(action, self.num_actions)
        cat = lambda x: jnp.concatenate([x, a], -1)
        x = nn.leaky_relu(nn.Dense(self.hidden)(cat(phi)))
        for _ in range(self.blocks):
            res = nn.leaky_relu(nn.Dense(self.hidden)(cat(x)))
            x = x + nn.Dense(self.hidden)(cat(res))
        return nn.Dense(self.features)(cat(x))


def networks(cfg: Config, env):
    pixels = cfg.is_atari
    policy = PixelPolicy(env.num_actions) if pixels else None  # None: rl.ActorCritic MLP
    phi = RandomFeatures(pixels, cfg.hidden, cfg.feature_dim,
                         obs_ndim=len(env.observation_shape))
    return policy, phi, Dynamics(env.num_actions, cfg.model_hidden, cfg.feature_dim)


# --- BONUS ---


def ensemble_predict(model: Dynamics, params, phi, action):
    """The K models' predictions [K, ..., F]: one vmap over the stacked params."""
    return jax.vmap(lambda p: model.apply(p, phi, action))(params)


def disagreement(preds):
    """[1] Eq. 2: the variance across the K models (population variance, numpy's np.var),
    averaged over the feature dimensions. preds [K, ..., F] -> [...]."""
    return preds.var(axis=0).mean(-1)


def prediction_error(preds, target):
    """The `--bonus error` variant: the K models' squared error against phi(s'), averaged
    over features and models. preds [K, ..., F], target [..., F] -> [...]."""
    return ((preds - target) ** 2).mean(-1).mean(0)


def ensemble_loss(preds, target, keep):
    """Each model's loss on its own part of the minibatch: the per-sample squared error
    (mean over features) times keep [K, B] / keep_prob, averaged over the batch (the
    released code's dropout on the per-sample loss), summed over the models."""
    per = ((preds - jax.lax.stop_gradient(target)) ** 2).mean(-1)  # [K, B]
    return (per * keep).mean(-1).sum()


def forward_filter(rewems, r, gamma):
    """Running discounted intrinsic return R_t = gamma R_{t-1} + r_t per env, carried
    across rollouts and episodes. rewems [N], r [T, N] -> (rewems, R [T, N])."""
    def step(carry, x):
        carry = carry * gamma + x
        return carry, carry

    return jax.lax.scan(step, rewems, r)


def make_bonus(cfg: Config, phi_net: RandomFeatures, model: Dynamics) -> Bonus:
    """The ensemble as a `common.rl.Bonus`: the K models train with the policy; the random
    features' params and the reward normaliser are statistics (never trained)."""

    def init(key, obs):
        k_phi, k_models = jax.random.split(key)
        phi_params = phi_net.init(k_phi, obs)
        phi = phi_net.apply(phi_params, obs)
        a = jnp.zeros(obs.shape[0], jnp.int32)
        params = jax.vmap(lambda k: model.init(k, phi, a))(
            jax.random.split(k_models, cfg.num_models))
        stats = {"phi": phi_params, "rewems": jnp.zeros(obs.shape[0]),
                 "rew_norm": RunningMeanStd.create()}
        return params, stats

    def reward(params, stats, b):
        phi = phi_net.apply(stats["phi"], b["obs"])
        preds = ensemble_predict(model, params, phi, b["action"])  # [K, T, N, F]
        if cfg.bonus == "variance":
            r = disagreement(preds)
        else:
            r = prediction_error(preds, phi_net.apply(stats["phi"], b["next_obs"]))
        r = jnp.where(b["done"], 0.0, r)  # next_obs is a reset there
        rewems, returns = forward_filter(stats["rewems"], r, cfg.gamma)
        rew_norm = stats["rew_norm"].update(returns)
        return r / jnp.sqrt(rew_norm.var + 1e-8), {**stats, "rewems": rewems,
                                                   "rew_norm": rew_norm}

    def loss(params, stats, mb, key):
        phi = jax.lax.stop_gradient(phi_net.apply(stats["phi"], mb["obs"]))
        target = phi_net.apply(stats["phi"], mb["next_obs"])
        preds = ensemble_predict(model, params, phi, mb["action"])  # [K, B, F]
        keep = jax.random.bernoulli(key, cfg.keep_prob, preds.shape[:2]) / cfg.keep_prob
        keep = keep * ~mb["done"]
        total = ensemble_loss(preds, target, keep)
        return total, {"losses/dynamics": total / cfg.num_models,
                       "charts/disagreement": disagreement(preds).mean()}

    return Bonus(init, reward, loss, needs_key=True)


# --- TRAIN ---


def ppo_config(cfg: Config) -> PPOConfig:
    # clip_vloss=False: unclipped, as the curiosity papers' released PPO
    return rl.ppo_config(cfg, anneal_lr=False, clip_vloss=False)


def learner(cfg: Config):
    env = make_env(cfg)
    policy, phi_net, model = networks(cfg, env)
    return make_ppo(env, ppo_config(cfg), policy, make_bonus(cfg, phi_net, model))


def init(key, cfg: Config):
    return learner(cfg)[0](key)


def update(state, cfg: Config):
    state, metrics = learner(cfg)[1](state)
    metrics["charts/distinct_cells"] = state.env_state.visited.sum()
    if cfg.env_id.endswith("NoisyTV"):
        # share of envs on the TV at the end of the rollout (a sample of the time spent
        # there): the screen features are non-zero only on the TV
        tv = (state.obs[:, -make_env(cfg).env.dims:] != 0).any(-1)
        metrics["charts/on_tv"] = tv.mean()
    return state, metrics


def evaluate(state, cfg: Config):
    """Coverage at the end of training: distinct cells (grid) or rooms (Atari) visited."""
    return {"distinct_cells": state.env_state.visited.sum()}


# --- MAIN ---


def main(argv=None):
    return run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                    doc=__doc__, summary_keys=["distinct_cells", "charts/on_tv",
                                               "charts/intrinsic_reward", "losses/dynamics",
                                               "charts/disagreement"])


if __name__ == "__main__":
    main()
