"""RL^2: a recurrent policy whose hidden state is the "fast" RL algorithm of a task.

[1] Y. Duan, J. Schulman, X. Chen, P. L. Bartlett, I. Sutskever, P. Abbeel. "RL^2: Fast
    Reinforcement Learning via Slow Reinforcement Learning." arXiv:1611.02779 (2016).
[2] J. X. Wang, Z. Kurth-Nelson, D. Tirumala, H. Soyer, J. Z. Leibo, R. Munos, C. Blundell,
    D. Kumaran, M. Botvinick. "Learning to reinforcement learn." arXiv:1611.05763 (2016).

A task (an MDP M_i ~ p(M)) is drawn once per trial; the agent plays n episodes of it. The
policy is a GRU that at every step reads x_t = (s_t, a_{t-1}, r_{t-1}, d_{t-1}) and keeps
its hidden state h across the n episodes; h is reset only when a new trial starts:

    h_t = GRU(x_t, h_{t-1} * (1 - trial_start_t))        [1] Sec. 2.2, Fig. 1
    pi(a_t | x_1..t) = softmax(W h_t),  V(x_1..t) = w' h'_t  (own GRU h')   [1] Sec. 3.3
    maximise E_{M ~ p(M)} [ sum_{t < T_trial} gamma^t r_t ]   (the whole trial)  [1] Eq. (1)
    A_t = GAE(gamma, lambda) over the trial; inner episode ends do not cut it   [1] Sec. 3.3

so that learning inside a trial happens in the activations, and the weights, trained by an
ordinary ("slow") policy-gradient learner across many tasks, encode the fast algorithm. The
outer learner is PPO (default, clipped surrogate) or A2C ([2]'s learner) with `--algo a2c`.
Each PPO minibatch holds whole sequences: the GRU is rerun from the hidden state stored at
the rollout's start, with the same resets as in the rollout.

Environments (common/envs.py `make_meta`): `Meta-Bandit-<K>` (K Bernoulli arms, p ~ U[0,1],
one pull per episode, [1] Sec. 4.1), `Meta-TabularMDP` (S=10, A=5, 10-step episodes,
P ~ Dirichlet(1), reward ~ N(mu, 1) with mu ~ N(1, 1), [1] Sec. 4.2) and `Meta-Nav2D` (the
MAML point robot). `--reset-each-episode` is the broken variant of the meta-RL pitfall: the
hidden state is also reset at every inner episode boundary (ray #2836's symptom), so nothing
learnt in one episode reaches the next.

Reproduce (CPU demo, 5-armed bandits, 10 pulls per trial; the ablation, then RL^2 with
both adaptation curves in one plot; `--plot PNG` and `--compare RUN_DIR` are this file's
only extra flags):
    python metarl/rl2.py --preset quick --num-seeds 4 --reset-each-episode --run-dir runs/rl2_reset
    python metarl/rl2.py --preset quick --num-seeds 4 --plot metarl/rl2_bandits.png \
        --compare runs/rl2_reset
Paper setting (GPU; 5-armed bandits, n = 100, GRU 256, 250k steps per iteration):
    python metarl/rl2.py --preset paper
Ours (quick, 2-core CPU shared with other jobs, 103 s compile + 412 s): 5-armed, n = 10,
1.5M steps, 2000 evaluation trials per seed, 4 seeds: total reward per trial 6.60 +- 0.03
(expected regret 1.72); the same agent with h reset every episode 6.00 +- 0.05 (regret
2.32): adaptation curves in metarl/rl2_bandits.png.
[1] Table 1 [M: recalled, not re-read], total reward per trial, k = 5: n = 10: random 5.0,
Gittins 6.6, UCB1 6.7, Thompson 5.7, RL^2 6.7; n = 100: random 49.9, Gittins 78.3, UCB1 78.0,
Thompson 74.7, RL^2 78.7; n = 500: Gittins 405.8, RL^2 401.6. (The optimum with the arms
known is n E[max p] = 5n/6: 8.33 at n = 10, 83.3 at n = 100.)

Differences from the paper:
- Outer learner: PPO (clipped surrogate, Adam) or A2C, not [1]'s first-order TRPO ([1]
  Sec. 3.3). The PPO/A2C hyperparameters (lr, epochs, minibatches, clip, entropy) are ours.
- [1] feeds x_t through a GRU of 256 units to a softmax (policy) and uses a separate GRU
  baseline; here too (two GRUs), with flax's GRUCell initialisation and orthogonal heads;
  [1]'s exact initialisation and its input embedding for the MDPs are not reproduced.
- The GRU reset is written out in `Core` instead of `common.nets.ResetGRU` (which has no
  compute dtype, needed for `--dtype bfloat16`).
- The rollout is `num_steps` steps of `num_envs` parallel trials; the hidden state carries
  across rollouts (stored in the state), so a trial may span rollouts. The paper presets use
  num_steps = one trial, so each rollout is exactly one trial per env.
- [1]'s batch of 250k steps per iteration and GAE lambda = 0.3 are [M] (recalled); the
  number of iterations of [1] is not known to us: `paper` runs 1000.
- Values are not normalised and rewards not scaled; PPO normalises advantages per minibatch
  (A2C does not).
- `--algo a2c` keeps this file's GRUs and Adam; [2] trained an LSTM (48 units on its
  bandits [M]) with A3C/A2C and RMSProp, advantages from n-step returns (GAE here).
- Metric charts/episodic_return is the return of a whole trial (NaN in an update where no
  trial ended), charts/reward_per_step the mean reward of the rollout's steps; evaluate()
  reports the mean return of each episode index within a trial (`adaptation/<i>`, the
  curve of the plot) and, on bandits, the expected regret per trial.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import distrax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from common import envs, run
from common.nets import orthogonal
from common.plot import save_png
from common.rl import gae, minibatch_epochs, ppo_loss

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """RL^2 with a PPO or A2C outer learner; defaults: [1]'s 5-armed bandits with n = 100."""

    env_id: str = "Meta-Bandit-5"
    """task family: Meta-Bandit-<K>, Meta-TabularMDP or Meta-Nav2D (common.envs.make_meta)"""
    episodes_per_trial: int = 100
    """n: episodes of the same task in one trial (the hidden state lives this long)"""
    episode_length: int = 10
    """Meta-TabularMDP and Meta-Nav2D only: steps of one inner episode (time limit)"""
    mdp_states: int = 10
    """Meta-TabularMDP only: number of states S"""
    mdp_actions: int = 5
    """Meta-TabularMDP only: number of actions A"""
    algo: str = "ppo"
    """outer learner: ppo (clipped surrogate, epochs of minibatches) or a2c (one step)"""
    total_timesteps: int = 250_000_000
    """environment steps of the whole run (1000 iterations of 250k steps)"""
    num_envs: int = 2500
    """trials run in parallel"""
    num_steps: int = 100
    """steps per env per rollout (one trial of 100 pulls)"""
    hidden: int = 256
    """GRU units of the policy and of the value GRU"""
    lr: float = 3e-4
    """Adam learning rate"""
    num_epochs: int = 4
    """PPO only: optimisation epochs per rollout"""
    num_minibatches: int = 4
    """PPO only: minibatches per epoch, each of whole sequences (num_envs must divide)"""
    gamma: float = 0.99
    """discount over the whole trial"""
    gae_lambda: float = 0.3
    """GAE lambda"""
    clip_coef: float = 0.2
    """PPO ratio clip epsilon"""
    ent_coef: float = 0.01
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """global gradient-norm clip"""
    reset_each_episode: bool = False
    """broken variant (ablation): also reset the hidden state at every inner episode end"""
    eval_trials: int = 500
    """evaluate(): fresh trials (new tasks) played by the final policy"""
    dtype: str = "float32"
    """compute dtype of the GRUs and heads: float32 or bfloat16 (params stay float32)"""

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
        if self.algo not in ("ppo", "a2c"):
            raise ValueError(f"algo={self.algo!r} must be 'ppo' or 'a2c'")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")
        for name in ("episodes_per_trial", "episode_length", "mdp_states", "mdp_actions",
                     "hidden", "eval_trials"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got "
                                 f"{getattr(self, name)}")
        envs.meta_env(self.env_id)  # unknown ids name the known ones
        if self.num_updates < 1:
            raise ValueError(f"total_timesteps={self.total_timesteps} is less than one rollout "
                             f"(num_envs * num_steps = {self.batch_size})")
        if self.algo == "ppo" and self.num_envs % self.num_minibatches:
            raise ValueError(f"num_envs={self.num_envs} is not divisible by "
                             f"num_minibatches={self.num_minibatches} (minibatches of trials)")
        if self.ent_coef < 0 or self.clip_coef <= 0:
            raise ValueError(f"ent_coef={self.ent_coef} must be >= 0 and clip_coef="
                             f"{self.clip_coef} > 0")


