"""CEM-RL: a cross-entropy-method population of actors, half of them improved by TD3.

[1] A. Pourchot, O. Sigaud. "CEM-RL: Combining evolutionary and gradient-based methods for
    policy search." ICLR 2019, arXiv:1810.01222. Reference code: apourchot/CEM-RL
    (es_grad.py, ES.py `sepCEM`, commit 1a45822).
[2] S. Fujimoto, H. van Hoof, D. Meger. "Addressing Function Approximation Error in
    Actor-Critic Methods" (TD3). ICML 2018, arXiv:1802.09477.
[3] L. Weng. "Evolution Strategies", Lil'Log 2019 (the post; its b/c wording suggests two
    disjoint halves, one evaluated and one trained: in [1] ALL actors are evaluated).

The CEM keeps a Gaussian N(mu, diag(var)) over the flat actor parameters. One generation
([1] Algorithm 1):

    pi_i ~ N(mu, diag(var)),  i = 1..N   (antithetic pairs when N is even, as in [1]'s code)
    for i in 1..N*rl_fraction (the "gradient half"), one after the other:
        train the shared twin critic for 2*S/N steps with target actor pi_i     [1] Alg. 1
        train pi_i for S steps on -Q1(s, pi_i(s)) (fresh Adam)                  [1] Alg. 1
    evaluate ALL N actors for one episode: return = fitness, transitions -> replay buffer
    CEM update from the K best (all actors; the trained ones with their new parameters):
        lambda_i = log((K+1)/i) / sum_j log((K+1)/j)                            [1] Sec. 4
        eps      <- tau_eps * eps + (1 - tau_eps) * eps_end   [1] code (ES.py sepCEM.tell)
        mu_new   = sum_i lambda_i z_i                                           [1] Eq. (1)
        var_new  = sum_i lambda_i (z_i - mu_old)^2 + eps   (eps decayed first)   [1] Eq. (2)
    (z_i the elites, best first; the equation numbers of [1] are from memory [mem].)
    (S = env steps of the previous generation; gradients start after `start_steps`.)

TD3 critic step [2], batch B from the buffer:
    a' = clip(pi'(s') + clip(N(0, policy_noise^2), -noise_clip, noise_clip), -a_max, a_max)
    y  = r + gamma (1 - terminated) min(Q1'(s', a'), Q2'(s', a'))    [2] Eq. (10), (15) [mem]
    L  = mean (Q1(s, a) - y)^2 + mean (Q2(s, a) - y)^2;  theta' <- tau theta + (1-tau) theta'

Reproduce (CPU demo, gymnax Pendulum-v1; CEM-RL vs the same code with --rl-fraction 0):
    python evolution/cem_rl.py --preset quick --num-seeds 4
    python evolution/cem_rl.py --preset quick --num-seeds 4 --rl-fraction 0
    2-core CPU, 4 seeds at once, 40k env steps each: 15 s compile + 25 s run (pure CEM
    8 s + 1 s). Mean-actor return at 40k steps (last generation, 5 episodes, mean +- std
    over seeds): CEM-RL -156 +- 23 vs pure CEM -1159 +- 129 (random actor about -1300);
    curves in evolution/cem_rl_pendulum.png.
Paper setting (GPU; brax halfcheetah stands in for MuJoCo HalfCheetah-v2, 1M steps):
    python evolution/cem_rl.py --preset paper
[1] Table 1: CEM-TD3 reaches 10725 +- 397 on HalfCheetah-v2 after 1M steps [mem].

Differences from the paper:
- Gradient steps per generation are static: S = pop_size * episode_steps (exact for
  Pendulum and HalfCheetah, whose episodes never end early), times `grad_steps_ratio`
  (1.0 = [1]; the CPU preset uses fewer to fit a 2-core CPU).
- TD3's delayed policy update is the schedule of Algorithm 1 (critic 2S/N steps, each actor
  S steps), as in [1]; there is no per-step delay and no target actor beyond pi_i itself
  (during the critic phase pi_i is unchanged, so [1]'s code's target actor equals pi_i).
- Target-policy noise is scaled by the action bound a_max as in TD3's code; [1]'s code
  does not scale it (identical for HalfCheetah, a_max = 1).
- The variance uses the paper's weighted form; [1]'s ES.py multiplies the weighted sum by
  an extra 1/K. `sigma_init` is the initial VARIANCE per coordinate, as in [1]'s code.
- No elitism, no importance mixing ([1]'s best variant omits it), no CMA-ES switch.
- flax default initialisation (lecun normal) instead of PyTorch's; critic leaky-ReLU and
  actor tanh as in [1]'s code, no layer norm.
- The mean actor is evaluated every generation over `eval_episodes` episodes (not counted
  as env steps, not stored), [1] does it every 5000 steps.
- brax halfcheetah (generalized backend) instead of MuJoCo HalfCheetah-v2.
"""

