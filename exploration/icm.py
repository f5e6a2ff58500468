"""PPO + Intrinsic Curiosity Module (ICM).

[1] D. Pathak, P. Agrawal, A. A. Efros, T. Darrell. "Curiosity-driven Exploration by
    Self-supervised Prediction." ICML 2017, arXiv:1705.05363. Reference code:
    pathak22/noreward-rl (TensorFlow, A3C): src/model.py at 0a0deae, src/a3c.py and
    src/constants.py at 0d47c9e.

An encoder phi is trained with an inverse-dynamics model, so it keeps only what the agent's
actions change or what changes the agent; a forward model predicts phi(s_{t+1}) from
phi(s_t) and a_t, and its error in that feature space is the curiosity reward:

    a_hat_t = g(phi(s_t), phi(s_{t+1}); theta_I)                               [1] Eq. 2
    L_I = cross-entropy(a_hat_t, a_t)                                          [1] Eq. 3
    phi_hat(s_{t+1}) = f(phi(s_t), a_t; theta_F)                               [1] Eq. 4
    L_F = 1/2 || phi_hat(s_{t+1}) - phi(s_{t+1}) ||^2                          [1] Eq. 5
    r^i_t = eta/2 || phi_hat(s_{t+1}) - phi(s_{t+1}) ||^2,  r_t = r^e_t + r^i_t  [1] Eq. 6
    min  lambda L_policy + (1 - beta) L_I + beta L_F,  beta = 0.2, lambda = 0.1   [1] Eq. 7

Only L_I trains phi (`stop_gradient_forward`, default): [1] Sec. 2.2 trains theta_F by L_F
and theta_I (encoder included) by L_I, and argues that phi has "no incentive" to encode what
the agent cannot influence. The released code does NOT stop the gradient: its L_F also
reaches phi through both phi(s_t) and phi(s_{t+1}) (`--no-stop-gradient-forward` gives
that). The large-scale follow-up (Burda et al. 2018) detaches phi, since otherwise L_F
pulls the features together. Extrinsic reward off (`--no-extrinsic-reward`) is [1]'s "no
reward" setting (Sec. 4.2).

Reproduce (CPU demo, about a minute on 2 cores; ICM vs the same PPO without the bonus):
    python exploration/icm.py --preset quick --num-seeds 8
    python exploration/icm.py --preset quick --num-seeds 8 --eta 0
Measured (2-core CPU, 8 seeds, 2048 steps): distinct cells of FourRooms' 104, median 88.5
(ICM) vs 70.5 (PPO, eta = 0); half the PPO seeds stay near the first room.
Paper setting (GPU; Montezuma's Revenge through envpool, 42x42 grey, 4 frames):
    python exploration/icm.py --preset paper
[1] reports VizDoom MyWayHome and Super Mario Bros, not Atari: "sparse" MyWayHome, mean
(median) success at convergence ICM + A3C 100% (100%) vs A3C 0% (0%) (Sec. 4.1 table);
"very sparse": ICM reaches a perfect score in 66% of runs, A3C never; no reward: Mario
crosses 30% of Level-1 (Table 1: distance 711 +- 59 after 1.5M iterations).

Differences from the paper:
- PPO (clipped surrogate, minibatch epochs; common.rl.make_ppo with a Bonus) instead of A3C
  with 20 asynchronous workers: 20 envs x 20 steps per rollout stand for the 20 workers'
  20-step rollouts; clip 0.1, 3 epochs, 4 minibatches are the PPO paper's Atari values.
  lambda weighs the whole PPO loss (surrogate, value, entropy) against the ICM loss:
  the update minimises L_PPO + ((1 - beta) L_I + beta L_F) / lambda, as the released code
  does (the ICM loss times PREDICTION_LR_SCALE = 10). One Adam for both, one global-norm
  clip at 40 over both gradients (the code clips each at 40).
- The policy is feed-forward: [1]'s 4-conv torso then a dense 256 in place of the LSTM 256.
- Environment: [1]'s VizDoom and Mario are not used. MyWayHome ships in envpool-assets and
  resets, but its jitted step hung on our CPU machine, so the paper preset is Atari
  Montezuma's Revenge with [1]'s preprocessing (42x42 grey, last 4 frames, action repeat
  4) plus envpool's sticky actions 0.25. The CPU preset is a 4-rooms grid with (row, col)
  observations: phi is then an MLP (ELU) instead of the 4-conv encoder, eta = 1 (the
  features are small) and PPO's usual lr 1e-3, clip 0.2, GAE 0.95, grad clip 0.5.
- eta = 0.01 and lr = 1e-4 are the released code's (PREDICTION_BETA, LEARNING_RATE); [1]
  gives no value for eta and says lr 1e-3. GAE lambda = 1 and entropy 0.01 are the code's.
- The released code clips r^e + r^i to [-1, 1]; we do not clip.
- Auto-resetting envs return the next episode's first observation on the step that ends
  an episode; that transition is not a real one, so its r^i is 0 and it is left out of L_I
  and L_F (envpool resets a step later: one spurious transition per episode stays there).
"""

