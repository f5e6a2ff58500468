"""Exploration bonuses from a forward model in autoencoder space, on DQN (Stadie et al. 2015).

[1] B. C. Stadie, S. Levine, P. Abbeel. "Incentivizing Exploration in Reinforcement Learning
    with Deep Predictive Models." arXiv:1507.00814 (2015; ICLR 2016 workshop). No released
    code was found; the constants below marked [M] were not re-read in [1] (guesses or from
    memory), the rest follow the post and a summary of [1] (128-unit AE bottleneck, 2-layer
    model MLP).

An autoencoder gives a code sigma(s) of each frame; a forward model M predicts the next code
from the current code and the action; its squared error, normalised by the largest error seen
so far, is a novelty score that decays with time:

    e_t   = || sigma(s_{t+1}) - M(sigma(s_t), a_t) ||_2^2                   [1] Sec. 4 (Alg. 1)
    ebar_t = e_t / max_{i <= t} e_i          (in [0, 1]; running max over the run, all envs)
    R_bonus(s_t, a_t) = R(s_t, a_t) + beta * ebar_t / (t * C)              [1] Alg. 1
    L_AE  = || dec(sigma(s)) - s ||^2 (frames in [0, 1])       the AE, trained jointly on replay
    L_M   = || M(sg sigma(s_t), a_t) - sg sigma(s_{t+1}) ||^2  the model, trained online
    L_Q   = Huber(R_bonus + gamma (1 - d) max_a' Q^-(s', a') - Q(s, a))   DQN on replay
The bonus is computed when acting, with the current AE and model, and stored with the reward
in the replay (as [1] Alg. 1 stores R_bonus); none is paid, and the max does not move, before
the AE and the model have taken their first gradient step. t is a decay clock, 1 + (env
steps so far) // decay_every; `decay_every` 1 makes it the step count. The AE, the model and
the Q network take one gradient step each in the same jitted `update` (one scan for the
whole run, vmappable over seeds); `State.beta` is a value, so beta = 0 (plain
epsilon-greedy DQN) runs the same compiled program.

Reproduce (CPU, DeepSea N = 10 as a 10 x 10 binary image, one env, 150 episodes):
    python exploration/stadie_dynamics.py --preset quick --num-seeds 4
    python exploration/stadie_dynamics.py --preset quick --num-seeds 4 --beta 0  # DQN
    python exploration/stadie_dynamics.py --plot exploration/stadie_dynamics.png  # both arms
The quick preset's run is the test's behaviour run; its baseline runs the same compiled
program from the same initial states with State.beta = 0. No bonus is paid and the running
max does not move until the AE and the model have taken a gradient step (before review item
1's fix the untrained model, error ~2.4, paid ~0.7 on each of the first 128 transitions, the
first greedy path, and set the max to ~4.2, so that later novel transitions paid <= ~0.06).
Measured (loaded 2-core CPU, jax 0.10.2, 4 seeds), distinct cells of 65 and episodes to the
first treasure (-1: never):
    DQN + model bonus, beta 1, C 1 (quick)       cells 46 40 45 58   first -1 -1 -1 -1
    epsilon-greedy DQN, beta 0 (baseline)        cells 56 55 62 47   first -1 -1 -1 -1
    before the fix (bonus from the untrained model)    50 41 51 46         -1 -1 84 -1
    variants after the fix: bonus_when=learning        49 51 54 56         -1 -1 -1 -1
                            max_e starting at 1        46 40 45 58         -1 -1 -1 -1
(max_e at 1 changes nothing: the first trained-model errors, ~2-5, exceed 1.) The model
learns DeepSea's dynamics (mean error of the acted transitions 0.37-0.67 in the first 10%
after learning starts, 0.001-0.15 in the last 10%), so the bonus it pays fades, but at this
scale the bonus does not cover more cells than epsilon-greedy DQN (fewer in 3 of 4 seeds,
also with bonus_when=learning) and finds no treasure. Calibration before the fix (cells, 4
seeds, a program compiled outside the runner, so beta 0 reads 56 55 57 47 there): bonus
stored when acting, beta 1 / 10 / 100: 53 37 45 46 / 48 41 48 51 / 51 45 51 56; recomputed
on the replayed batch, beta 0.1 / 1 / 10: 45 40 57 47 / 49 54 53 58 / 54 43 49 53; N = 16,
3,000 steps, learning: 103 102 93 105 (beta 0) vs 108 106 92 94 (beta 1). A claim that the
bonus helps on DeepSea is not supported by these runs. The --plot run (one compile, then
both arms' 4-seed runs; 2.5 min wall on the loaded 2-core CPU) gives the figure: bonus
46 40 45 58, beta 0 56 55 57 47 (compiled outside the runner), no treasure.

Paper setting (GPU; one Atari game through envpool; only traced on CPU here):
    python exploration/stadie_dynamics.py --preset paper
[1] reports AUC-100 over 14 games: the model bonus gives the most consistent gains over
epsilon-greedy, Boltzmann and Thompson-sampling DQN (abstract; the table not re-read).

Differences from the paper:
- DeepSea (bsuite, as an N x N image) is the CPU test bed; [1] used Atari only.
- The AE is a fully connected encoder (ae_hidden -> code_dim sigmoid) with a mirrored decoder
  on the last frame of the stack ([1]: 8 hidden layers down to 128 units, the code read at the
  sixth layer); it is trained jointly on replay from the start (the post's "dynamic" variant,
  early frames from epsilon-greedy) and frozen after `ae_train_steps` env steps if > 0; [1]'s
  retraining schedule is not reproduced [M].
- beta, C, the decay clock's unit, the AE widths and the learning rates are guesses [M]; only
  beta / C matters for a fixed clock.
- Alg. 1 was not re-read (the stored copies hold only the abstract and introduction); from
  the reviewer's memory [M]: max_e starts at 1 and ebar = e / max_e is taken before the max
  update (so can exceed 1), M (optionally sigma) is retrained every EpochLength steps from the
  memory bank, and t is the iteration counter. Here: max_e starts at 0 and is first set by
  the first trained-model errors (starting at 1 measured the same, above), ebar is taken
  after the update (<= 1), the AE and M take a gradient step every `train_every` env steps,
  and t counts env steps // decay_every. The running max is over the whole run (all envs of
  one seed).
- Transitions that end an episode get no error and no bonus: the next obs is already the
  reset one (common.envs does not return the final obs). On DeepSea-10 that is 1 step in 10,
  every bottom-row transition, the row of the treasure, included.
- The quick preset fixes epsilon at 0.05 (DQN's final value; [1] anneals it), and its
  10,000-row replay never evicts in 1,500 steps (bonuses stored early stay).
- Adam instead of RMSProp; the DeepSea Q network is bsuite's MLP [50, 50].
- `bonus_when=learning` (not in [1]) recomputes the bonus on each replayed batch with the
  current AE and model, so stored bonuses do not go stale; the rollout then stores none and
  the max moves only with the batch errors; it did not help either (above).
Metrics: charts/first_success is NaN until the treasure is first reached (then the finished
episodes it took); charts/bonus_mean is the mean bonus stored in the last rollout (learning:
of the batch); charts/model_error and charts/error_max the mean and max of the errors that
count (acted, or the batch's), charts/max_error the running max after the update.
"""

