"""DORA: E-values as generalised visit counters, on a DQN with an E stream.

[1] L. Choshen, L. Fox, Y. Loewenstein. "DORA The Explorer: Directed Outreaching
    Reinforcement Action-Selection." ICLR 2018, arXiv:1804.04012. The authors' code:
    borgr/DORA (linapprox/main.py: tile coding, linear E with a sigmoid) and borgr/atari-rl
    @53f0d89 (the deep agent: networks/dqn.py, networks/loss.py, agents/agent.py, main.py),
    read for the rules and defaults below. borgr/deep_exploration_with_E_network (a DORA
    submodule) is the ICLR-2018 reproducibility-challenge replication by Davis, Wang and Pan,
    third-party code, cited only where said.

E-values are the Q-values of a second MDP, the same dynamics with every reward 0, started at
E = 1 and learned on-policy (SARSA), so E(s,a) only shrinks where (s,a) and what follows it
have been tried; log E is a counter that also propagates along trajectories:

    E(s,a) <- (1 - alpha) E(s,a) + alpha gamma_E E(s',a')          [1] Sec. 3 (SARSA, r = 0)
    gamma_E = 0:  E = (1 - alpha)^n after n visits,  log_{1-alpha} E = n   [1] Sec. 3.1
    bonus:  r_t <- r_t + beta / sqrt(log_{1-alpha} E(s_t,a_t))      [1] Sec. 4, as MBIE-EB
            here beta / sqrt(-log E + 0.01) (atari-rl: the + 0.01 caps it at 10 beta; the
            constant sqrt(-log(1 - alpha)) is folded into beta)
    LLL:    a_t = argmax_a [log f(a | s_t) - log log_{1-alpha} E(s_t,a)]    [1] Alg. 1
            `lll`: f epsilon-greedy on Q (as the replication); `lll_softmax`: f = softmax(Q/T),
            i.e. argmax Q - T log(-log E) (linapprox's DORA agent, T = 0.5; atari-rl's LLL
            flag with T = epsilon). The base of the log adds a constant to every action.

With function approximation [1] Sec. 5: an E stream on the Q network's shared torso (as
atari-rl: Dense 256 ReLU -> Dense A, zero kernel, sigmoid, so E = e_init = 0.5 at init),
trained in the same jitted step as the Q head on the same replay batch (one loss, as
atari-rl's q_loss + e_loss):

    L_Q = 1/B sum_b (r_b + beta b_b + gamma (1 - d_b) max_a' Q^-(s'_b, a') - Q(s_b, a_b))^2
    L_E = 1/(2B) sum_b (gamma_E (1 - d_b) E^-(s'_b, a'_b) - E(s_b, a_b))^2,  a'_b the action
    taken at s'_b (SARSA on the target net); b_b = beta / sqrt(-log E(s_b, a_b) + 0.01).
One SGD step of L_E on a one-hot phi with a linear head (`e_activation=linear`, offset 1)
is exactly the tabular rule above: the test checks E = (1 - alpha)^n through `learn`. Under
replay SGD on batch means alpha is only ~ e_lr k / B (k copies of (s, a) in the batch), and
under Adam e_lr is no count rate at all.

Reproduce (CPU, DeepSea N = 10, one env, 150 episodes):
    python exploration/dora.py --preset quick --num-seeds 4
    python exploration/dora.py --preset quick --num-seeds 4 --action-selection epsilon  # f
    python exploration/dora.py --preset quick_epsilon --num-seeds 4   # DQN, eps 1 -> 0.05
    python exploration/dora.py --plot exploration/dora.png
The quick preset's run is the test's behaviour run; its two broken arms run the same compiled
program from the same initial states with State.use_e = False (f sampled: epsilon-greedy 0.3)
and State.e_train = 0 (E frozen at 1: LLL = greedy Q). Measured (loaded 2-core CPU, jax
0.10.2, 4 seeds), episodes to the first treasure (-1: never) and treasure episodes of 150:
    DORA, LLL on epsilon-greedy 0.3 (quick)        80  78 110  -1    51 54 21 0
    f itself: epsilon-greedy 0.3 (broken)          -1  -1  -1  -1
    the E head frozen (quick_frozen, broken)       -1  -1  -1  -1     0  0  0 0
    DQN, epsilon 1 -> 0.05 (quick_epsilon)         -1  -1  -1  -1     0  0  0 0
This supports only "a linear one-hot E with LLL beats its own epsilon-greedy f", not DORA
with a network E head. The plot (exploration/dora.png, 4 min): treasure episodes over
training for quick, quick_frozen and quick_epsilon.
Calibration on the same budget (first treasure): gamma_E = 0 with epsilon 0.5: 64 -1 122 -1
(gamma_E = 0.99: -1 101 101 -1); epsilon 0.05 in f: 1/4; an MLP E head on the shared torso
(Adam) or a sigmoid linear E from 0.99: 0/4 (E falls to ~0.01 in unvisited cells, resp.
barely moves); lll_softmax (T 0.5): -1 -1 -1 140. The bonus (beta 0.1 + 0.01, on LLL with
epsilon 0.05): -1 144 -1 91 (0/4 before bonus_eps, with bonuses up to 1000 beta); the
authors' pairing, the bonus with plain epsilon-greedy, was not calibrated.
The network E head of `paper` is untested at scale: only traced, and one `learn` step in the
tests; a working one likely needs ~1e3 episodes at N = 10, an E target net and a GPU run.
Paper numbers: [1] Fig. 5 (sparse MountainCar, linear): DORA reaches the goal where
epsilon-greedy and softmax mostly do not; Freeway: DORA scores above DQN [M: not re-read].

Differences from the paper:
- The environment is DeepSea (bsuite, the repo's sparse-reward test bed; [1] used a bridge
  MDP, sparse MountainCar with 1000-step episodes and Atari Freeway). The `paper` preset is
  DeepSea N = 20 with bsuite's TF DQN constants (MLP [50, 50], adam 1e-3, batch 32,
  min replay 100, target period 4, epsilon 0.05 fixed; atari-rl's conv torso and epsilon
  schedule are not reproduced) and atari-rl's E stream, gamma_E 0.99 and bonus (beta 0.05,
  + 0.01); MountainCar and Freeway are not run here.
- L_Q is plain MSE (not common.dqn's Huber loss, nor atari-rl's clipped reward: the bonus is
  added unclipped); one target copy holds both streams (the replication copies its separate
  E network every 1000 steps, Q every 10000, and clamps gradients).
- The E head has no learnable bias: a fixed offset logit(e_init) instead (E = 0.5 at
  e_init 0.5 as atari-rl; [1] and the post start E at 1). E is clipped to [1e-30, 1 - 1e-6]
  inside the logs.
- The bonus is computed at learning time on the replayed (s, a) with the current E head;
  atari-rl computes it at acting time and stores it. linapprox/main.py's bonus is
  1 / log_{1-alpha} E (an inverse count, no square root).
- The quick preset (the tests' setting) uses a separate linear E on DeepSea's one-hot cells,
  E = 1 + w . phi trained by SGD (e_lr 3 on batch means), the analogue of linapprox's linear
  E on binary tile features, and LLL on epsilon-greedy 0.3 in f, which is the replication's
  rule (linapprox's 0.3 drives only its EGREEDY baseline; its DORA agent is lll_softmax,
  offered here, 1/4 on quick's budget): an MLP E head generalises E down in every
  cell of a one-hot grid and found no treasure (above).
Metrics: charts/first_success is NaN until the treasure is first reached (then the finished
episodes it took); charts/bonus_mean is the mean bonus over the replayed batch.
"""