from dataclasses import dataclass

import distrax
import flax.linen as nn
import jax
import jax.numpy as jnp

from common import envs, rl, run
from common.nets import MLP, orthogonal
from common.rl import Bonus, PPOConfig, make_ppo

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """PPO + ICM; ICM defaults are [1] Sec. 3 and the released code."""

    env_id: str = "MontezumaRevenge-v5"
    """environment id (envpool Atari, navix, gymnax or the repo's own envs)"""
    total_timesteps: int = 20_000_000
    """environment steps ([1]'s longest VizDoom runs, Fig. 6)"""
    num_envs: int = 20
    """parallel environments ([1]: 20 A3C workers)"""
    num_steps: int = 20
    """rollout length ([1]'s code: 20 local steps)"""
    lr: float = 1e-4
    """Adam learning rate, constant (released code; [1] says 1e-3)"""
    num_epochs: int = 3
    """PPO optimisation epochs per rollout"""
    num_minibatches: int = 4
    """PPO minibatches per epoch"""
    gamma: float = 0.99
    """discount"""
    gae_lambda: float = 1.0
    """GAE lambda (released code: 1.0)"""
    clip_coef: float = 0.1
    """PPO ratio clip epsilon"""
    ent_coef: float = 0.01
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 40.0
    """global gradient-norm clip"""
    beta: float = 0.2
    """[1] Eq. 7: weight of L_F against L_I, (1 - beta) L_I + beta L_F"""
    policy_weight: float = 0.1
    """[1] Eq. 7: lambda, weight of the policy loss against the ICM loss"""
    eta: float = 0.01
    """[1] Eq. 6: reward scale, r^i = eta/2 ||phi_hat - phi||^2 (0: no bonus)"""
    extrinsic_reward: bool = True
    """add the environment's reward (off: [1]'s "no reward" setting)"""
    stop_gradient_forward: bool = True
    """L_F trains f only, not phi ([1] Sec. 2.2); off: L_F also trains phi (released code)"""
    icm_hidden: int = 256
    """units of the hidden layer of the inverse and forward models"""
    feature_dim: int = 32
    """vector observations: size of phi (pixels: 288, the 4-conv output)"""
    encoder_hidden: tuple[int, ...] = (64,)
    """vector observations: hidden sizes of the encoder MLP"""
    hidden: tuple[int, ...] = (64, 64)
    """vector observations: hidden sizes of the policy and value MLPs"""
    sticky_action_prob: float = 0.25
    """Atari only: repeat the previous action with this probability"""
    max_episode_frames: int = 18_000
    """Atari only: episode cap in frames (4 per step)"""
    max_episode_steps: int = 200
    """navix and GridMaze only: episode cap in steps"""
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
        for name in ("num_envs", "num_steps", "num_epochs", "num_minibatches", "icm_hidden",
                     "feature_dim", "max_episode_frames", "max_episode_steps",
                     "coverage_grid"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("lr", "clip_coef", "max_grad_norm", "policy_weight"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("beta", "gamma", "gae_lambda", "sticky_action_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1]")
        for name in ("eta", "ent_coef", "vf_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if min(self.hidden + self.encoder_hidden, default=1) < 1:
            raise ValueError(f"hidden={self.hidden} and encoder_hidden={self.encoder_hidden} "
                             "must be sizes >= 1")


PRESETS = {
    # CPU demo: the repo's 4-rooms grid (104 cells, start in one corner room, the only reward
    # in the opposite one), vector observations; coverage is the measure ([1] Sec. 4.2).
    "quick": dict(env_id="GridMaze-FourRooms", total_timesteps=2048, num_envs=8, num_steps=32,
                  lr=1e-3, gae_lambda=0.95, clip_coef=0.2, num_epochs=4, max_grad_norm=0.5,
                  feature_dim=16, icm_hidden=32, encoder_hidden=(32,), max_episode_steps=100,
                  eta=1.0),
    "paper": dict(),
}


# --- ENVIRONMENT ---


def make_env(cfg: Config):
    if cfg.is_atari:  # [1] Sec. 3: 42x42 grey, the last 4 frames, action repeat 4
        env = envs.make(cfg.env_id, cfg.num_envs, img_height=42, img_width=42, stack_num=4,
                        repeat_action_probability=cfg.sticky_action_prob,
                        max_episode_steps=cfg.max_episode_frames // 4, episodic_life=False,
                        reward_clip=False)
    elif cfg.env_id.startswith("Navix-"):
        env = envs.make(cfg.env_id, cfg.num_envs, max_steps=cfg.max_episode_steps)
    elif cfg.env_id in envs.GRID_MAPS:
        env = envs.make(cfg.env_id, cfg.num_envs, max_steps=cfg.max_episode_steps)
    else:
        env = envs.make(cfg.env_id, cfg.num_envs)
    return envs.Coverage(env, cfg.coverage_grid, rooms=cfg.is_atari)


# --- NETWORKS ---


def _pixels(obs):
    """envpool frames (..., 4, 42, 42) uint8 -> (..., 42, 42, 4) floats in [0, 1]."""
    return jnp.moveaxis(obs, -3, -1).astype(jnp.float32) / 255.0


class UniverseHead(nn.Module):
    """[1] Sec. 3: four convs, 32 filters 3x3, stride 2, padding 1, ELU; 42x42 -> 3x3x32."""

    @nn.compact
    def __call__(self, x):
        for _ in range(4):
            x = nn.elu(nn.Conv(32, (3, 3), (2, 2), padding=((1, 1), (1, 1)))(x))
        return x.reshape(*x.shape[:-3], -1)  # (..., 288)


class PixelPolicy(nn.Module):
    """[1]'s A3C torso with a dense 256 in place of its LSTM 256; policy and value heads."""

    num_actions: int

    @nn.compact
    def __call__(self, obs):
        x = nn.relu(nn.Dense(256, kernel_init=orthogonal())(UniverseHead()(_pixels(obs))))
        logits = nn.Dense(self.num_actions, kernel_init=orthogonal(0.01))(x)
        value = nn.Dense(1, kernel_init=orthogonal(1.0))(x)[..., 0]
        return distrax.Categorical(logits=logits), value


class ICM(nn.Module):
    """Encoder phi, inverse model g and forward model f ([1] Sec. 3, "ICM architecture").

    g: concat(phi(s), phi(s')) -> dense 256 ReLU -> action logits; f: concat(phi(s),
    one-hot a) -> dense 256 ReLU -> dense |phi|. Pixels: phi is `UniverseHead`; vectors:
    an ELU MLP to `features` units.
    """

    num_actions: int
    pixels: bool
    encoder_hidden: tuple[int, ...] = (64,)
    features: int = 32
    hidden: int = 256
    obs_ndim: int = 1

    def setup(self):
        if self.pixels:
            self.phi = UniverseHead()
        else:
            self.phi = nn.Sequential([MLP(self.encoder_hidden, activation=nn.elu),
                                      nn.Dense(self.features)])
        self.g = nn.Sequential([nn.Dense(self.hidden), nn.relu, nn.Dense(self.num_actions)])
        self.f = nn.Sequential([nn.Dense(self.hidden), nn.relu, nn.Dense(self.width)])

    @property
    def width(self):
        return 288 if self.pixels else self.features

    def encode(self, obs):
        if self.pixels:
            return self.phi(_pixels(obs))
        return self.phi(obs.reshape(*obs.shape[:obs.ndim - self.obs_ndim], -1)
                        .astype(jnp.float32))

    def inverse(self, phi, phi_next):  # [1] Eq. 2
        return self.g(jnp.concatenate([phi, phi_next], -1))

    def forward(self, phi, action):  # [1] Eq. 4
        return self.f(jnp.concatenate([phi, jax.nn.one_hot(action, self.num_actions)], -1))

    def __call__(self, obs, next_obs, action):  # for init: touches every layer
        phi, phi_next = self.encode(obs), self.encode(next_obs)
        return self.inverse(phi, phi_next), self.forward(phi, action)


def networks(cfg: Config, env):
    pixels = cfg.is_atari
    policy = PixelPolicy(env.num_actions) if pixels else None  # None: rl.ActorCritic MLP
    icm = ICM(env.num_actions, pixels, cfg.encoder_hidden, cfg.feature_dim, cfg.icm_hidden,
              obs_ndim=len(env.observation_shape))
    return policy, icm


# --- LOSS ---


def inverse_loss(logits, action, mask):
    """[1] Eq. 3: cross-entropy of g's action distribution, averaged over masked samples."""
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), action[..., None], -1)[..., 0]
    m = mask.astype(jnp.float32)
    return (ce * m).sum() / jnp.maximum(m.sum(), 1.0)


def forward_loss(phi_hat, phi_next, mask):
    """[1] Eq. 5: 1/2 ||phi_hat - phi(s')||^2 summed over features (the released code's
    0.5 * mean * 288), averaged over masked samples."""
    m = mask.astype(jnp.float32)
    return (0.5 * ((phi_hat - phi_next) ** 2).sum(-1) * m).sum() / jnp.maximum(m.sum(), 1.0)


def curiosity(phi_hat, phi_next, eta):
    """[1] Eq. 6: r^i = eta/2 ||phi_hat(s') - phi(s')||^2 per transition."""
    return 0.5 * eta * ((phi_hat - phi_next) ** 2).sum(-1)


def icm_loss(params, icm: ICM, obs, next_obs, action, mask, *, beta, stop_gradient_forward):
    """[1] Eq. 7 without the policy term: (1 - beta) L_I + beta L_F. Returns (loss, L_I, L_F).

    L_I trains g and phi. L_F trains f; with `stop_gradient_forward` phi(s_t) (f's input)
    and phi(s_{t+1}) (its target) are constants to it, so phi learns from L_I alone.
    """
    phi = icm.apply(params, obs, method=ICM.encode)
    phi_next = icm.apply(params, next_obs, method=ICM.encode)
    l_inv = inverse_loss(icm.apply(params, phi, phi_next, method=ICM.inverse), action, mask)
    if stop_gradient_forward:
        phi, phi_next = jax.lax.stop_gradient(phi), jax.lax.stop_gradient(phi_next)
    phi_hat = icm.apply(params, phi, action, method=ICM.forward)
    l_fwd = forward_loss(phi_hat, phi_next, mask)
    return (1 - beta) * l_inv + beta * l_fwd, l_inv, l_fwd


def intrinsic_reward(params, icm: ICM, obs, next_obs, action, done, *, eta):
    """[1] Eq. 6 on a rollout [T, N, ...]; 0 where `done` (next_obs is then a reset)."""
    phi_hat = icm.apply(params, icm.apply(params, obs, method=ICM.encode), action,
                        method=ICM.forward)
    r = curiosity(phi_hat, icm.apply(params, next_obs, method=ICM.encode), eta)
    return jnp.where(done, 0.0, r)


def make_bonus(cfg: Config, icm: ICM) -> Bonus:
    """ICM as a `common.rl.Bonus`: its params train with the policy's; its one statistic is
    eta, a traced scalar, so one compiled program can run several etas (seeds with eta = 0
    are plain PPO beside ICM seeds)."""

    def init(key, obs):
        params = icm.init(key, obs, obs, jnp.zeros(obs.shape[0], jnp.int32))
        return params, jnp.asarray(cfg.eta, jnp.float32)

    def reward(params, eta, b):
        r = intrinsic_reward(params, icm, b["obs"], b["next_obs"], b["action"], b["done"],
                             eta=eta)
        return r, eta

    def loss(params, stats, mb):
        total, l_inv, l_fwd = icm_loss(params, icm, mb["obs"], mb["next_obs"], mb["action"],
                                       ~mb["done"], beta=cfg.beta,
                                       stop_gradient_forward=cfg.stop_gradient_forward)
        # [1] Eq. 7 divided by lambda: L_PPO + ((1 - beta) L_I + beta L_F) / lambda
        return total / cfg.policy_weight, {"losses/inverse": l_inv, "losses/forward": l_fwd}

    return Bonus(init, reward, loss)


# --- TRAIN ---


def ppo_config(cfg: Config) -> PPOConfig:
    return rl.ppo_config(cfg, anneal_lr=False,
                         clip_vloss=False,  # unclipped, as the curiosity papers' released PPO
                         ext_coef=1.0 if cfg.extrinsic_reward else 0.0, int_coef=1.0)


def learner(cfg: Config):
    env = make_env(cfg)
    policy, icm = networks(cfg, env)
    return make_ppo(env, ppo_config(cfg), policy, make_bonus(cfg, icm))


def init(key, cfg: Config):
    return learner(cfg)[0](key)


def update(state, cfg: Config):
    state, metrics = learner(cfg)[1](state)
    metrics["charts/distinct_cells"] = state.env_state.visited.sum()
    return state, metrics


def evaluate(state, cfg: Config):
    """Coverage at the end of training: distinct cells (grid) or rooms (Atari) visited."""
    return {"distinct_cells": state.env_state.visited.sum()}


# --- MAIN ---


def main(argv=None):
    return run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                    doc=__doc__, summary_keys=["distinct_cells", "charts/episodic_return",
                                               "charts/intrinsic_reward", "losses/inverse",
                                               "losses/forward"])


if __name__ == "__main__":
    main()
