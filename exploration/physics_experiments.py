"""Learning to perform physics experiments: "Which is heavier?" with a recurrent A2C agent.

[1] M. Denil, P. Agrawal, T. D. Kulkarni, T. Erez, P. Battaglia, N. de Freitas. "Learning to
    Perform Physics Experiments via Deep Reinforcement Learning." ICLR 2017, arXiv:1611.01843.

A scene holds n blocks whose masses are hidden and redrawn every episode. The agent acts in
two phases ([1] Sec. 2): an exploration phase in which its actions apply forces to blocks and
it watches the consequences, then one labelling action that names the heaviest block; the
episode ends at the label (or at the time limit T, counted as a wrong answer). Nothing
rewards the experiments themselves: the only reward is the label's,

    r = +1 if the named block is the heaviest, -1 otherwise (also at the time limit)   [1] Sec. 2
    actions: push_i (i < n: force F on block i), label_i (i < n: answer i, episode ends)

The environment is a pure-JAX rigid-body toy (this file): block i on its own frictional track,

    v_i <- (1 - friction) v_i + (F / m_i) dt [push_i],   observed v~_i = v_i (1 + sigma eps)
    masses: heavy block h ~ U{0..n-1}, scale s ~ logU[1, mass_scale], m_j = s (j != h),
            m_h = s (1 + max_gap (1 - beta)),   difficulty beta ~ U[beta_min, beta_max]

so the gap m_h / m_j - 1 shrinks linearly to 0 as beta -> 1, and the common scale s makes one
block's acceleration alone uninformative: the agent must compare blocks, i.e. remember what
it saw. The observation is (v~, one-hot previous action, t / T). The agent is an LSTM
actor-critic trained with advantage actor-critic ([1] uses A3C; A2C is its synchronous form):

    h_t = LSTM(MLP(o_t), h_{t-1} [0 at an episode start]),  pi(a | h_t), V(h_t)
    L = -E[log pi(a_t|h_t) A_t] + vf_coef 1/2 E[(V(h_t) - R_t)^2] - ent_coef E[H(pi)]
    R_t = n-step return bootstrapped at the rollout's end (GAE with lambda = 1)

[1]'s findings that this file reproduces in miniature: the agent learns to experiment before
answering, accuracy falls as the task gets harder, and it experiments longer on harder
episodes (here within ONE agent, since beta is drawn per episode and not observed).

Reproduce (CPU demo, 3 blocks; accuracy and episode length against difficulty):
    python exploration/physics_experiments.py --preset quick --num-seeds 2 \
        --plot exploration/physics_experiments.png
Paper-scale setting (GPU; 4 blocks, T = 100, LSTM 100 [M]):
    python exploration/physics_experiments.py --preset paper
Ours (quick: 3 blocks, T = 20, 2.05M steps, 2 seeds, 2000 fresh evaluation episodes each;
loaded 2-core CPU, 114 s wall with compile, 44 s CPU): labelling accuracy 0.969 +- 0.001
against 0.328 for the policy's best label at t = 0 (chance 1/3); timeouts 0.2%; per difficulty
bin beta = 0.09 .. 0.81 (2-seed mean) accuracy 0.996 1.000 0.998 0.984 0.871 and episode
length 3.90 4.08 4.40 5.28 7.60 steps (exploration/physics_experiments.png). So, as in [1]
Fig. 3-4 [M], accuracy falls and experiments lengthen as the mass gap shrinks; harder
episodes are not flagged, the agent stops pushing when its evidence suffices.
The same run with `--no-recurrent` (LSTM state zeroed every step): accuracy 0.736 +- 0.079
in episodes of 9.7 steps: without memory the agent still beats chance by storing evidence in
the world (which block it pushes next, the clock t / T it observes), slowly.

Differences from the paper ([1]'s text could not be re-read in this session; values marked
[M] are recalled, not checked):
- Environment: [1] simulates blocks in MuJoCo and the agent pushes them with forces (feature
  observations) or a "fist" (pixels); here a 1-D toy with independent tracks, velocities
  observed with Gaussian noise, no positions, no collisions, no pixels. "Towers" (count the
  rigid bodies of a tower by knocking it down) is left out.
- Mass distribution: [1] draws masses from a family parametrised by a difficulty beta [M]
  and trains one agent per beta; here the gap m_h / m_j - 1 = max_gap (1 - beta) with all
  light blocks equal and a random common scale, and beta drawn per episode so that ONE run
  gives the accuracy and episode-length curves against beta (the plot).
- Time limit reward: counted as a wrong label (-1), so that never answering does not pay.
- Agent: A2C (synchronous, Adam, n-step returns over `num_steps`), not asynchronous A3C with
  RMSProp; the feature agent's sizes (MLP, LSTM 100, gamma 0.95 [M]) are recalled.
- Observation: velocities plus the previous action and t / T (the latter two let even a
  memoryless agent keep a little state, see above); [1]'s feature observations [M] differ.
- Broken variants (for the tests): `recurrent=False` zeroes the LSTM state at every step (no
  memory), `masses_matter=False` pushes every block as if m = 1 (the label is then a coin).
"""

