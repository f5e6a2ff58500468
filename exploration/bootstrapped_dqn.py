"""Bootstrapped DQN with randomized prior functions; epsilon-greedy DQN as the baseline.

[1] I. Osband, C. Blundell, A. Pritzel, B. Van Roy. "Deep Exploration via Bootstrapped DQN."
    NeurIPS 2016, arXiv:1602.04621.
[2] I. Osband, J. Aslanides, A. Cassirer. "Randomized Prior Functions for Deep Reinforcement
    Learning." NeurIPS 2018, arXiv:1806.03335. Released code: deepmind/bsuite,
    bsuite/baselines/jax/boot_dqn/agent.py (`default_agent`), read for the defaults below.

K Q-functions are trained on the same replay, each on the transitions its bootstrap mask
keeps; one of them, drawn uniformly at the start of each episode, acts greedily for the whole
episode (a Thompson-sampling approximation: temporally consistent, hence "deep" exploration):

    k ~ U{1..K} at each episode start; a_t = argmax_a Q_k(s_t, a)            [1] Alg. 1
    m_t ~ Bernoulli(p)^K stored with (s_t, a_t, r_t, s_t+1)                   [1] Sec. 3
    y_k = r_t + gamma (1 - d_t) max_a' Q_k^-(s_t+1, a')                       [1] Sec. 3
    L_k = 1/B sum_b m_{b,k} (y_{b,k} - Q_k(s_b, a_b))^2,  L = sum_k L_k      [1] Alg. 1
    shared torso: its gradient (the sum over heads) is scaled by 1/K           [1] Sec. 3 [M]
    prior: Q_k = f_{theta_k} + beta p_k, p_k a fixed random network (no gradient), and
    the target uses the same prior:
        y_k = r + gamma max_a' (f_{theta_k^-} + beta p_k)(s', a')              [2] Eq. (5)

p = 1 with beta = 0 is a plain ensemble; p = 0.5 is [1]'s double-or-nothing bootstrap. The
`epsilon` baseline is the same file with one head, no prior and an epsilon schedule (the
`quick_epsilon` preset): plain DQN with a squared TD loss and a target network.

Reproduce (CPU, DeepSea N = 10, one env, 300 episodes; about a minute on a loaded 2-core CPU):
    python exploration/bootstrapped_dqn.py --preset quick --num-seeds 4
    python exploration/bootstrapped_dqn.py --preset quick_epsilon --num-seeds 4
    python exploration/bootstrapped_dqn.py --preset quick --num-seeds 4 --resample step
    python exploration/bootstrapped_dqn.py --plot exploration/bootstrapped_dqn_deepsea.png
The plot: episodes to the first treasure against DeepSea size N = 5, 8, 11 (bsuite deep_sea
style; 4 seeds, 250 episodes, epsilon decaying over the first half; never = 250).
Measured (loaded 2-core CPU, about 4 min for the plot), episodes to the first treasure:
    N =  5:  bootstrapped+prior 68 46 26 58     epsilon-greedy 229 14 16 24
    N =  8:  bootstrapped+prior 185 58 108 66   epsilon-greedy never 75 195 12
    N = 11:  bootstrapped+prior 142 93 104 14   epsilon-greedy 11 never never never
    N = 10 (the test's budget, 150 episodes): bootstrapped 77 63 83 55, epsilon-greedy never.
Epsilon-greedy's first success is luck of its early random phase (2^-N per episode), which
vanishes with N; the ensemble's grows slowly.
Paper setting ([2] / bsuite's agent on DeepSea N = 20, one env, 20 heads):
    python exploration/bootstrapped_dqn.py --preset paper
Paper numbers: [2] Fig. (deep sea scaling): BootDQN+prior solves DeepSea with a learning time
growing about polynomially in N up to N = 100, while BootDQN without prior and DQN with
epsilon-greedy fail beyond N of about 20 [M: from memory of [2] Sec. 5.1; not re-read].
[1] Table/Fig.: on Atari, Bootstrapped DQN (K = 10, p = 1 in most games) beats DQN in
cumulative reward over the 57 games [M].

Constants checked against bsuite's released agent: 20 members, prior_scale 5 (the brief said
3; the file reads 5), MLP [50, 50] for both f and p, adam(1e-3), batch 128, discount 0.99,
replay 10,000, min replay 128, one SGD step per env step, target copy every 4 SGD steps,
mask_prob 1.0, noise_scale 0, epsilon 0, loss mean(m * td^2) over the batch (not divided by
the mask's sum), head redrawn when an episode ends.

Differences from the papers:
- Defaults are [2]'s / bsuite's DeepSea agent (K separate networks, the released code), not
  [1]'s Atari agent (shared conv torso, K = 10, p = 0.5 or 1, RMSProp, Huber loss). The
  shared torso is behind `--shared-torso` (heads = the last linear layer, torso gradient
  scaled by 1/K as [1]); no conv torso or Atari preset here.
- bsuite initialises the target networks (prior included) independently of the online ones
  until the first copy; here they start as copies, the prior shared by online and target.
- bsuite draws ties of the greedy action uniformly; here argmax takes the first (ties have
  probability ~0 with a prior). bsuite's reward noise (noise_scale, 0 in its default) is left
  out. flax's lecun-normal init stands for haiku's truncated-normal fan-in init.
- `--num-envs` > 1 steps several envs together, each with its own head (bsuite: one env).
  `--resample step` (a head drawn at every step) is the ablation [1] Sec. 5 argues against.
- The `quick` preset departs from bsuite to fit a loaded 2-core CPU: N = 10, 10 heads,
  batch 32, 300 episodes.
Metrics: charts/first_success (finished episodes, all envs, when the treasure was first
reached) is NaN until it is reached; charts/episodic_return is NaN in updates where no
episode ended.
"""

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from common import dqn, envs, run

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """Bootstrapped DQN + randomized priors; defaults are bsuite's boot_dqn on DeepSea ([2])."""

    env_id: str = "DeepSea-bsuite"
    """environment id (gymnax e.g. DeepSea-bsuite, navix, GridMaze-*)"""
    deepsea_size: int = 20
    """DeepSea only: grid size N (or name the size in the id: DeepSea-bsuite-<N>)"""
    total_timesteps: int = 200_000
    """environment steps over all envs (10,000 episodes of DeepSea N = 20)"""
    num_envs: int = 1
    """parallel environments (each acts with its own head)"""
    num_heads: int = 20
    """ensemble size K (bsuite 20; [1] 10)"""
    mask_prob: float = 1.0
    """p of the Bernoulli bootstrap mask per transition and head (bsuite 1.0; [1] 0.5)"""
    prior_scale: float = 5.0
    """beta: Q_k = f_k + beta p_k with p_k a fixed random network; 0 switches priors off"""
    shared_torso: bool = False
    """K heads on one torso with its gradient scaled by 1/K ([1]); else K networks (bsuite)"""
    resample: str = "episode"
    """when the acting head is drawn: episode ([1]) or step (ablation, no deep exploration)"""
    hidden: tuple[int, ...] = (50, 50)
    """hidden layer sizes of each Q-network and prior network"""
    lr: float = 1e-3
    """Adam learning rate"""
    batch_size: int = 128
    """minibatch size (one minibatch for all heads)"""
    gamma: float = 0.99
    """discount"""
    buffer_size: int = 10_000
    """replay capacity in transitions"""
    learning_starts: int = 128
    """transitions collected before the first gradient update"""
    train_every: int = 1
    """vector-env steps between gradient updates"""
    target_update_period: int = 4
    """gradient updates between target-network copies"""
    double_q: bool = False
    """Double-DQN target per head (bsuite: plain Q-learning target)"""
    eps_start: float = 0.0
    """epsilon at step 0 (0: greedy in the drawn head, as bsuite; the DQN baseline uses 1)"""
    eps_end: float = 0.0
    """final epsilon"""
    eps_decay_steps: int = 1
    """environment steps over which epsilon decays linearly"""
    dtype: str = "float32"
    """compute dtype of the networks (bfloat16 on accelerators)"""

    @property
    def steps_per_update(self) -> int:
        return self.num_envs * self.train_every

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // self.steps_per_update

    @property
    def replay_rows(self) -> int:
        return self.buffer_size // self.num_envs

    def validate(self):
        if self.resample not in ("episode", "step"):
            raise ValueError(f"resample={self.resample!r} must be episode or step")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be float32 or bfloat16")
        for name in ("deepsea_size", "total_timesteps", "num_envs", "num_heads", "batch_size",
                     "train_every", "target_update_period", "eps_decay_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.learning_starts < 0:
            raise ValueError(f"learning_starts={self.learning_starts} must be >= 0")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if self.prior_scale < 0:
            raise ValueError(f"prior_scale={self.prior_scale} must be >= 0")
        for name in ("mask_prob", "gamma", "eps_start", "eps_end"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1]")
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden={self.hidden} must be one or more sizes >= 1")
        if self.replay_rows < 2:
            raise ValueError(f"buffer_size={self.buffer_size} must hold >= 2 rows of "
                             f"num_envs={self.num_envs} transitions")
        if self.num_updates < 1:
            raise ValueError(f"total_timesteps={self.total_timesteps} is less than one update "
                             f"(num_envs * train_every = {self.steps_per_update})")


_QUICK = dict(deepsea_size=10, total_timesteps=3_000, num_heads=10, batch_size=32)
PRESETS = {
    # CPU demo: DeepSea N = 10 (the treasure needs 10 "right" moves in a row; a uniform policy
    # finds it once in 1024 episodes), 300 episodes of one env, 10 heads, batch 32.
    "quick": _QUICK,
    # the epsilon-greedy DQN baseline on the same budget: one head, no prior, 1 -> 0.05
    "quick_epsilon": dict(_QUICK, num_heads=1, prior_scale=0.0, eps_start=1.0, eps_end=0.05,
                          eps_decay_steps=1_500),
    "paper": dict(),
}


COVERAGE_GRID = 64  # the board on which distinct cells are counted (DeepSea up to N = 64)


def make_env(cfg: Config):
    """The batched env, wrapped to count distinct cells and positive episodes (Coverage)."""
    if cfg.env_id == "DeepSea-bsuite":
        env = envs.make(cfg.env_id, cfg.num_envs, size=cfg.deepsea_size)
    else:
        env = envs.make(cfg.env_id, cfg.num_envs)
    return envs.Coverage(env, COVERAGE_GRID)


# --- NETWORKS ---


class MLP(nn.Module):
    """Flatten, ReLU hidden layers, then `out` linear outputs (no output layer if out = 0)."""

    hidden: tuple[int, ...]
    out: int
    dtype: str = "float32"

    @nn.compact
    def __call__(self, obs):
        x = obs.reshape(*obs.shape[:1], -1).astype(self.dtype)
        for h in self.hidden:
            x = nn.relu(nn.Dense(h, dtype=self.dtype)(x))
        return nn.Dense(self.out, dtype=self.dtype)(x) if self.out else x


def networks(cfg: Config, num_actions: int):
    """(body, head, prior): body is the whole Q-network (separate heads) or the shared torso;
    head is the per-head last layer (shared torso only); prior has the Q-network's shape."""
    full = MLP(cfg.hidden, num_actions, cfg.dtype)
    if cfg.shared_torso:
        return MLP(cfg.hidden, 0, cfg.dtype), MLP((), num_actions, cfg.dtype), full
    return full, None, full


def init_params(cfg: Config, num_actions: int, key, obs):
    """Online params {"torso"?, "heads": leaves [K, ...]} and prior params [K, ...]."""
    body, head, prior = networks(cfg, num_actions)
    k_body, k_prior = jax.random.split(key)
    heads = jax.random.split(k_body, cfg.num_heads)
    if cfg.shared_torso:
        torso = body.init(k_body, obs)
        z = body.apply(torso, obs)
        params = {"torso": torso, "heads": jax.vmap(lambda k: head.init(k, z))(heads)}
    else:
        params = {"heads": jax.vmap(lambda k: body.init(k, obs))(heads)}
    prior_params = jax.vmap(lambda k: prior.init(k, obs))(
        jax.random.split(k_prior, cfg.num_heads))
    return params, scale_prior(prior_params, cfg.prior_scale)


def scale_prior(prior_params, beta: float):
    """beta p_k as a network: the last (linear) layer of p_k times beta, so that the prior
    network's output is beta p_k(s) ([2] Eq. 5). Done once at init: `q_values` adds the
    prior's output as it is, and beta = 0 (no prior) runs the same program."""
    last = f"Dense_{len(jax.tree.leaves(prior_params['params'])) // 2 - 1}"
    layers = dict(prior_params["params"])
    layers[last] = jax.tree.map(lambda w: beta * w, layers[last])
    return {"params": layers}


def q_values(cfg: Config, num_actions: int, params, prior_params, obs):
    """Q_k(obs) = f_k(obs) + beta p_k(obs) for every head: [K, B, A], beta p_k being the
    scaled prior network of `scale_prior`; no gradient reaches the prior ([2] Eq. 5)."""
    body, head, prior = networks(cfg, num_actions)
    if cfg.shared_torso:
        z = body.apply(params["torso"], obs)
        f = jax.vmap(lambda p: head.apply(p, z))(params["heads"])
    else:
        f = jax.vmap(lambda p: body.apply(p, obs))(params["heads"])
    p = jax.vmap(lambda pp: prior.apply(pp, obs))(jax.lax.stop_gradient(prior_params))
    return f.astype(jnp.float32) + p.astype(jnp.float32)  # beta is inside p (scale_prior)


def masked_td_loss(q, action, target, mask):
    """[1] Alg. 1 / bsuite: per-head L_k = 1/B sum_b m_{b,k} (y_{b,k} - Q_k(s_b, a_b))^2.
    q [K, B, A], action [B], target [K, B], mask [B, K] -> [K]."""
    q_a = jnp.take_along_axis(q, action[None, :, None].astype(jnp.int32), -1)[..., 0]
    return (mask.T * (target - q_a) ** 2).mean(-1)


def loss_fn(params, target_params, prior_params, cfg, num_actions, cur, nxt):
    """Sum over heads of the masked TD losses, each head's target from its own target net."""
    q = q_values(cfg, num_actions, params, prior_params, cur["obs"])
    q_next = q_values(cfg, num_actions, target_params, prior_params, nxt["obs"])
    q_sel = q_values(cfg, num_actions, params, prior_params, nxt["obs"]) if cfg.double_q \
        else None
    discount = cfg.gamma * (1.0 - cur["done"].astype(jnp.float32))
    y = dqn.td_target(cur["reward"], discount, q_next, q_sel)  # [K, B]
    per_head = masked_td_loss(q, cur["action"], y, cur["mask"].astype(jnp.float32))
    return per_head.sum(), per_head


def normalise_torso(grads, cfg: Config):
    """[1]: the shared torso's gradient, a sum over the K heads' losses, scaled by 1/K."""
    if not cfg.shared_torso:
        return grads
    return dict(grads, torso=jax.tree.map(lambda g: g / cfg.num_heads, grads["torso"]))


def draw_heads(key, num_envs: int, num_heads: int):
    return jax.random.randint(key, (num_envs,), 0, num_heads)


def next_heads(key, head, done, cfg: Config):
    """The acting head after a step: redrawn where an episode ended ([1] Alg. 1), or at every
    step with `resample="step"` (the ablation)."""
    fresh = draw_heads(key, head.shape[0], cfg.num_heads)
    return fresh if cfg.resample == "step" else jnp.where(done, fresh, head)


# --- STATE ---


@struct.dataclass
class State:
    params: Any
    target_params: Any
    prior_params: Any  # fixed random prior networks, never updated
    opt_state: Any
    replay: dqn.Replay
    env_state: Any
    obs: jax.Array
    head: jax.Array  # (num_envs,) int32 acting head of each env's episode
    step: jax.Array  # int32 vector-env steps taken
    num_grad: jax.Array  # int32 gradient updates done
    episodes: jax.Array  # float: finished episodes, all envs
    positives: jax.Array  # float: finished episodes with a positive return (treasure)
    first_success: jax.Array  # float: `episodes` when the first positive one ended; -1 before
    key: jax.Array


def init(key, cfg: Config) -> State:
    env = make_env(cfg)
    k_net, k_env, k_head, key = jax.random.split(key, 4)
    obs, env_state = env.reset(k_env)
    params, prior_params = init_params(cfg, env.num_actions, k_net, obs)
    n = cfg.num_envs
    row = dict(obs=obs, action=jnp.zeros(n, jnp.int32), reward=jnp.zeros(n),
               done=jnp.zeros(n, bool), mask=jnp.zeros((n, cfg.num_heads), bool))
    return State(params, params, prior_params, optax.adam(cfg.lr).init(params),
                 dqn.replay_init(row, cfg.replay_rows), env_state, obs,
                 draw_heads(k_head, n, cfg.num_heads), jnp.zeros((), jnp.int32),
                 jnp.zeros((), jnp.int32), jnp.zeros(()), jnp.zeros(()), -jnp.ones(()), key)


# --- UPDATE ---


def update(state: State, cfg: Config):
    env = make_env(cfg)
    num_actions = env.num_actions
    tx = optax.adam(cfg.lr)

    # --- ROLLOUT ---
    def env_step(carry, _):
        s, key = carry
        key, k_act, k_env, k_mask, k_head = jax.random.split(key, 5)
        epsilon = dqn.linear_schedule(s.step * cfg.num_envs, cfg.eps_start, cfg.eps_end,
                                      cfg.eps_decay_steps)
        q = q_values(cfg, num_actions, s.params, s.prior_params, s.obs)  # [K, N, A]
        s_head = s.head[0]  # logged: the head env 0 acts with
        q_head = q[s.head, jnp.arange(cfg.num_envs)]  # each env's episode head
        action = dqn.epsilon_greedy(k_act, q_head, epsilon)
        next_obs, env_state, reward, done, info = env.step(s.env_state, action, k_env)
        mask = jax.random.bernoulli(k_mask, cfg.mask_prob, (cfg.num_envs, cfg.num_heads))
        replay = dqn.replay_add(s.replay, dict(obs=s.obs, action=action, reward=reward,
                                               done=done, mask=mask))
        ended = info["returned_episode"]
        success = ended & (info["returned_episode_return"] > 0)
        episodes = s.episodes + ended.sum()
        first = jnp.where((s.first_success < 0) & success.any(), episodes, s.first_success)
        s = s.replace(replay=replay, env_state=env_state, obs=next_obs,
                      head=next_heads(k_head, s.head, done, cfg), step=s.step + 1,
                      episodes=episodes, positives=s.positives + success.sum(),
                      first_success=first)
        return (s, key), dict(ret=info["returned_episode_return"], ended=ended, eps=epsilon,
                              head=s_head)

    (state, key), traj = jax.lax.scan(env_step, (state, state.key), None, cfg.train_every)

    # --- LEARN ---
    key, k_sample = jax.random.split(key)
    cur, nxt = dqn.replay_sample(state.replay, k_sample, cfg.batch_size)
    (_, per_head), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.target_params, state.prior_params, cfg, num_actions, cur, nxt)
    grads = normalise_torso(grads, cfg)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    learning = state.step * cfg.num_envs >= max(cfg.learning_starts, 2 * cfg.num_envs)
    pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(learning, a, b), new, old)
    params = pick(optax.apply_updates(state.params, updates), state.params)
    opt_state = pick(opt_state, state.opt_state)
    num_grad = state.num_grad + learning.astype(jnp.int32)
    target = pick(dqn.periodic_update(params, state.target_params, num_grad,
                                      cfg.target_update_period), state.target_params)

    n_ended = traj["ended"].sum()
    metrics = {
        "losses/td": per_head.mean(),
        # 0 when no episode ended in the update; the runner logs NaN there (run.NAN_UNLESS)
        "charts/episodic_return": (traj["ret"] * traj["ended"]).sum() / jnp.maximum(n_ended, 1),
        "charts/episodes": n_ended,
        "charts/epsilon": traj["eps"][-1],
        "charts/positive_episodes": state.positives,
        "charts/distinct_cells": state.env_state.visited.sum(),
        # NaN (runner) until the treasure is first reached: then the episodes it took
        "charts/first_success": jnp.maximum(state.first_success, 0.0),
        "charts/solved": (state.first_success >= 0).astype(jnp.float32),
        "charts/mask_fraction": cur["mask"].mean(),
        "charts/head": traj["head"][-1],  # env 0's acting head at the last step
    }
    new = state.replace(params=params, target_params=target, opt_state=opt_state,
                        num_grad=num_grad, key=key)
    return new, metrics