import math
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
    """DQN + DORA E-values on DeepSea; defaults: bsuite DQN constants, [1]'s gamma_E."""

    env_id: str = "DeepSea-bsuite"
    """environment id (gymnax e.g. DeepSea-bsuite, navix, GridMaze-*)"""
    deepsea_size: int = 20
    """DeepSea only: grid size N"""
    total_timesteps: int = 200_000
    """environment steps over all envs (10,000 episodes of DeepSea N = 20)"""
    num_envs: int = 1
    """parallel environments"""
    action_selection: str = "lll"
    """lll: argmax log f - log(-log E), f epsilon-greedy on Q ([1] Alg. 1); lll_softmax:
    argmax Q - T log(-log E) (f = softmax(Q / T), linapprox's DORA agent); epsilon: on Q"""
    temperature: float = 0.5
    """T of lll_softmax (linapprox/main.py: 0.5)"""
    beta: float = 0.0
    """bonus scale: r + beta / sqrt(-log E(s,a) + bonus_eps) ([1] Sec. 4); 0: no bonus"""
    bonus_eps: float = 0.01
    """added under the square root (atari-rl: 0.01), so the bonus is at most beta/sqrt(eps)"""
    gamma_e: float = 0.99
    """E-value discount gamma_E (released deep code 0.99; 0 makes -log E a scaled count)"""
    e_init: float = 0.5
    """E at initialisation (the fixed offset of the E head; [1]: 1, atari-rl: 0.5)"""
    e_activation: str = "sigmoid"
    """E head output: sigmoid (atari-rl) or linear (tabular equivalence tests)"""
    e_lr: float = 1e-3
    """learning rate of the E head (its own optimizer; [1]'s alpha only for SGD, see doc)"""
    e_optimizer: str = "adam"
    """optimizer of the E head: adam or sgd (sgd + linear + one-hot = the tabular rule)"""
    freeze_e: bool = False
    """ablation: the E head is never trained (a constant bonus; the tests' broken variant)"""
    shared_torso: bool = True
    """E stream on the Q network's torso (atari-rl); else on the obs (the replication)"""
    hidden: tuple[int, ...] = (50, 50)
    """hidden layer sizes of the Q network's torso"""
    e_hidden: tuple[int, ...] = (256,)
    """hidden ReLU layers of the E stream before its head (atari-rl: 256); () = linear"""
    lr: float = 1e-3
    """Adam learning rate of the Q head and torso"""
    batch_size: int = 32
    """replay minibatch size (bsuite DQN)"""
    gamma: float = 0.99
    """discount of the task's Q-values"""
    buffer_size: int = 10_000
    """replay capacity in transitions"""
    learning_starts: int = 100
    """transitions collected before the first gradient update (bsuite DQN min_replay)"""
    train_every: int = 1
    """vector-env steps between gradient updates"""
    target_update_period: int = 4
    """gradient updates between target-network copies (Q and E heads)"""
    eps_start: float = 0.05
    """epsilon of f at step 0"""
    eps_end: float = 0.05
    """final epsilon"""
    eps_decay_steps: int = 1
    """environment steps over which epsilon decays linearly"""
    dtype: str = "float32"
    """compute dtype of the networks (bfloat16 on accelerators)"""

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // (self.num_envs * self.train_every)

    def validate(self):
        choices = dict(
            action_selection=("lll", "lll_softmax", "epsilon"),
            e_activation=("sigmoid", "linear"),
            e_optimizer=("adam", "sgd"),
            dtype=("float32", "bfloat16"),
        )
        for name, ok in choices.items():
            if getattr(self, name) not in ok:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {ok}")
        for name in ("deepsea_size", "total_timesteps", "num_envs", "batch_size", "train_every",
                     "target_update_period", "eps_decay_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.learning_starts < 0:
            raise ValueError(f"learning_starts={self.learning_starts} must be >= 0")
        if self.beta < 0:
            raise ValueError(f"beta={self.beta} must be >= 0")
        if self.bonus_eps < 0 or (self.beta > 0 and self.bonus_eps == 0 and self.e_init >= 1):
            raise ValueError(f"bonus_eps={self.bonus_eps} must be >= 0 (> 0 if E starts at 1)")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")
        top = 1 if self.e_activation == "linear" else 1 - 1e-6
        if not 0 < self.e_init <= top:
            raise ValueError(f"e_init={self.e_init} must be in (0, {top}] ({self.e_activation})")
        if self.action_selection == "lll" and min(self.eps_start, self.eps_end) <= 0:
            raise ValueError(
                "action_selection='lll' needs eps_start, eps_end > 0 (log f of "
                f"the epsilon-greedy f), got {self.eps_start}, {self.eps_end}"
            )
        for name in ("hidden", "e_hidden"):
            if any(h < 1 for h in getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)} must be sizes >= 1")
        if self.buffer_size // self.num_envs < 2:
            raise ValueError(
                f"buffer_size={self.buffer_size} must hold >= 2 rows of "
                f"num_envs={self.num_envs} transitions"
            )
        if self.num_updates < 1:
            raise ValueError(f"total_timesteps={self.total_timesteps} is less than one update")