import math
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from common import dqn, envs, nets, run

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """DQN + model-prediction bonus in AE space; defaults: [1]'s Atari setting (see [M])."""

    env_id: str = "Bowling-v5"
    """environment id (envpool Atari *-v5, or gymnax DeepSea-bsuite-<N>: an N x N image)"""
    total_timesteps: int = 5_000_000
    """environment steps over all envs ([1]'s AUC-100: 100 epochs [M])"""
    num_envs: int = 1
    """parallel environments"""
    beta: float = 0.05
    """bonus scale beta of R + beta ebar / (t C) ([1] Alg. 1) [M]; 0: plain DQN"""
    decay_c: float = 0.1
    """decay constant C > 0 of the bonus ([1] Alg. 1) [M]"""
    decay_every: int = 50_000
    """env steps per tick of the decay clock t = 1 + steps // decay_every (guess: an epoch)"""
    code_dim: int = 128
    """size of the AE code sigma(s) ([1]: 128 units at maximal compression)"""
    ae_hidden: tuple[int, ...] = (1024, 512, 256)
    """encoder ReLU layers before the code (the decoder mirrors them) [M]"""
    model_hidden: tuple[int, ...] = (512,)
    """ReLU layers of the forward model M ([1]: a 2-layer MLP; width [M])"""
    wm_lr: float = 1e-3
    """Adam learning rate of the AE and the model [M]"""
    bonus_when: str = "acting"
    """acting: the bonus is computed when acting and stored in the replay ([1] Alg. 1 [M]);
    learning: recomputed on each replayed batch with the current AE and model (not stale)"""
    ae_train_steps: int = 0
    """env steps during which the AE is trained (then frozen); 0: trained throughout"""
    hidden: tuple[int, ...] = (50, 50)
    """Q network ReLU layers on a flattened DeepSea image (Atari: the Nature CNN)"""
    lr: float = 2.5e-4
    """Adam learning rate of the Q network (Nature DQN's rate, Adam for RMSProp)"""
    gamma: float = 0.99
    """discount"""
    batch_size: int = 32
    """replay batch size"""
    buffer_size: int = 1_000_000
    """replay capacity in transitions"""
    learning_starts: int = 50_000
    """transitions collected before the first gradient update"""
    train_every: int = 4
    """vector-env steps between gradient updates"""
    target_update_period: int = 2_500
    """gradient updates between target-network copies (10k env steps at train_every 4)"""
    eps_start: float = 1.0
    """epsilon at step 0"""
    eps_end: float = 0.1
    """final epsilon"""
    eps_decay_steps: int = 1_000_000
    """environment steps over which epsilon decays linearly"""
    dtype: str = "float32"
    """compute dtype of the networks (bfloat16 on accelerators)"""

    @property
    def is_atari(self) -> bool:
        return self.env_id.endswith("-v5")

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // (self.num_envs * self.train_every)

    def validate(self):
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be float32 or bfloat16")
        if self.bonus_when not in ("acting", "learning"):
            raise ValueError(f"bonus_when={self.bonus_when!r} must be acting or learning")
        for name in ("total_timesteps", "num_envs", "batch_size", "train_every", "code_dim",
                     "target_update_period", "eps_decay_steps", "decay_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("learning_starts", "ae_train_steps", "beta"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if not self.decay_c > 0:
            raise ValueError(f"decay_c={self.decay_c} must be > 0 (C of beta ebar / (t C))")
        for name in ("hidden", "ae_hidden", "model_hidden"):
            if any(h < 1 for h in getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)} must be sizes >= 1")
        if self.buffer_size // self.num_envs < 2:
            raise ValueError(f"buffer_size={self.buffer_size} must hold >= 2 rows of "
                             f"num_envs={self.num_envs} transitions")
        if self.num_updates < 1:
            raise ValueError(f"total_timesteps={self.total_timesteps} is less than one update")
        if not self.is_atari:
            envs.check_id(self.env_id)