def evaluate(state: State, cfg: Config):
    """Episodes (all envs) until the first positive return (-1: never), how many finished
    episodes had a positive return (DeepSea: the treasure), and the distinct cells visited."""
    return {"first_success": state.first_success, "positive_episodes": state.positives,
            "distinct_cells": state.env_state.visited.sum()}


# --- MAIN ---

NAN_UNLESS = {**run.NAN_UNLESS, "charts/first_success": "charts/solved"}


def plot_scaling(out: str, sizes=(5, 8, 11), seeds: int = 4, episodes: int = 250):
    """Episodes to the first treasure against DeepSea N, bootstrapped+prior (quick) against
    epsilon-greedy DQN (quick_epsilon); a run that never succeeds is drawn at its budget."""
    import matplotlib.pyplot as plt
    import numpy as np

    from common import plot

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for color, name, label in (("C0", "quick", "bootstrapped DQN + prior (K=10)"),
                               ("C1", "quick_epsilon", "DQN, epsilon-greedy")):
        med = []
        for n in sizes:
            cfg = Config(**dict(PRESETS[name], deepsea_size=n, total_timesteps=episodes * n,
                                eps_decay_steps=episodes * n // 2))
            train = jax.jit(jax.vmap(run.make_train(init, update, cfg)))
            state, _ = train(jax.random.split(jax.random.PRNGKey(0), seeds))
            fs = np.asarray(state.first_success)
            fs = np.where(fs < 0, episodes, fs)
            ax.scatter([n] * seeds, fs, s=10, alpha=0.5, color=color)
            med.append(np.median(fs))
            print(name, n, fs)
        ax.plot(sizes, med, "-o", label=label, color=color)
    ax.set(xlabel="DeepSea size N", ylabel="episodes to first treasure", yscale="log",
           title=f"DeepSea, {seeds} seeds (never: drawn at the budget)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return plot.save_png(fig, out)


def main(argv=None):
    flags, argv = run.pop_flags(argv, "--plot")
    if flags["--plot"]:
        return plot_scaling(flags["--plot"])
    return run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                    doc=__doc__, nan_unless=NAN_UNLESS,
                    summary_keys=["first_success", "positive_episodes",
                                  "charts/episodic_return", "losses/td"])


if __name__ == "__main__":
    main()