import functools
from dataclasses import dataclass
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from common import envs, run

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """CEM-RL with TD3; defaults are [1]'s (MuJoCo, 1M steps)."""

    env_id: str = "brax/halfcheetah"
    """environment id (gymnax e.g. Pendulum-v1, or brax/<name>); continuous actions"""
    episode_steps: int = 1000
    """steps per evaluation episode (the env's time limit: 200 for Pendulum)"""
    total_timesteps: int = 1_000_000
    """environment steps of the population (mean-actor evaluations not counted)"""
    pop_size: int = 10
    """CEM population size N"""
    num_elites: int = 5
    """elites K used to update the CEM distribution ([1]: N/2)"""
    rl_fraction: float = 0.5
    """fraction of the population that takes TD3 gradient steps (0: pure CEM)"""
    sigma_init: float = 1e-3
    """initial variance of every coordinate of the CEM Gaussian"""
    eps_init: float = 1e-3
    """initial additive variance noise eps"""
    eps_end: float = 1e-5
    """limit of the additive variance noise"""
    eps_tau: float = 0.95
    """decay of eps per generation: eps <- tau eps + (1 - tau) eps_end"""
    antithetic: bool = True
    """sample the population in mirrored pairs (as [1]'s code for even N)"""
    start_steps: int = 10_000
    """gradient steps start once more env steps than this are in the buffer"""
    grad_steps_ratio: float = 1.0
    """gradient steps per env step of the previous generation (1.0 = [1])"""
    buffer_size: int = 1_000_000
    """replay buffer capacity (transitions)"""
    batch_size: int = 100
    """TD3 minibatch size"""
    actor_lr: float = 1e-3
    """Adam learning rate of the actors (optimizer state reset for every actor)"""
    critic_lr: float = 1e-3
    """Adam learning rate of the critic"""
    gamma: float = 0.99
    """discount"""
    tau: float = 0.005
    """soft target update rate of the critic"""
    policy_noise: float = 0.2
    """std of the target policy smoothing noise (times the action bound)"""
    noise_clip: float = 0.5
    """clip of the target policy smoothing noise (times the action bound)"""
    actor_hidden: tuple[int, ...] = (400, 300)
    """hidden sizes of the actor MLP (tanh)"""
    critic_hidden: tuple[int, ...] = (400, 300)
    """hidden sizes of each critic MLP (leaky ReLU)"""
    eval_episodes: int = 10
    """episodes of the mean actor per generation (charts/mean_actor_return)"""

    @property
    def num_grad(self) -> int:
        return int(round(self.pop_size * self.rl_fraction))

    @property
    def steps_per_update(self) -> int:
        return self.pop_size * self.episode_steps

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // self.steps_per_update

    @property
    def actor_steps(self) -> int:
        return int(round(self.grad_steps_ratio * self.steps_per_update))

    @property
    def critic_steps(self) -> int:  # 2 S / N per actor for rl_fraction = 1/2
        return int(round(self.actor_steps / max(self.num_grad, 1)))

    def validate(self):
        if self.pop_size < 2:
            raise ValueError(f"pop_size={self.pop_size} must be >= 2")
        if not 1 <= self.num_elites <= self.pop_size:
            raise ValueError(f"num_elites={self.num_elites} must be in [1, pop_size]")
        if not 0.0 <= self.rl_fraction <= 1.0:
            raise ValueError(f"rl_fraction={self.rl_fraction} must be in [0, 1]")
        if self.num_updates < 1:
            raise ValueError(f"total_timesteps={self.total_timesteps} is less than one "
                             f"generation (pop_size * episode_steps = {self.steps_per_update})")
        if self.buffer_size < self.steps_per_update:
            raise ValueError(f"buffer_size={self.buffer_size} must hold one generation "
                             f"({self.steps_per_update} transitions)")
        if self.num_grad and (self.actor_steps < 1 or self.critic_steps < 1):
            raise ValueError(f"grad_steps_ratio={self.grad_steps_ratio} gives no gradient "
                             "steps per generation")
        if self.sigma_init <= 0 or self.eps_init < 0 or self.eps_end < 0:
            raise ValueError("sigma_init must be > 0 and eps_init, eps_end >= 0")
        if not 0.0 <= self.eps_tau <= 1.0:
            raise ValueError(f"eps_tau={self.eps_tau} must be in [0, 1]")
        if self.batch_size < 1 or self.eval_episodes < 1:
            raise ValueError("batch_size and eval_episodes must be >= 1")