PRESETS = {
    # CPU demo: DeepSea N = 10 as a 10 x 10 image, one env, 150 episodes, epsilon 0.05 fixed
    # (DQN's final value) so that exploration beyond dithering comes from the bonus; a small AE
    "quick": dict(env_id="DeepSea-bsuite-10", total_timesteps=1_500, beta=1.0, decay_c=1.0,
                  decay_every=500, code_dim=8, ae_hidden=(32,), model_hidden=(32,),
                  buffer_size=10_000, learning_starts=128, train_every=1,
                  target_update_period=4, lr=1e-3, eps_start=0.05, eps_end=0.05,
                  eps_decay_steps=1),
    # [1]'s Atari DQN with the bonus (Bowling, one of [1]'s games; 1 env as DQN)
    "paper": dict(),
}


def make_env(cfg: Config):
    """The batched env, wrapped to count distinct cells (Coverage; stays 0 on Atari)."""
    if cfg.is_atari:  # 84x84 grey, frame skip 4, stack 4 (envpool's DQN preprocessing)
        env = envs.make(cfg.env_id, cfg.num_envs, episodic_life=True, reward_clip=True)
    else:
        env = envs.make(cfg.env_id, cfg.num_envs)
    return envs.Coverage(env, 64)


def frame_of(obs, cfg: Config):
    """What the AE sees, flattened into [0, 1]: Atari's last stacked frame / 255, or the
    DeepSea image as it is."""
    x = obs[..., -1, :, :].astype(jnp.float32) / 255.0 if cfg.is_atari else obs
    return x.reshape(x.shape[0], -1).astype(jnp.float32)


# --- NETWORKS ---