from dataclasses import dataclass
from typing import Any

import distrax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from common import run
from common.nets import ResetLSTM, orthogonal, scan_rnn
from common.plot import save_png
from common.rl import gae, minibatch_epochs

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """Which is heavier? with a recurrent A2C agent; defaults: [1]'s feature setting [M]."""

    num_blocks: int = 4
    """n: blocks in the scene (the labelling action names one of them)"""
    max_steps: int = 100
    """T: time limit of an episode (no label by then counts as wrong)"""
    force: float = 1.0
    """F: force of one push"""
    dt: float = 1.0
    """integration step of the dynamics"""
    friction: float = 1.0
    """fraction of a block's velocity lost per step (1: a push shows only in its own step)"""
    obs_noise: float = 0.1
    """sigma: relative std of the velocity sensor, v~ = v (1 + sigma eps)"""
    mass_scale: float = 10.0
    """common mass scale s ~ log-uniform[1, mass_scale], drawn per episode"""
    max_gap: float = 1.0
    """heavy / light mass ratio - 1 at difficulty beta = 0"""
    beta_min: float = 0.0
    """lowest difficulty beta drawn per episode"""
    beta_max: float = 0.9
    """highest difficulty beta drawn per episode (gap max_gap (1 - beta))"""
    masses_matter: bool = True
    """broken variant when false: pushes accelerate every block as if its mass were 1"""
    recurrent: bool = True
    """broken variant when false: the LSTM state is zeroed at every step (no memory)"""
    total_timesteps: int = 50_000_000
    """environment steps of the whole run"""
    num_envs: int = 256
    """parallel episodes (A3C's workers)"""
    num_steps: int = 20
    """steps per env per rollout (the n of the n-step return)"""
    mlp: int = 100
    """units of the observation MLP layer before the LSTM"""
    hidden: int = 100
    """LSTM units"""
    lr: float = 1e-4
    """Adam learning rate"""
    gamma: float = 0.95
    """discount (lower: experiments cost more)"""
    ent_coef: float = 0.01
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 40.0
    """global gradient-norm clip"""
    eval_episodes: int = 2000
    """evaluate(): fresh episodes played by the final policy"""
    eval_bins: int = 5
    """evaluate(): difficulty bins of the accuracy and length curves"""
    dtype: str = "float32"
    """compute dtype of the MLP and heads: float32 or bfloat16 (params and LSTM: float32)"""

    @property
    def num_actions(self) -> int:
        return 2 * self.num_blocks

    @property
    def obs_dim(self) -> int:
        return self.num_blocks + self.num_actions + 1

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
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")
        for name in ("num_blocks", "max_steps", "num_envs", "num_steps", "mlp", "hidden",
                     "eval_episodes", "eval_bins"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got "
                                 f"{getattr(self, name)}")
        if self.num_blocks < 2:
            raise ValueError(f"num_blocks={self.num_blocks} must be >= 2 (which is heavier?)")
        if not 0.0 <= self.beta_min <= self.beta_max <= 1.0:
            raise ValueError(f"need 0 <= beta_min={self.beta_min} <= beta_max="
                             f"{self.beta_max} <= 1")
        if self.mass_scale < 1.0 or self.max_gap <= 0 or self.force <= 0 or self.dt <= 0:
            raise ValueError(f"need mass_scale={self.mass_scale} >= 1, max_gap={self.max_gap}"
                             f", force={self.force}, dt={self.dt} > 0")
        if not 0.0 <= self.friction <= 1.0 or self.obs_noise < 0:
            raise ValueError(f"need friction={self.friction} in [0, 1], obs_noise="
                             f"{self.obs_noise} >= 0")
        if self.num_updates < 1:
            raise ValueError(f"total_timesteps={self.total_timesteps} is less than one rollout "
                             f"(num_envs * num_steps = {self.batch_size})")