# linapprox-style E (the authors' linear code: E on binary tile features): a separate linear E
# on DeepSea's one-hot observation, SGD, E starting at 1 (an MLP E head on one-hot cells
# generalises E down everywhere: measured E ~ 0.01 in unvisited cells after 300 steps)
_LINEAR_E = dict(
    shared_torso=False, e_hidden=(), e_activation="linear", e_init=1.0, e_optimizer="sgd", e_lr=3.0
)
_QUICK = dict(_LINEAR_E, deepsea_size=10, total_timesteps=1_500, learning_starts=128,
              eps_start=0.3, eps_end=0.3)
PRESETS = {
    # CPU demo: DeepSea N = 10, 150 episodes of one env, batch 32, LLL on epsilon-greedy 0.3
    "quick": _QUICK,
    # plain DQN on the same budget: epsilon 1 -> 0.05, no bonus, the E head unused
    "quick_epsilon": dict(
        _QUICK, action_selection="epsilon", eps_start=1.0, eps_end=0.05, eps_decay_steps=750
    ),
    # the broken variant: the E head never trained (E = 1: LLL sees equal counters)
    "quick_frozen": dict(_QUICK, freeze_e=True),
    # atari-rl's deep setting where it is a config: the E stream (256 ReLU, sigmoid head at
    # 0.5) on the shared torso, bonus beta / sqrt(-log E + 0.01) with beta 0.05, epsilon-greedy
    "paper": dict(beta=0.05, bonus_eps=0.01, action_selection="epsilon"),
}