class WorldModel(nn.Module):
    """The AE (encode: ReLU layers -> sigmoid code; decode: the mirror -> sigmoid frame) and
    the forward model M(code, one_hot(a)) -> next code (ReLU layers, linear output)."""

    ae_hidden: tuple[int, ...]
    code_dim: int
    model_hidden: tuple[int, ...]
    num_actions: int
    frame_dim: int
    dtype: str = "float32"

    def setup(self):
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, name=name)
        self.enc = [dense(h, f"ae_enc_{i}") for i, h in enumerate(self.ae_hidden)]
        self.code = dense(self.code_dim, "ae_code")
        self.dec = [dense(h, f"ae_dec_{i}") for i, h in enumerate(reversed(self.ae_hidden))]
        self.out = dense(self.frame_dim, "ae_out")
        self.fwd = [dense(h, f"model_{i}") for i, h in enumerate(self.model_hidden)]
        self.fwd_out = dense(self.code_dim, "model_out")

    def encode(self, x):
        for layer in self.enc:
            x = nn.relu(layer(x))
        return jax.nn.sigmoid(self.code(x).astype(jnp.float32))

    def decode(self, z):
        for layer in self.dec:
            z = nn.relu(layer(z))
        return jax.nn.sigmoid(self.out(z).astype(jnp.float32))

    def predict(self, z, action):
        x = jnp.concatenate([z, jax.nn.one_hot(action, self.num_actions)], -1)
        for layer in self.fwd:
            x = nn.relu(layer(x))
        return self.fwd_out(x).astype(jnp.float32)

    def __call__(self, x, action):
        z = self.encode(x)
        return self.decode(z), self.predict(z, action)


class QNet(nn.Module):
    """Q(s, .): the Nature CNN on Atari frames, else a ReLU MLP on the flattened image."""

    hidden: tuple[int, ...]
    num_actions: int
    pixels: bool
    dtype: str = "float32"

    @nn.compact
    def __call__(self, obs):
        if self.pixels:  # (B, 4, 84, 84) -> (B, 84, 84, 4)
            x = nets.NatureCNN()(jnp.moveaxis(obs, -3, -1))
        else:
            x = obs.reshape(obs.shape[0], -1).astype(self.dtype)
            for i, h in enumerate(self.hidden):
                x = nn.relu(nn.Dense(h, dtype=self.dtype, name=f"torso_{i}")(x))
        return nn.Dense(self.num_actions, dtype=self.dtype)(x).astype(jnp.float32)


def networks(cfg: Config, env):
    frame_dim = 84 * 84 if cfg.is_atari else math.prod(env.observation_shape)
    wm = WorldModel(cfg.ae_hidden, cfg.code_dim, cfg.model_hidden, env.num_actions, frame_dim,
                    cfg.dtype)
    return QNet(cfg.hidden, env.num_actions, cfg.is_atari, cfg.dtype), wm


def wm_optimizer(cfg: Config):
    return optax.adam(cfg.wm_lr)


# --- BONUS AND LOSSES ---


def prediction_error(wm: WorldModel, wm_params, frame, action, next_frame):
    """e = ||sigma(s') - M(sigma(s), a)||^2 per transition ([1] Alg. 1), shape (B,)."""
    z = wm.apply(wm_params, frame, method=WorldModel.encode)
    z_next = wm.apply(wm_params, next_frame, method=WorldModel.encode)
    pred = wm.apply(wm_params, z, action, method=WorldModel.predict)
    return ((z_next - pred) ** 2).sum(-1)


def bonus(e, valid, max_e, beta, t, c):
    """Running max of e over the valid transitions, ebar = e / max (in [0, 1]) and the bonus
    beta ebar / (t C) ([1] Alg. 1). Returns (bonus, ebar, new max); invalid: 0."""
    e = jnp.where(valid, e, 0.0)
    max_e = jnp.maximum(max_e, e.max())
    ebar = e / jnp.maximum(max_e, 1e-12)
    return beta * ebar / (t * c), ebar, max_e