PRESETS = {
    # CPU demo: 40k steps of Pendulum, small networks, a quarter of [1]'s gradient steps.
    "quick": dict(env_id="Pendulum-v1", episode_steps=200, total_timesteps=40_000,
                  start_steps=2_000, grad_steps_ratio=0.25, buffer_size=100_000,
                  actor_hidden=(64, 64), critic_hidden=(64, 64), eval_episodes=5),
    "paper": dict(env_id="brax/halfcheetah", episode_steps=1000, total_timesteps=1_000_000),
}

# --- NETWORKS ---


class Actor(nn.Module):
    hidden: tuple[int, ...]
    action_dim: int
    max_action: float

    @nn.compact
    def __call__(self, obs):
        x = obs
        for h in self.hidden:
            x = jnp.tanh(nn.Dense(h)(x))
        return self.max_action * jnp.tanh(nn.Dense(self.action_dim)(x))


class Critic(nn.Module):
    """Twin Q networks Q1, Q2 of (s, a) ([2] clipped double-Q)."""

    hidden: tuple[int, ...]

    @nn.compact
    def __call__(self, obs, action):
        qs = []
        for _ in range(2):
            x = jnp.concatenate([obs, action], -1)
            for h in self.hidden:
                x = nn.leaky_relu(nn.Dense(h)(x))
            qs.append(nn.Dense(1)(x)[..., 0])
        return qs[0], qs[1]


class Nets(NamedTuple):
    env: Any  # common.envs.Env (one unbatched env)
    actor: Actor
    critic: Critic
    obs_dim: int
    action_dim: int
    max_action: float
    shapes: tuple  # actor parameter leaf shapes (for the flat genome)
    treedef: Any
    num_params: int

    def unravel(self, flat):
        """Flat genome (D,) -> actor params pytree."""
        sizes = [int(np.prod(s)) for s in self.shapes]
        parts = jnp.split(flat, np.cumsum(sizes)[:-1])
        leaves = [p.reshape(s) for p, s in zip(parts, self.shapes, strict=True)]
        return self.treedef.unflatten(leaves)

    def act(self, genome, obs):
        return self.actor.apply(self.unravel(genome), obs)


def ravel(tree) -> jax.Array:
    return jnp.concatenate([x.reshape(-1) for x in jax.tree.leaves(tree)])


@functools.cache
def make_nets(env_id: str, actor_hidden: tuple, critic_hidden: tuple) -> Nets:
    env = envs.make(env_id, 1).env
    if env.num_actions is not None:
        raise ValueError(f"env_id={env_id!r} has discrete actions; CEM-RL needs continuous")
    high = 1.0
    if hasattr(env.env, "action_space"):  # gymnax: the Box bound
        high = float(np.max(env.env.action_space(env.default_params()).high))
    obs_dim, action_dim = int(np.prod(env.observation_shape)), int(np.prod(env.action_shape))
    actor = Actor(tuple(actor_hidden), action_dim, high)
    tmpl = jax.eval_shape(actor.init, jax.random.key(0), jnp.zeros((obs_dim,)))
    leaves, treedef = jax.tree.flatten(tmpl)
    shapes = tuple(tuple(x.shape) for x in leaves)
    return Nets(env, actor, Critic(tuple(critic_hidden)), obs_dim, action_dim, high, shapes,
                treedef, int(sum(np.prod(s) for s in shapes)))