COVERAGE_GRID = 64
E_MAX = 1.0 - 1e-6  # E is clipped into [E_MIN, E_MAX] inside the logs (E = 1: log E = 0)
E_MIN = 1e-30


def make_env(cfg: Config):
    """The batched env, wrapped to count distinct cells (Coverage)."""
    if cfg.env_id == "DeepSea-bsuite":
        env = envs.make(cfg.env_id, cfg.num_envs, size=cfg.deepsea_size)
    else:
        env = envs.make(cfg.env_id, cfg.num_envs)
    return envs.Coverage(env, COVERAGE_GRID)


# --- NETWORKS ---


def e_offset(cfg: Config) -> float:
    """The fixed pre-activation c with E = e_init at zero weights: logit or the value."""
    return math.log(cfg.e_init / (1 - cfg.e_init)) if cfg.e_activation == "sigmoid" else cfg.e_init


class QENet(nn.Module):
    """Q(s, .) and E(s, .): a ReLU torso (flattened obs), a linear Q head and an E head
    E = act(c + w_E . phi) with w_E zero at init and c fixed ([1] Sec. 5)."""

    hidden: tuple[int, ...]
    e_hidden: tuple[int, ...]
    num_actions: int
    offset: float
    activation: str
    shared_torso: bool
    dtype: str = "float32"

    def torso(self, x, hidden, name):
        for i, h in enumerate(hidden):
            x = nn.relu(nn.Dense(h, dtype=self.dtype, name=f"{name}_{i}")(x))
        return x

    @nn.compact
    def __call__(self, obs):
        x = obs.reshape(obs.shape[0], -1).astype(self.dtype)  # (B, features)
        phi = self.torso(x, self.hidden, "q_torso")
        q = nn.Dense(self.num_actions, dtype=self.dtype, name="q_head")(phi)
        phi_e = self.torso(phi if self.shared_torso else x, self.e_hidden, "e_torso")
        z = nn.Dense(self.num_actions, use_bias=False, kernel_init=nn.initializers.zeros,
                     dtype=self.dtype, name="e_head")(phi_e).astype(jnp.float32)
        e = jax.nn.sigmoid(self.offset + z) if self.activation == "sigmoid" else self.offset + z
        return q.astype(jnp.float32), e