def acted_bonus(wm, wm_params, cfg: Config, frame, action, next_frame, valid, max_e, beta,
                step, trained):
    """The bonus stored with the acted transitions ([1] Alg. 1): with bonus_when=acting, from
    the current AE and model, and only once they have trained (`trained`: the untrained
    model's large errors would set the max and pay the first path); with bonus_when=learning
    none, the max untouched (the replayed batch sets both). Returns (bonus, ebar, new max,
    e of the transitions that count, else 0)."""
    zero = jnp.zeros(frame.shape[0])
    if cfg.bonus_when == "learning":
        return zero, zero, max_e, zero
    e = prediction_error(wm, wm_params, frame, action, next_frame)
    valid = valid & trained
    b, ebar, max_e = bonus(e, valid, max_e, beta, decay_clock(step, cfg), cfg.decay_c)
    return b, ebar, max_e, jnp.where(valid, e, 0.0)


def decay_clock(step, cfg: Config):
    """t = 1 + (env steps taken, all envs) // decay_every (float, >= 1)."""
    return 1.0 + (step * cfg.num_envs // cfg.decay_every).astype(jnp.float32)


def wm_loss(wm_params, wm: WorldModel, frame, action, next_frame, weight):
    """L_AE (reconstruction MSE of the frame) + L_M (squared code error, the codes held
    fixed: the model does not shape the AE), the latter weighted by `weight`."""
    z = wm.apply(wm_params, frame, method=WorldModel.encode)
    recon = wm.apply(wm_params, z, method=WorldModel.decode)
    loss_ae = ((recon - frame) ** 2).sum(-1).mean()
    z_next = wm.apply(wm_params, next_frame, method=WorldModel.encode)
    pred = wm.apply(wm_params, jax.lax.stop_gradient(z), action, method=WorldModel.predict)
    e = ((pred - jax.lax.stop_gradient(z_next)) ** 2).sum(-1)
    loss_m = (e * weight).sum() / jnp.maximum(weight.sum(), 1.0)
    return loss_ae + loss_m, dict(loss_ae=loss_ae, loss_model=loss_m,
                                  e=jax.lax.stop_gradient(e))


def learn_wm(wm_params, opt_state, wm, cfg: Config, frame, action, next_frame, weight, ae_on):
    """One Adam step of the AE and the model; the AE's update is scaled by `ae_on` (0 once
    the AE is frozen)."""
    (_, aux), grads = jax.value_and_grad(wm_loss, has_aux=True)(
        wm_params, wm, frame, action, next_frame, weight)
    updates, opt_state = wm_optimizer(cfg).update(grads, opt_state, wm_params)
    scale = lambda k, v: jax.tree.map(lambda u: u * ae_on, v) if k.startswith("ae_") else v
    updates = {"params": {k: scale(k, v) for k, v in updates["params"].items()}}
    return optax.apply_updates(wm_params, updates), opt_state, aux


# --- STATE ---


@struct.dataclass
class State:
    q_params: Any
    target_params: Any
    q_opt: Any
    wm_params: Any
    wm_opt: Any
    replay: dqn.Replay
    env_state: Any
    obs: jax.Array
    prev_done: jax.Array  # (N,) bool: the last step ended an episode (envpool resets next)
    step: jax.Array  # int32 vector-env steps taken
    num_grad: jax.Array  # int32 gradient updates done
    max_e: jax.Array  # float: running max of the model error e over the run
    beta: jax.Array  # float: the bonus scale (a value: beta = 0 runs the same program)
    episodes: jax.Array  # float: finished episodes, all envs
    first_success: jax.Array  # float: `episodes` when the first positive one ended; -1 before
    # (env_state, Coverage, counts the treasure episodes, and its first success in env steps)
    key: jax.Array


def init(key, cfg: Config) -> State:
    env = make_env(cfg)
    qnet, wm = networks(cfg, env)
    k_q, k_wm, k_env, key = jax.random.split(key, 4)
    obs, env_state = env.reset(k_env)
    n = cfg.num_envs
    q_params = qnet.init(k_q, obs)
    wm_params = wm.init(k_wm, frame_of(obs, cfg), jnp.zeros(n, jnp.int32))
    row = dict(obs=obs, action=jnp.zeros(n, jnp.int32), reward=jnp.zeros(n),
               bonus=jnp.zeros(n), done=jnp.zeros(n, bool), weight=jnp.zeros(n))
    zero = jnp.zeros(())
    return State(q_params, q_params, optax.adam(cfg.lr).init(q_params), wm_params,
                 wm_optimizer(cfg).init(wm_params), dqn.replay_init(row, cfg.buffer_size // n),
                 env_state, obs, jnp.zeros(n, bool), jnp.zeros((), jnp.int32),
                 jnp.zeros((), jnp.int32), zero, jnp.asarray(cfg.beta, jnp.float32), zero,
                 -jnp.ones(()), key)


# --- UPDATE ---


def update(state: State, cfg: Config):
    env = make_env(cfg)
    qnet, wm = networks(cfg, env)

    # --- ROLLOUT ---
    def env_step(carry, _):
        s, key = carry
        key, k_act, k_env = jax.random.split(key, 3)
        epsilon = dqn.linear_schedule(s.step * cfg.num_envs, cfg.eps_start, cfg.eps_end,
                                      cfg.eps_decay_steps)
        action = dqn.epsilon_greedy(k_act, qnet.apply(s.q_params, s.obs), epsilon)
        next_obs, env_state, reward, done, info = env.step(s.env_state, action, k_env)
        # envpool resets on the step AFTER done: that transition is not one; weight 0
        weight = (~s.prev_done if cfg.is_atari else jnp.ones_like(done)).astype(jnp.float32)
        b, ebar, max_e, e = acted_bonus(wm, s.wm_params, cfg, frame_of(s.obs, cfg), action,
                                        frame_of(next_obs, cfg), (weight > 0) & ~done,
                                        s.max_e, s.beta, s.step, s.num_grad > 0)
        replay = dqn.replay_add(s.replay, dict(obs=s.obs, action=action, reward=reward,
                                               bonus=b, done=done, weight=weight))
        ended = info["returned_episode"]
        success = ended & (info["returned_episode_return"] > 0)
        episodes = s.episodes + ended.sum()
        first = jnp.where((s.first_success < 0) & success.any(), episodes, s.first_success)
        s = s.replace(replay=replay, env_state=env_state, obs=next_obs, prev_done=done,
                      step=s.step + 1, max_e=max_e, episodes=episodes, first_success=first)
        return (s, key), dict(ret=info["returned_episode_return"], ended=ended, eps=epsilon,
                              bonus=b.mean(), ebar=ebar.mean(), e=e.mean(), e_max=e.max())

    (state, key), traj = jax.lax.scan(env_step, (state, state.key), None, cfg.train_every)

    # --- LEARN ---
    key, k_sample = jax.random.split(key)
    cur, nxt = dqn.replay_sample(state.replay, k_sample, cfg.batch_size)
    frame, next_frame = frame_of(cur["obs"], cfg), frame_of(nxt["obs"], cfg)
    not_done = 1.0 - cur["done"].astype(jnp.float32)
    env_steps = state.step * cfg.num_envs
    ae_on = ((cfg.ae_train_steps == 0) | (env_steps < cfg.ae_train_steps)).astype(jnp.float32)
    learning = env_steps >= max(cfg.learning_starts, 2 * cfg.num_envs)
    max_e, stored = state.max_e, cur["bonus"]
    err_mean, err_max = traj["e"].mean(), traj["e_max"].max()  # acted errors (acting mode)
    wm_params, wm_opt, wm_aux = learn_wm(state.wm_params, state.wm_opt, wm, cfg, frame,
                                         cur["action"], next_frame, cur["weight"] * not_done,
                                         ae_on)
    if cfg.bonus_when == "learning":  # the bonus of the replayed (s, a) under today's model
        e = wm_aux["e"]  # = prediction_error before this step (the loss's forward pass)
        # as when acting: no bonus (and no max) before the AE and the model have trained
        valid = ((cur["weight"] * not_done) > 0) & (state.num_grad > 0)
        stored, _, max_e = bonus(e, valid, max_e, state.beta, decay_clock(state.step, cfg),
                                 cfg.decay_c)
        stored = jax.lax.stop_gradient(stored)
        e = jnp.where(valid, e, 0.0)
        err_mean, err_max = e.sum() / jnp.maximum(valid.sum(), 1), e.max()

    def q_loss(params):
        q = qnet.apply(params, cur["obs"])
        q_next = qnet.apply(state.target_params, nxt["obs"])
        y = dqn.td_target(cur["reward"] + stored, cfg.gamma * not_done, q_next)
        return dqn.q_loss(q, cur["action"], y, cur["weight"])

    loss_q, grads = jax.value_and_grad(q_loss)(state.q_params)
    upd, q_opt = optax.adam(cfg.lr).update(grads, state.q_opt, state.q_params)
    q_params = optax.apply_updates(state.q_params, upd)

    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(learning, a, b), new, old)
    q_params, q_opt = keep(q_params, state.q_params), keep(q_opt, state.q_opt)
    wm_params, wm_opt = keep(wm_params, state.wm_params), keep(wm_opt, state.wm_opt)
    num_grad = state.num_grad + learning.astype(jnp.int32)
    target = keep(dqn.periodic_update(q_params, state.target_params, num_grad,
                                      cfg.target_update_period), state.target_params)

    n_ended = traj["ended"].sum()
    metrics = {
        "losses/q": loss_q,
        "losses/ae": wm_aux["loss_ae"],
        "losses/model": wm_aux["loss_model"],
        "charts/bonus_mean": traj["bonus"].mean() if cfg.bonus_when == "acting" else stored.mean(),
        "charts/ebar_mean": traj["ebar"].mean(),
        "charts/model_error": err_mean,
        "charts/error_max": err_max,
        "charts/max_error": max_e,
        "charts/episodic_return": (traj["ret"] * traj["ended"]).sum() / jnp.maximum(n_ended, 1),
        "charts/epsilon": traj["eps"][-1],
        "charts/positive_episodes": state.env_state.positives,
        "charts/distinct_cells": state.env_state.visited.sum(),
        "charts/first_success": jnp.maximum(state.first_success, 0.0),
        "charts/solved": (state.first_success >= 0).astype(jnp.float32),
    }
    new = state.replace(q_params=q_params, target_params=target, q_opt=q_opt, max_e=max_e,
                        wm_params=wm_params, wm_opt=wm_opt, num_grad=num_grad, key=key)
    return new, metrics


def evaluate(state: State, cfg: Config):
    """Episodes until the first treasure (-1: never), treasure episodes, distinct cells."""
    return {"first_success": state.first_success, "positive_episodes": state.env_state.positives,
            "distinct_cells": state.env_state.visited.sum()}


# --- MAIN ---

NAN_UNLESS = {**run.NAN_UNLESS, "charts/first_success": "charts/solved"}


def plot_runs(out: str, seeds: int = 4):
    """Distinct DeepSea cells and treasure episodes over training (quick budget): DQN with
    the model bonus and plain epsilon-greedy DQN (beta = 0), median and per-seed curves."""
    import matplotlib.pyplot as plt
    import numpy as np

    from common import plot

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    cfg = Config(**PRESETS["quick"])
    keys = jax.random.split(jax.random.PRNGKey(0), seeds)
    states = jax.jit(jax.vmap(lambda k: init(k, cfg)))(keys)
    train = jax.jit(jax.vmap(lambda s: jax.lax.scan(lambda s, _: update(s, cfg), s, None,
                                                    cfg.num_updates)[1]))
    x = np.arange(cfg.num_updates) * cfg.num_envs * cfg.train_every
    for color, beta, label in (("C0", cfg.beta, f"DQN + model bonus (beta {cfg.beta:g})"),
                               ("C1", 0.0, "DQN, epsilon-greedy (beta 0)")):
        m = train(states.replace(beta=jnp.full_like(states.beta, beta)))  # one compile
        for ax, k in zip(axes, ("charts/distinct_cells", "charts/positive_episodes"),
                         strict=True):
            y = np.asarray(m[k])
            ax.plot(x, y.T, color=color, alpha=0.25, lw=0.8)
            ax.plot(x, np.median(y, 0), color=color, label=label)
            print(label, k, y[:, -1])
    axes[0].set(xlabel="env steps", ylabel="distinct cells visited")
    axes[1].set(xlabel="env steps", ylabel="episodes that reached the treasure")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"DeepSea N = 10 as an image, {seeds} seeds (median bold)")
    fig.tight_layout()
    return plot.save_png(fig, out)


def main(argv=None):
    flags, argv = run.pop_flags(argv, "--plot")
    if flags["--plot"]:
        return plot_runs(flags["--plot"])
    return run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                    doc=__doc__, nan_unless=NAN_UNLESS,
                    summary_keys=["first_success", "positive_episodes", "distinct_cells",
                                  "charts/bonus_mean", "losses/model"])


if __name__ == "__main__":
    main()