PRESETS = {
    # CPU demo: 5-armed bandits, 10 pulls per trial, 64 GRU units; minutes on 2 cores.
    "quick": dict(episodes_per_trial=10, num_steps=10, num_envs=256, hidden=64,
                  total_timesteps=1_536_000, lr=1e-3, num_minibatches=4, eval_trials=2000),
    "paper": dict(),
}


def make_env(cfg: Config, num_envs: int | None = None):
    kw = {}
    if cfg.env_id == "Meta-TabularMDP":
        kw = dict(num_states=cfg.mdp_states, num_actions=cfg.mdp_actions,
                  episode_length=cfg.episode_length)
    elif cfg.env_id == "Meta-Nav2D":
        kw = dict(episode_length=cfg.episode_length)
    return envs.make_meta(cfg.env_id, num_envs or cfg.num_envs, cfg.episodes_per_trial, **kw)


# --- NETWORKS ---


class Core(nn.Module):
    """One GRU step whose hidden state is zeroed where `reset` is true (trial starts)."""

    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, inputs):
        x, reset = inputs
        h = jnp.where(reset[:, None], 0.0, h)  # [1] Sec. 2.2: a new task, a blank memory
        h, y = nn.GRUCell(
            self.hidden, dtype=self.dtype, param_dtype=jnp.float32,
            recurrent_kernel_init=orthogonal(1.0),  # flax's default, CPU-safe under vmap
        )(h, x)
        return h.astype(jnp.float32), y