PRESETS = {
    # CPU demo: 3 blocks, 20 steps, small nets; a few minutes on 2 cores.
    "quick": dict(num_blocks=3, max_steps=20, num_envs=64, num_steps=10, mlp=32, hidden=32,
                  lr=5e-3, total_timesteps=2_048_000),
    "paper": dict(),
}

# --- ENVIRONMENT ---


@struct.dataclass
class EnvState:
    v: jax.Array  # [n] velocities
    mass: jax.Array  # [n] hidden masses (resampled at every reset)
    beta: jax.Array  # () this episode's difficulty
    t: jax.Array  # () steps taken in this episode
    prev_action: jax.Array  # () previous action, -1 at an episode start


def sample_masses(key, cfg: Config):
    """A new episode's hidden masses and difficulty: (mass [n], beta)."""
    k_h, k_s, k_b = jax.random.split(key, 3)
    beta = jax.random.uniform(k_b, (), minval=cfg.beta_min, maxval=cfg.beta_max)
    s = jnp.exp(jax.random.uniform(k_s, (), maxval=jnp.log(cfg.mass_scale)))
    heavy = jax.random.randint(k_h, (), 0, cfg.num_blocks)
    ratio = 1.0 + cfg.max_gap * (1.0 - beta)  # gap shrinks with difficulty
    mass = s * jnp.where(jnp.arange(cfg.num_blocks) == heavy, ratio, 1.0)
    return mass, beta


def env_reset(key, cfg: Config) -> EnvState:
    mass, beta = sample_masses(key, cfg)
    return EnvState(jnp.zeros(cfg.num_blocks), mass, beta, jnp.zeros((), jnp.int32),
                    -jnp.ones((), jnp.int32))


def observe(s: EnvState, key, cfg: Config):
    """(noisy velocities [n], one-hot previous action [2n], t / T)."""
    noisy = s.v * (1.0 + cfg.obs_noise * jax.random.normal(key, s.v.shape))  # relative error
    prev = jax.nn.one_hot(s.prev_action, cfg.num_actions)  # zeros at an episode start
    return jnp.concatenate([noisy, prev, (s.t / cfg.max_steps)[None]])


def env_step(s: EnvState, action, key, cfg: Config, masses_matter=True):
    """One step of one env with auto-reset. Returns (obs, state, reward, done, info)."""
    k_obs, k_reset = jax.random.split(key)
    n = cfg.num_blocks
    push = (action < n) * jax.nn.one_hot(action, n)  # push_i: force F on block i
    mass = jnp.where(masses_matter, s.mass, 1.0)
    v = (1.0 - cfg.friction) * s.v + push * cfg.force / mass * cfg.dt  # a = F / m
    labelled = action >= n
    correct = labelled & (action - n == jnp.argmax(s.mass))
    t = s.t + 1
    timeout = (t >= cfg.max_steps) & ~labelled
    done = labelled | timeout
    reward = jnp.where(correct, 1.0, jnp.where(done, -1.0, 0.0))  # +1 right, -1 wrong/timeout
    nxt = EnvState(v, s.mass, s.beta, t, action)
    fresh = env_reset(k_reset, cfg)
    nxt = jax.tree.map(lambda a, b: jnp.where(done, a, b), fresh, nxt)
    info = dict(labelled=labelled, correct=correct, length=t, beta=s.beta)
    return observe(nxt, k_obs, cfg), nxt, reward, done, info


# --- NETWORKS ---


class RecurrentActorCritic(nn.Module):
    """o_t -> Dense + relu -> LSTM -> (logits, V). `__call__(carry, obs [T, B, D], reset
    [T, B]) -> (carry, logits [T, B, 2n], V [T, B])`."""

    num_actions: int
    mlp: int
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, carry, obs, reset):
        x = nn.relu(nn.Dense(self.mlp, kernel_init=orthogonal(), dtype=self.dtype)(obs))
        carry, y = scan_rnn(ResetLSTM)(self.hidden, name="lstm")(carry, (x, reset))
        logits = nn.Dense(self.num_actions, kernel_init=orthogonal(0.01), dtype=self.dtype)(y)
        v = nn.Dense(1, kernel_init=orthogonal(1.0), dtype=self.dtype)(y)[..., 0]
        return carry, logits.astype(jnp.float32), v.astype(jnp.float32)


def network(cfg: Config) -> RecurrentActorCritic:
    return RecurrentActorCritic(cfg.num_actions, cfg.mlp, cfg.hidden, jnp.dtype(cfg.dtype))


# --- LOSS ---