def nets_of(cfg: Config) -> Nets:
    return make_nets(cfg.env_id, tuple(cfg.actor_hidden), tuple(cfg.critic_hidden))


# --- CEM (ask / tell over a pytree state; minimisation) ---


@struct.dataclass
class CEMState:
    mean: jax.Array  # (D,)
    var: jax.Array  # (D,) diagonal of Sigma
    eps: jax.Array  # () additive variance noise


def cem_init(mean, sigma_init: float, eps_init: float) -> CEMState:
    return CEMState(mean, jnp.full_like(mean, sigma_init), jnp.asarray(eps_init, mean.dtype))


def cem_ask(key, state: CEMState, pop_size: int, antithetic: bool) -> jax.Array:
    """(pop_size, D) samples of N(mean, diag(var)); mirrored pairs when antithetic."""
    d = state.mean.shape[0]
    if antithetic and pop_size % 2 == 0:
        half = jax.random.normal(key, (pop_size // 2, d), state.mean.dtype)
        z = jnp.concatenate([half, -half])
    else:
        z = jax.random.normal(key, (pop_size, d), state.mean.dtype)
    return state.mean + z * jnp.sqrt(state.var)


def cem_weights(num_elites: int) -> jax.Array:
    w = jnp.log((num_elites + 1) / jnp.arange(1, num_elites + 1))  # [1] Sec. 4
    return w / w.sum()


def cem_tell(state: CEMState, pop, fitness, num_elites: int, eps_end: float, eps_tau: float):
    """CEM update from the `num_elites` lowest-fitness members (fitness is minimised)."""
    elites = pop[jnp.argsort(fitness)[:num_elites]]  # (K, D), best first
    w = cem_weights(num_elites).astype(pop.dtype)
    eps = eps_tau * state.eps + (1 - eps_tau) * eps_end  # [1] code: decay, then use
    mean = w @ elites  # [1] Eq. (1)
    var = w @ (elites - state.mean) ** 2 + eps  # [1] Eq. (2): around the OLD mean
    return CEMState(mean, var, eps)


# --- REPLAY BUFFER (pytree ring buffer) ---


class Transition(NamedTuple):
    obs: jax.Array
    action: jax.Array
    reward: jax.Array
    next_obs: jax.Array
    terminated: jax.Array  # 1.0 only for a true terminal (not a time limit)


@struct.dataclass
class Buffer:
    data: Transition  # leaves (capacity, ...)
    pos: jax.Array  # next write index
    size: jax.Array  # number of valid entries


def buffer_init(capacity: int, obs_dim: int, action_dim: int) -> Buffer:
    z = lambda *s: jnp.zeros((capacity, *s), jnp.float32)
    data = Transition(z(obs_dim), z(action_dim), z(), z(obs_dim), z())
    return Buffer(data, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def buffer_add(buf: Buffer, tr: Transition, valid) -> Buffer:
    """Write the rows of `tr` where `valid` (1-D) at the ring position, in order."""
    cap = buf.data.reward.shape[0]
    offset = jnp.cumsum(valid) - 1
    idx = jnp.where(valid, (buf.pos + offset) % cap, cap)  # index cap: dropped
    data = jax.tree.map(lambda d, x: d.at[idx].set(x.astype(d.dtype), mode="drop"), buf.data, tr)
    n = jnp.sum(valid).astype(jnp.int32)
    return Buffer(data, (buf.pos + n) % cap, jnp.minimum(buf.size + n, cap))


def buffer_sample(buf: Buffer, key, batch_size: int) -> Transition:
    idx = jax.random.randint(key, (batch_size,), 0, jnp.maximum(buf.size, 1))
    return jax.tree.map(lambda d: d[idx], buf.data)


# --- LOSS (TD3) ---


def target_noise(key, shape, policy_noise: float, noise_clip: float, max_action: float):
    """Target policy smoothing noise clip(N(0, s^2), -c, c), both scaled by a_max ([2])."""
    n = policy_noise * max_action * jax.random.normal(key, shape)
    return jnp.clip(n, -noise_clip * max_action, noise_clip * max_action)


def td3_target(actor_fn, critic_target_fn, batch: Transition, noise, gamma, max_action):
    """y = r + gamma (1 - d) min_j Q'_j(s', clip(pi'(s') + noise))   [2] Eq. (10), (15)."""
    a2 = jnp.clip(actor_fn(batch.next_obs) + noise, -max_action, max_action)
    q1, q2 = critic_target_fn(batch.next_obs, a2)
    return batch.reward + gamma * (1.0 - batch.terminated) * jnp.minimum(q1, q2)


@struct.dataclass
class CriticState:
    params: Any
    target: Any
    opt_state: Any


def critic_step(nets: Nets, cfg: Config, critic: CriticState, genome, buf: Buffer, key):
    k_b, k_n = jax.random.split(key)
    batch = buffer_sample(buf, k_b, cfg.batch_size)
    noise = target_noise(k_n, batch.action.shape, cfg.policy_noise, cfg.noise_clip,
                         nets.max_action)
    y = td3_target(lambda s: nets.act(genome, s),
                   lambda s, a: nets.critic.apply(critic.target, s, a), batch, noise,
                   cfg.gamma, nets.max_action)
    y = jax.lax.stop_gradient(y)

    def loss_fn(p):
        q1, q2 = nets.critic.apply(p, batch.obs, batch.action)
        return jnp.mean((q1 - y) ** 2) + jnp.mean((q2 - y) ** 2)

    loss, g = jax.value_and_grad(loss_fn)(critic.params)
    upd, opt_state = optax.adam(cfg.critic_lr).update(g, critic.opt_state)
    params = optax.apply_updates(critic.params, upd)
    target = optax.incremental_update(params, critic.target, cfg.tau)
    return CriticState(params, target, opt_state), loss


def actor_loss(nets: Nets, actor_params, critic_params, obs):
    q1, _ = nets.critic.apply(critic_params, obs, nets.actor.apply(actor_params, obs))
    return -jnp.mean(q1)  # deterministic policy gradient through Q1 [2]


# --- UPDATE: the gradient half ---


def rl_phase(nets: Nets, cfg: Config, pop, critic: CriticState, buf: Buffer, key):
    """[1] Alg. 1: for each of the first `num_grad` actors in turn, train the shared critic
    (target actor = that actor), then the actor. The other rows of `pop` are untouched."""
    tx = optax.adam(cfg.actor_lr)

    def one_actor(critic, xs):
        genome, k = xs
        k_c, k_a = jax.random.split(k)

        def c_step(c, kk):
            return critic_step(nets, cfg, c, genome, buf, kk)

        critic, closs = jax.lax.scan(c_step, critic, jax.random.split(k_c, cfg.critic_steps))
        params = nets.unravel(genome)

        def a_step(carry, kk):
            p, opt = carry
            obs = buffer_sample(buf, kk, cfg.batch_size).obs
            loss, g = jax.value_and_grad(actor_loss, 1)(nets, p, critic.params, obs)
            upd, opt = tx.update(g, opt)
            return (optax.apply_updates(p, upd), opt), loss

        (params, _), aloss = jax.lax.scan(a_step, (params, tx.init(params)),
                                          jax.random.split(k_a, cfg.actor_steps))
        return critic, (ravel(params), closs.mean(), aloss.mean())

    n = cfg.num_grad
    critic, (trained, closs, aloss) = jax.lax.scan(one_actor, critic,
                                                   (pop[:n], jax.random.split(key, n)))
    return pop.at[:n].set(trained), critic, closs.mean(), aloss.mean()


# --- ROLLOUT ---


def rollout(nets: Nets, genome, key, num_steps: int):
    """One episode of the deterministic actor; returns (return, transitions (T,), valid (T,)).
    Steps after the episode ended are marked invalid (not stored, no reward)."""
    env, params = nets.env, nets.env.default_params()
    k0, key = jax.random.split(key)
    obs, st = env.reset(k0, params)

    def step(carry, k):
        obs, st, done = carry
        a = nets.act(genome, obs).reshape(env.action_shape)
        obs2, st2, r, term, trunc = env.step(k, st, a, params)
        tr = Transition(obs.reshape(-1), a.reshape(-1), r, obs2.reshape(-1),
                        term.astype(jnp.float32))
        keep = lambda new, old: jax.tree.map(lambda x, y: jnp.where(done, y, x), new, old)
        carry = (keep(obs2, obs), keep(st2, st), done | term | trunc)
        return carry, (tr, ~done)

    init = (obs, st, jnp.zeros((), bool))
    _, (trs, valid) = jax.lax.scan(step, init, jax.random.split(key, num_steps))
    return jnp.sum(trs.reward * valid), trs, valid


# --- TRAIN ---


@struct.dataclass
class State:
    cem: CEMState
    critic: CriticState
    buffer: Buffer
    env_steps: jax.Array
    key: jax.Array


def init(key, cfg: Config) -> State:
    nets = nets_of(cfg)
    k_a, k_c, key = jax.random.split(key, 3)
    mean = ravel(nets.actor.init(k_a, jnp.zeros((nets.obs_dim,))))
    cparams = nets.critic.init(k_c, jnp.zeros((nets.obs_dim,)), jnp.zeros((nets.action_dim,)))
    critic = CriticState(cparams, cparams, optax.adam(cfg.critic_lr).init(cparams))
    buf = buffer_init(cfg.buffer_size, nets.obs_dim, nets.action_dim)
    return State(cem_init(mean, cfg.sigma_init, cfg.eps_init), critic, buf,
                 jnp.zeros((), jnp.int32), key)


def update(state: State, cfg: Config):
    """One generation: ask, TD3 on the gradient half, evaluate all, tell."""
    nets = nets_of(cfg)
    key, k_ask, k_rl, k_ev, k_mu = jax.random.split(state.key, 5)
    pop = cem_ask(k_ask, state.cem, cfg.pop_size, cfg.antithetic)  # (N, D)
    critic, closs, aloss = state.critic, jnp.zeros(()), jnp.zeros(())
    if cfg.num_grad:  # static: --rl-fraction 0 is pure CEM with the same code

        def skip(pop, critic):
            return pop, critic, jnp.zeros(()), jnp.zeros(())

        pop, critic, closs, aloss = jax.lax.cond(
            state.env_steps > cfg.start_steps,
            lambda p, c: rl_phase(nets, cfg, p, c, state.buffer, k_rl), skip, pop, critic)
    ev = jax.vmap(lambda g, k: rollout(nets, g, k, cfg.episode_steps))
    returns, trs, valid = ev(pop, jax.random.split(k_ev, cfg.pop_size))  # (N,), (N, T)
    flat = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), (trs, valid))  # (N*T, ...)
    buf = buffer_add(state.buffer, *flat)
    env_steps = state.env_steps + jnp.sum(valid).astype(jnp.int32)
    cem = cem_tell(state.cem, pop, -returns, cfg.num_elites, cfg.eps_end, cfg.eps_tau)
    mu_ret, _, _ = jax.vmap(lambda k: rollout(nets, cem.mean, k, cfg.episode_steps))(
        jax.random.split(k_mu, cfg.eval_episodes))
    n = cfg.num_grad
    metrics = {
        **({"charts/rl_return": returns[:n].mean()} if n else {}),  # no RL actors: absent
        **({"charts/ea_return": returns[n:].mean()} if n < cfg.pop_size else {}),
        "charts/mean_actor_return": mu_ret.mean(),
        "charts/best_return": returns.max(),
        "charts/pop_return": returns.mean(),
        "charts/env_steps": env_steps,
        "charts/sigma": jnp.sqrt(cem.var).mean(),
        "losses/critic": closs,
        "losses/actor": aloss,
    }
    return State(cem, critic, buf, env_steps, key), metrics


def evaluate(state: State, cfg: Config):
    nets = nets_of(cfg)
    ret, _, _ = jax.vmap(lambda k: rollout(nets, state.cem.mean, k, cfg.episode_steps))(
        jax.random.split(jax.random.fold_in(state.key, 1), cfg.eval_episodes))
    return {"final_mean_actor_return": ret.mean()}


# --- MAIN ---


def main(argv=None):
    return run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                    doc=__doc__, summary_keys=["final_mean_actor_return",
                                               "charts/mean_actor_return",
                                               "charts/best_return", "charts/env_steps"])


if __name__ == "__main__":
    main()