class RecurrentActorCritic(nn.Module):
    """Policy GRU -> logits (or Gaussian mean) and a separate value GRU -> V ([1] Sec. 3.3).

    __call__(carry, x [T, B, D], reset [T, B]) -> (carry, pi params [T, B, A], V [T, B]);
    carry = (h_pi, h_v), each [B, hidden]."""

    action_dim: int
    continuous: bool
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, carry, x, reset):
        scan = nn.scan(Core, variable_broadcast="params", split_rngs={"params": False})
        h_pi, y_pi = scan(self.hidden, self.dtype, name="policy_gru")(carry[0], (x, reset))
        h_v, y_v = scan(self.hidden, self.dtype, name="value_gru")(carry[1], (x, reset))
        out = nn.Dense(self.action_dim, kernel_init=orthogonal(0.01), dtype=self.dtype)(y_pi)
        v = nn.Dense(1, kernel_init=orthogonal(1.0), dtype=self.dtype)(y_v)[..., 0]
        log_std = self.param("log_std", nn.initializers.zeros, (self.action_dim,))
        return (h_pi, h_v), out.astype(jnp.float32), v.astype(jnp.float32), log_std


def network(cfg: Config, env) -> RecurrentActorCritic:
    continuous = env.num_actions is None
    return RecurrentActorCritic(env.action_shape[0] if continuous else env.num_actions,
                                continuous, cfg.hidden, jnp.dtype(cfg.dtype))


def distribution(out, log_std, continuous: bool):
    if continuous:
        return distrax.MultivariateNormalDiag(out, jnp.exp(log_std))
    return distrax.Categorical(logits=out)


def resets(obs, trial_start, episode_reset):
    """Where the hidden state is zeroed before step t: at a trial's first step, and (the
    broken variant, `episode_reset` true) also after every inner episode end, which the
    Trial wrapper flags as d_{t-1} = 1 in the last observation feature."""
    return trial_start | (episode_reset & (obs[..., -1] > 0.5))


# --- LOSS ---


def a2c_loss(logp, adv, entropy, value, returns, vf_coef, ent_coef):
    """[2] Sec. 2 / A3C: -E[log pi(a|h) A] + vf_coef 1/2 E[(V - R)^2] - ent_coef E[H(pi)]."""
    pg = -(logp * adv).mean()
    v_loss = 0.5 * ((value - returns) ** 2).mean()
    ent = entropy.mean()
    return pg + vf_coef * v_loss - ent_coef * ent, {
        "losses/policy": pg, "losses/value": v_loss, "losses/entropy": ent}


# --- STATE ---


@struct.dataclass
class State:
    params: Any
    opt_state: Any
    env_state: Any
    obs: jax.Array  # [N, D] next observation
    start: jax.Array  # [N] bool: obs is the first of a new trial (reset h before it)
    h: tuple  # (h_pi, h_v) [N, hidden] each, carried across rollouts
    key: jax.Array
    episode_reset: jax.Array  # bool, cfg.reset_each_episode traced (the ablation)


def make_optimizer(cfg: Config):
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), optax.adam(cfg.lr, eps=1e-5))