def network(cfg: Config, num_actions: int) -> QENet:
    return QENet(cfg.hidden, cfg.e_hidden, num_actions, e_offset(cfg), cfg.e_activation,
                 cfg.shared_torso, cfg.dtype)


def optimizer(cfg: Config):
    """Adam(lr) on the Q head and torso; the E head (and E torso) with its own alpha."""
    e_tx = optax.sgd(cfg.e_lr) if cfg.e_optimizer == "sgd" else optax.adam(cfg.e_lr)
    label = lambda params: {
        "params": {k: "e" if k.startswith("e_") else "q" for k in params["params"]}
    }
    return optax.multi_transform({"q": optax.adam(cfg.lr), "e": e_tx}, label)


# --- LOSS ---


def neg_log_e(e):
    """-log E, E clipped into [E_MIN, E_MAX]: [1]'s counter up to the factor -log(1-alpha)."""
    return -jnp.log(jnp.clip(e, E_MIN, E_MAX))


def dora_bonus(e, beta, eps=0.01):
    """[1] Sec. 4 / the post: r^i = beta / sqrt(-log E(s,a)); + eps as atari-rl (E = 1:
    beta / sqrt(eps), not 1000 beta)."""
    return beta / jnp.sqrt(neg_log_e(e) + eps)


def lll_scores(q, e, epsilon):
    """[1] Alg. 1 (LLL determinization of f): log f(a|s) - log(-log E(s,a)), f the
    epsilon-greedy policy of q [..., A]; the action is the argmax of these scores."""
    num_actions = q.shape[-1]
    greedy = jax.nn.one_hot(jnp.argmax(q, -1), num_actions)
    f = epsilon / num_actions + (1 - epsilon) * greedy
    return jnp.log(f) - jnp.log(neg_log_e(e))


def pick(x, a):
    return jnp.take_along_axis(x, a[..., None].astype(jnp.int32), -1)[..., 0]


def loss_fn(params, target_params, cfg, num_actions, cur, nxt):
    """L_Q + L_E on one replayed batch (the equations of the docstring)."""
    net = network(cfg, num_actions)
    q, e = net.apply(params, cur["obs"])  # (B, A) each
    q_next, e_next = net.apply(target_params, nxt["obs"])
    e_sa = pick(e, cur["action"])
    bonus = jax.lax.stop_gradient(dora_bonus(e_sa, cfg.beta, cfg.bonus_eps))  # [1] Sec. 4
    not_done = 1.0 - cur["done"].astype(jnp.float32)
    y = dqn.td_target(cur["reward"] + bonus, cfg.gamma * not_done, q_next)
    loss_q = ((y - pick(q, cur["action"])) ** 2).mean()
    # [1] Sec. 3: SARSA target with reward 0, a' the action taken at s' (the next row's)
    y_e = jax.lax.stop_gradient(cfg.gamma_e * not_done * pick(e_next, nxt["action"]))
    loss_e = 0.5 * ((e_sa - y_e) ** 2).mean()
    return loss_q + loss_e, dict(loss_q=loss_q, loss_e=loss_e, bonus=bonus, e_sa=e_sa)


def learn(params, target_params, opt_state, cfg: Config, num_actions, cur, nxt, e_train=1.0):
    """One gradient step of both heads (the step `update` takes); the E head's update is
    scaled by `e_train` (State.e_train: 0 under `freeze_e`)."""
    (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, target_params, cfg, num_actions, cur, nxt
    )
    updates, opt_state = optimizer(cfg).update(grads, opt_state, params)
    scale = lambda k, v: jax.tree.map(lambda u: u * e_train, v) if k.startswith("e_") else v
    updates = {"params": {k: scale(k, v) for k, v in updates["params"].items()}}
    return optax.apply_updates(params, updates), opt_state, aux