def a2c_loss(logp, adv, entropy, value, returns, vf_coef, ent_coef):
    """A3C's loss ([1] Sec. 3): -E[log pi A] + vf_coef 1/2 E[(V - R)^2] - ent_coef E[H]."""
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
    env_state: EnvState  # batched [N]
    obs: jax.Array  # [N, D]
    start: jax.Array  # [N] obs begins an episode (zero the LSTM state before it)
    carry: tuple  # LSTM (c, h) [N, hidden] each
    key: jax.Array
    recurrent: jax.Array  # bool, cfg.recurrent traced (a vmapped run can mix variants)
    masses_matter: jax.Array  # bool, cfg.masses_matter traced


def make_optimizer(cfg: Config):
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), optax.adam(cfg.lr))


def init(key, cfg: Config) -> State:
    k_net, k_env, k_obs, key = jax.random.split(key, 4)
    env_state = jax.vmap(env_reset, (0, None))(jax.random.split(k_env, cfg.num_envs), cfg)
    obs = jax.vmap(observe, (0, 0, None))(env_state, jax.random.split(k_obs, cfg.num_envs), cfg)
    carry = ResetLSTM(cfg.hidden).initialize_carry((cfg.num_envs,))
    start = jnp.ones(cfg.num_envs, bool)
    params = network(cfg).init(k_net, carry, obs[None], start[None])
    return State(params, make_optimizer(cfg).init(params), env_state, obs, start, carry, key,
                 jnp.asarray(cfg.recurrent), jnp.asarray(cfg.masses_matter))


# --- ROLLOUT ---


def rollout(params, cfg: Config, env_state, obs, start, carry, key, num_steps, recurrent,
            masses_matter):
    """`num_steps` steps of every env, the LSTM state carried step to step and zeroed at
    episode starts (or at every step when not `recurrent`); traj leaves [T, N, ...]."""
    net = network(cfg)
    step_envs = jax.vmap(env_step, (0, 0, 0, None, None))

    def step(c, k):
        env_state, obs, start, carry = c
        k_act, k_env = jax.random.split(k)
        reset = start | ~recurrent
        carry, logits, value = net.apply(params, carry, obs[None], reset[None])
        pi = distrax.Categorical(logits=logits[0])
        action = pi.sample(seed=k_act)
        obs2, env_state2, reward, done, info = step_envs(
            env_state, action, jax.random.split(k_env, obs.shape[0]), cfg, masses_matter)
        tr = dict(obs=obs, reset=reset, action=action, logp=pi.log_prob(action),
                  value=value[0], reward=reward, done=done, **info)
        return (env_state2, obs2, done, carry), tr

    return jax.lax.scan(step, (env_state, obs, start, carry), jax.random.split(key, num_steps))


# --- UPDATE ---


def update(state: State, cfg: Config):
    net = network(cfg)
    key, k_roll, k_epoch = jax.random.split(state.key, 3)
    (env_state, obs, start, carry), traj = rollout(
        state.params, cfg, state.env_state, state.obs, state.start, state.carry, k_roll,
        cfg.num_steps, state.recurrent, state.masses_matter)
    _, _, last_value = net.apply(state.params, carry, obs[None],
                                 (start | ~state.recurrent)[None])
    # n-step returns R_t = sum_k gamma^k r_{t+k} + gamma^n V(s_{t+n}) (GAE at lambda = 1)
    adv, returns = gae(traj["reward"], traj["value"], traj["done"], last_value[0], cfg.gamma,
                       1.0)
    batch = {k: jnp.swapaxes(traj[k], 0, 1) for k in ("obs", "reset", "action")}  # (N, T, .)
    batch.update(adv=adv.T, ret=returns.T, c0=state.carry[0], h0=state.carry[1])

    def loss_fn(params, mb):
        seq = lambda x: jnp.swapaxes(x, 0, 1)  # (N, T, ...) -> (T, N, ...)
        _, logits, value = net.apply(params, (mb["c0"], mb["h0"]), seq(mb["obs"]),
                                     seq(mb["reset"]))
        pi = distrax.Categorical(logits=logits)
        return a2c_loss(pi.log_prob(seq(mb["action"])), seq(mb["adv"]), pi.entropy(), value,
                        seq(mb["ret"]), cfg.vf_coef, cfg.ent_coef)

    params, opt_state, metrics = minibatch_epochs(k_epoch, state.params, state.opt_state, batch,
                                                  loss_fn, make_optimizer(cfg), 1, 1)
    n_ended = traj["done"].sum()
    ended = jnp.maximum(n_ended, 1)
    metrics.update({
        "charts/episodic_return": (traj["reward"] * traj["done"]).sum() / ended,
        "charts/episodes": n_ended,
        "charts/accuracy": traj["correct"].sum() / ended,
        "charts/episode_length": (traj["length"] * traj["done"]).sum() / ended})
    new = state.replace(params=params, opt_state=opt_state, env_state=env_state, obs=obs,
                        start=start, carry=carry, key=key)
    return new, metrics