def init(key, cfg: Config) -> State:
    env = make_env(cfg)
    net = network(cfg, env)
    k_net, k_env, key = jax.random.split(key, 3)
    obs, env_state = env.reset(k_env)
    h = (jnp.zeros((cfg.num_envs, cfg.hidden)), jnp.zeros((cfg.num_envs, cfg.hidden)))
    start = jnp.ones(cfg.num_envs, bool)
    params = net.init(k_net, h, obs[None], start[None])
    return State(params, make_optimizer(cfg).init(params), env_state, obs, start, h, key,
                 jnp.asarray(cfg.reset_each_episode))


# --- ROLLOUT ---


def rollout(params, net, env, env_state, obs, start, h, key, num_steps, episode_reset):
    """`num_steps` steps of every env with the hidden state carried step to step. Returns the
    final (env_state, obs, start, h) and the trajectory [T, N, ...]; traj["reset"][t] is
    where h was zeroed before step t, exactly what the training pass replays."""
    continuous = env.num_actions is None

    def step(carry, k):
        env_state, obs, start, h = carry
        k_act, k_env = jax.random.split(k)
        reset = resets(obs, start, episode_reset)
        h, out, value, log_std = net.apply(params, h, obs[None], reset[None])
        pi = distribution(out[0], log_std, continuous)
        action = pi.sample(seed=k_act)
        episode = env_state.env_state.episode  # index of this step's inner episode
        obs2, env_state, reward, done, info = env.step(env_state, action, k_env)
        tr = dict(obs=obs, reset=reset, action=action, logp=pi.log_prob(action),
                  value=value[0], reward=reward, done=done, episode=episode,
                  ret=info["returned_episode_return"], ended=info["returned_episode"])
        return (env_state, obs2, done, h), tr

    return jax.lax.scan(step, (env_state, obs, start, h), jax.random.split(key, num_steps))


# --- UPDATE ---


def update(state: State, cfg: Config):
    env = make_env(cfg)
    net = network(cfg, env)
    tx = make_optimizer(cfg)
    continuous = env.num_actions is None
    key, k_roll, k_epochs = jax.random.split(state.key, 3)
    (env_state, obs, start, h), traj = rollout(
        state.params, net, env, state.env_state, state.obs, state.start, state.h, k_roll,
        cfg.num_steps, state.episode_reset)  # traj leaves: (T, N, ...)

    # --- ADVANTAGES --- ([1] Sec. 3.3: GAE over the trial; only a trial's end is terminal)
    _, _, last_value, _ = net.apply(state.params, h, obs[None],
                                    resets(obs, start, state.episode_reset)[None])
    adv, returns = gae(traj["reward"], traj["value"], traj["done"], last_value[0],
                       cfg.gamma, cfg.gae_lambda)

    # --- LOSS over whole sequences --- (minibatches are sets of envs, never shuffled steps)
    batch = {k: jnp.swapaxes(traj[k], 0, 1)  # (N, T, ...)
             for k in ("obs", "reset", "action", "logp", "value")}
    batch.update(adv=adv.T, ret=returns.T, h0_pi=state.h[0], h0_v=state.h[1])

    def loss_fn(params, mb):
        seq = lambda x: jnp.swapaxes(x, 0, 1)  # (B, T, ...) -> (T, B, ...)
        _, out, value, log_std = net.apply(params, (mb["h0_pi"], mb["h0_v"]), seq(mb["obs"]),
                                           seq(mb["reset"]))
        pi = distribution(out, log_std, continuous)
        logp, ent = pi.log_prob(seq(mb["action"])), pi.entropy()
        a = seq(mb["adv"])
        if cfg.algo == "a2c":
            return a2c_loss(logp, a, ent, value, seq(mb["ret"]), cfg.vf_coef, cfg.ent_coef)
        a = (a - a.mean()) / (a.std() + 1e-8)
        return ppo_loss(logp, seq(mb["logp"]), a, ent, value, seq(mb["value"]), seq(mb["ret"]),
                        cfg.clip_coef, cfg.vf_coef, cfg.ent_coef)

    epochs, minibatches = (1, 1) if cfg.algo == "a2c" else (cfg.num_epochs, cfg.num_minibatches)
    params, opt_state, metrics = minibatch_epochs(k_epochs, state.params, state.opt_state, batch,
                                                  loss_fn, tx, epochs, minibatches)
    n_ended = traj["ended"].sum()
    # the return of whole trials; 0 when none ended, which the runner logs as NaN
    metrics["charts/episodic_return"] = (traj["ret"] * traj["ended"]).sum() / jnp.maximum(
        n_ended, 1)
    metrics["charts/episodes"] = n_ended
    metrics["charts/reward_per_step"] = traj["reward"].mean()
    new = State(params, opt_state, env_state, obs, start, h, key, state.episode_reset)
    return new, metrics