# --- STATE ---


@struct.dataclass
class State:
    params: Any
    target_params: Any
    opt_state: Any
    replay: dqn.Replay
    env_state: Any
    obs: jax.Array
    step: jax.Array  # int32 vector-env steps taken
    num_grad: jax.Array  # int32 gradient updates done
    episodes: jax.Array  # float: finished episodes, all envs
    positives: jax.Array  # float: finished episodes with a positive return (treasure)
    first_success: jax.Array  # float: `episodes` when the first positive one ended; -1 before
    use_e: jax.Array  # bool: act by LLL; False: sample f itself (the tests' broken arm)
    e_train: jax.Array  # float: scale of the E update (0: frozen; the tests' broken arm)
    key: jax.Array


def switches(cfg: Config):
    """State.use_e (LLL on, unless action_selection is epsilon) and State.e_train (0 under
    freeze_e): values, so one compiled program runs DORA and its broken arms."""
    return jnp.asarray(cfg.action_selection != "epsilon"), jnp.asarray(0.0 if cfg.freeze_e else 1.0)


def init(key, cfg: Config) -> State:
    env = make_env(cfg)
    k_net, k_env, key = jax.random.split(key, 3)
    obs, env_state = env.reset(k_env)
    params = network(cfg, env.num_actions).init(k_net, obs)
    n = cfg.num_envs
    row = dict(
        obs=obs, action=jnp.zeros(n, jnp.int32), reward=jnp.zeros(n), done=jnp.zeros(n, bool)
    )
    zero = jnp.zeros(())
    return State(
        params,
        params,
        optimizer(cfg).init(params),
        dqn.replay_init(row, cfg.buffer_size // n),
        env_state,
        obs,
        jnp.zeros((), jnp.int32),
        jnp.zeros((), jnp.int32),
        zero,
        zero,
        -jnp.ones(()),
        *switches(cfg),
        key,
    )


# --- UPDATE ---


def act(key, q, e, epsilon, cfg: Config, use_e=True):
    """LLL: argmax of `lll_scores`; lll_softmax: argmax q - T log(-log E) (LLL of the
    Boltzmann f = softmax(q / T)); epsilon, or `use_e` False: a sample of f itself."""
    if cfg.action_selection == "lll_softmax":
        lll = jnp.argmax(q - cfg.temperature * jnp.log(neg_log_e(e)), -1)
        plain = jax.random.categorical(key, q / cfg.temperature)
    else:
        lll = jnp.argmax(lll_scores(q, e, epsilon), -1)
        plain = dqn.epsilon_greedy(key, q, epsilon)
    return plain if cfg.action_selection == "epsilon" else jnp.where(use_e, lll, plain)


def update(state: State, cfg: Config):
    env = make_env(cfg)
    num_actions = env.num_actions
    net = network(cfg, num_actions)

    # --- ROLLOUT ---
    def env_step(carry, _):
        s, key = carry
        key, k_act, k_env = jax.random.split(key, 3)
        epsilon = dqn.linear_schedule(
            s.step * cfg.num_envs, cfg.eps_start, cfg.eps_end, cfg.eps_decay_steps
        )
        q, e = net.apply(s.params, s.obs)
        action = act(k_act, q, e, epsilon, cfg, s.use_e)
        next_obs, env_state, reward, done, info = env.step(s.env_state, action, k_env)
        replay = dqn.replay_add(s.replay, dict(obs=s.obs, action=action, reward=reward, done=done))
        ended = info["returned_episode"]
        success = ended & (info["returned_episode_return"] > 0)
        episodes = s.episodes + ended.sum()
        first = jnp.where((s.first_success < 0) & success.any(), episodes, s.first_success)
        s = s.replace(
            replay=replay,
            env_state=env_state,
            obs=next_obs,
            step=s.step + 1,
            episodes=episodes,
            positives=s.positives + success.sum(),
            first_success=first,
        )
        return (s, key), dict(
            ret=info["returned_episode_return"],
            ended=ended,
            eps=epsilon,
            e_act=pick(e, action).mean(),
        )

    (state, key), traj = jax.lax.scan(env_step, (state, state.key), None, cfg.train_every)

    # --- LEARN ---
    key, k_sample = jax.random.split(key)
    cur, nxt = dqn.replay_sample(state.replay, k_sample, cfg.batch_size)
    params, opt_state, aux = learn(
        state.params, state.target_params, state.opt_state, cfg, num_actions, cur, nxt,
        state.e_train
    )
    learning = state.step * cfg.num_envs >= max(cfg.learning_starts, 2 * cfg.num_envs)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(learning, a, b), new, old)
    params = keep(params, state.params)
    opt_state = keep(opt_state, state.opt_state)
    num_grad = state.num_grad + learning.astype(jnp.int32)
    target = keep(
        dqn.periodic_update(params, state.target_params, num_grad, cfg.target_update_period),
        state.target_params,
    )

    n_ended = traj["ended"].sum()
    metrics = {
        "losses/q": aux["loss_q"],
        "losses/e": aux["loss_e"],
        "charts/bonus_mean": aux["bonus"].mean(),
        "charts/e_mean": aux["e_sa"].mean(),
        "charts/e_acted": traj["e_act"][-1],
        "charts/episodic_return": (traj["ret"] * traj["ended"]).sum() / jnp.maximum(n_ended, 1),
        "charts/episodes": n_ended,
        "charts/epsilon": traj["eps"][-1],
        "charts/positive_episodes": state.positives,
        "charts/distinct_cells": state.env_state.visited.sum(),
        "charts/first_success": jnp.maximum(state.first_success, 0.0),
        "charts/solved": (state.first_success >= 0).astype(jnp.float32),
    }
    new = state.replace(
        params=params, target_params=target, opt_state=opt_state, num_grad=num_grad, key=key
    )
    return new, metrics