# --- EVALUATE ---


def binned(x, beta, mask, cfg: Config):
    """Mean of x over the episodes in `mask`, per difficulty bin of [beta_min, beta_max]."""
    width = max(cfg.beta_max - cfg.beta_min, 1e-6) / cfg.eval_bins
    b = jnp.clip(((beta - cfg.beta_min) / width).astype(jnp.int32), 0, cfg.eval_bins - 1)
    onehot = jax.nn.one_hot(b, cfg.eval_bins) * mask[:, None]
    return (onehot * x[:, None]).sum(0) / jnp.maximum(onehot.sum(0), 1)


def evaluate(state: State, cfg: Config):
    """`eval_episodes` fresh episodes, each the first episode of a new env, played by the
    final policy for up to T steps: labelling accuracy, episode length (time spent
    experimenting + the label), `timeouts`, the same per difficulty bin (`acc/<i>`,
    `length/<i>`), and `accuracy_t0`, the accuracy of the policy's best label at t = 0 (an
    agent forced to answer before any experiment; 1/n by symmetry)."""
    n_ep = cfg.eval_episodes
    k_env, k_obs, k_roll = jax.random.split(jax.random.fold_in(state.key, 1), 3)
    env_state = jax.vmap(env_reset, (0, None))(jax.random.split(k_env, n_ep), cfg)
    obs = jax.vmap(observe, (0, 0, None))(env_state, jax.random.split(k_obs, n_ep), cfg)
    carry = ResetLSTM(cfg.hidden).initialize_carry((n_ep,))
    start = jnp.ones(n_ep, bool)
    _, logits0, _ = network(cfg).apply(state.params, carry, obs[None], start[None])
    first_label = jnp.argmax(logits0[0, :, cfg.num_blocks:], -1)
    _, traj = rollout(state.params, cfg, env_state, obs, start, carry, k_roll, cfg.max_steps,
                      state.recurrent, state.masses_matter)
    first = (jnp.cumsum(traj["done"], 0) - traj["done"]) == 0  # steps of the first episode
    end = (traj["done"] & first).astype(jnp.float32)  # (T, N): one 1 per env
    correct = (traj["correct"] * end).sum(0)
    length = (traj["length"] * end).sum(0)
    beta = env_state.beta
    ones = jnp.ones(n_ep, bool)
    out = {"accuracy": correct.mean(), "episode_length": length.mean(),
           "timeouts": ((traj["done"] & ~traj["labelled"]) * end).sum(0).mean(),
           "accuracy_t0": (first_label == jnp.argmax(env_state.mass, -1)).mean()}
    acc, ln = binned(correct, beta, ones, cfg), binned(length, beta, ones, cfg)
    out |= {f"acc/{i}": acc[i] for i in range(cfg.eval_bins)}
    out |= {f"length/{i}": ln[i] for i in range(cfg.eval_bins)}
    return out


# --- PLOT ---


def plot(final, cfg: Config, out: str):
    """Labelling accuracy and episode length against difficulty beta (seed mean +- std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = (cfg.beta_max - cfg.beta_min) / cfg.eval_bins
    x = cfg.beta_min + width * (np.arange(cfg.eval_bins) + 0.5)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, name, label in ((axes[0], "acc", "labelling accuracy"),
                            (axes[1], "length", "episode length (steps)")):
        y = np.stack([np.atleast_1d(final[f"{name}/{i}"]) for i in range(cfg.eval_bins)], -1)
        m, s = y.mean(0), y.std(0)
        ax.errorbar(x, m, yerr=s, marker="o", capsize=3, label=f"A2C-LSTM ({y.shape[0]} seeds)")
        ax.set_xlabel("difficulty beta (mass gap = max_gap (1 - beta))")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].axhline(1 / cfg.num_blocks, color="gray", ls=":", label="answer at t = 0")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Which is heavier? ({cfg.num_blocks} blocks, T = {cfg.max_steps})")
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    """The runner's CLI plus `--plot PNG` (accuracy and length against difficulty)."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=__doc__, summary_keys=["accuracy", "episode_length", "accuracy_t0",
                                              "timeouts", "charts/accuracy"])
    if flags["--plot"] is not None:
        cfg = run.parse(Config, PRESETS, argv)[0]
        print("wrote", plot(res.final, cfg, flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