# --- EVALUATE ---


def per_episode_return(reward, episode, alive, n):
    """Mean return of each inner episode index 0..n-1 over trials: reward, episode, alive
    are [T, N] (alive: the step belongs to the trial that started at t = 0)."""
    onehot = jax.nn.one_hot(episode, n) * alive[..., None]  # (T, N, n)
    return jnp.einsum("tn,tnk->k", reward, onehot) / reward.shape[1]


def evaluate(state: State, cfg: Config):
    """`eval_trials` fresh trials with the final policy, each from its first step:
    `adaptation/<i>` is the mean return of episode i of a trial (the learning curve inside a
    trial; scalars, as the runner's summary takes no arrays), `trial_return` their sum; on
    bandits also `regret`, the expected regret per trial sum_t (max_k p_k - p_{a_t})."""
    env = make_env(cfg, cfg.eval_trials)
    net = network(cfg, env)
    k_env, k_roll = jax.random.split(jax.random.fold_in(state.key, 1))
    obs, env_state = env.reset(k_env)
    inner = env.env.env
    longest = getattr(inner, "episode_length", 1) * cfg.episodes_per_trial
    h = (jnp.zeros((cfg.eval_trials, cfg.hidden)),) * 2
    start = jnp.ones(cfg.eval_trials, bool)
    _, traj = rollout(state.params, net, env, env_state, obs, start, h, k_roll, longest,
                      state.episode_reset)
    alive = jnp.cumsum(traj["done"], 0) - traj["done"] == 0  # steps of the first trial
    curve = per_episode_return(traj["reward"], traj["episode"], alive, cfg.episodes_per_trial)
    out = {f"adaptation/{i:03d}": curve[i] for i in range(cfg.episodes_per_trial)}
    out["trial_return"] = curve.sum()
    if isinstance(inner, envs.BernoulliBandit):
        p = env_state.params.p  # (N, K) the first trial's tasks
        chosen = jnp.take_along_axis(p[None], traj["action"][..., None], -1)[..., 0]  # (T, N)
        out["regret"] = ((p.max(-1)[None] - chosen) * alive).sum(0).mean()
    return out


# --- PLOT ---


def plot_adaptation(curves, out: str, num_arms: int | None = None):
    """Mean return of each episode within a trial (over seeds +- std), one line per
    (evaluate() output, label) in `curves`; on K-armed bandits also the two reference
    levels: random play E[p] = 1/2 and the best arm known E[max p] = K / (K + 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for final, label in curves:
        keys = sorted(k for k in final if k.startswith("adaptation/"))
        y = np.stack([np.asarray(final[k]) for k in keys], -1)  # (seeds, n)
        x = np.arange(1, y.shape[1] + 1)
        m, s = y.mean(0), y.std(0)
        ax.plot(x, m, marker="o", label=f"{label} ({y.shape[0]} seeds)")
        ax.fill_between(x, m - s, m + s, alpha=0.2)
    if num_arms:
        ax.axhline(0.5, color="gray", ls=":", label="random arm")
        ax.axhline(num_arms / (num_arms + 1), color="gray", ls="--", label="best arm known")
    ax.set_xlabel("episode within the trial")
    ax.set_ylabel("mean return of the episode")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


def _label(reset_each_episode: bool) -> str:
    return "RL^2, h reset every episode" if reset_each_episode else "RL^2"


def main(argv=None):
    """The runner's CLI plus `--plot PNG` (the adaptation curve of this run) and
    `--compare RUN_DIR` (also draw the curve of an earlier run, from its summary.json)."""
    flags, argv = run.pop_flags(argv, "--plot", "--compare")
    out, other = flags["--plot"], flags["--compare"]
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate,
                   argv=argv, doc=__doc__,
                   summary_keys=["trial_return", "regret", "charts/episodic_return",
                                 "losses/entropy"])
    if out is not None:
        cfg = run.parse(Config, PRESETS, argv)[0]
        curves = [(res.final, _label(cfg.reset_each_episode))]
        if other is not None:
            summary = json.loads((Path(other) / "summary.json").read_text())
            record = json.loads((Path(other) / "config.json").read_text())
            curves.append((summary, _label(record["config"]["reset_each_episode"])))
        arms = make_env(cfg, 1).num_actions if cfg.env_id.startswith("Meta-Bandit-") else None
        print("wrote", plot_adaptation(curves, out, arms))
    return res


if __name__ == "__main__":
    main()