def evaluate(state: State, cfg: Config):
    """Episodes until the first treasure (-1: never), treasure episodes, distinct cells."""
    return {
        "first_success": state.first_success,
        "positive_episodes": state.positives,
        "distinct_cells": state.env_state.visited.sum(),
    }


# --- MAIN ---

NAN_UNLESS = {**run.NAN_UNLESS, "charts/first_success": "charts/solved"}


def plot_runs(out: str, seeds: int = 4):
    """Treasure episodes over training (DeepSea N = 10, quick budget): DORA LLL, the same
    with the E head frozen, and epsilon-greedy DQN, median and per-seed curves."""
    import matplotlib.pyplot as plt
    import numpy as np

    from common import plot

    fig, ax = plt.subplots(figsize=(5, 3.5))
    keys = jax.random.split(jax.random.PRNGKey(0), seeds)
    for color, name, label in (
        ("C0", "quick", "DORA, LLL action selection"),
        ("C2", "quick_frozen", "E head frozen (broken)"),
        ("C1", "quick_epsilon", "DQN, epsilon-greedy"),
    ):
        cfg = Config(**PRESETS[name])
        _, m = jax.jit(jax.vmap(run.make_train(init, update, cfg)))(keys)
        pos = np.asarray(m["charts/positive_episodes"])
        x = np.arange(pos.shape[1]) * cfg.num_envs * cfg.train_every / cfg.deepsea_size
        ax.plot(x, pos.T, color=color, alpha=0.25, lw=0.8)
        ax.plot(x, np.median(pos, 0), color=color, label=label)
        print(name, pos[:, -1])
    ax.set(
        xlabel="episodes",
        ylabel="episodes that reached the treasure",
        title=f"DeepSea N = 10, {seeds} seeds (median bold)",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    return plot.save_png(fig, out)


def main(argv=None):
    flags, argv = run.pop_flags(argv, "--plot")
    if flags["--plot"]:
        return plot_runs(flags["--plot"])
    return run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                    doc=__doc__, nan_unless=NAN_UNLESS,
                    summary_keys=["first_success", "positive_episodes", "distinct_cells",
                                  "charts/episodic_return", "losses/e"])


if __name__ == "__main__":
    main()
