"""Gated Transformer-XL (GTrXL): a Transformer-XL memory made stable for reinforcement learning.

[1] E. Parisotto, H. F. Song, J. W. Rae, R. Pascanu, C. Gulcehre, S. M. Jayakumar,
    M. Jaderberg, R. Lopez Kaufman, A. Clark, S. Noury, M. M. Botvinick, N. Heess,
    R. Hadsell. "Stabilizing Transformers for Reinforcement Learning." ICML 2020,
    arXiv:1910.06764.
[2] Z. Dai et al. "Transformer-XL: Attentive Language Models Beyond a Fixed-Length
    Context." ACL 2019, arXiv:1901.02860 (the relative attention and segment memory).
[3] J. Schulman et al. "Proximal Policy Optimization Algorithms." arXiv:1707.06347.

An agent reads its observation stream with a Transformer-XL: every layer n keeps its input
on the last M time steps as a memory (no gradient) that the current steps attend to, with
the relative score a_ij of [2] Sec. 3.3 (u, v shared by the layers, sinusoids r_{i-j}):

    a_ij = (q_i + u)^T k_j + (q_i + v)^T W_{k,R} r_{i-j},   j in [memory; steps <= i]

[1] changes two things in each layer ([1] Sec. 3, Fig. 1):
  identity-map reordering (TrXL-I): LayerNorm only on the input of each sub-layer, and a
  ReLU on the sub-layer's output, so an un-normalised path runs from input to output;
  gating: the residual sums become GRU-type gates g(x, y) ([1] Sec. 3.2):

    y = relu(MHA_XL(LN([SG(m^{n-1}); x])))          x: stream, m: the layer's memory
    x = g1(x, y)
    y = relu(MLP(LN(x)))
    x = g2(x, y)
    r = sigmoid(W_r y + U_r x)
    z = sigmoid(W_z y + U_z x - b_g)
    h = tanh(W_g y + U_g (r * x))
    g(x, y) = (1 - z) * x + z * h

With b_g > 0 (2 here, as DI-engine's GRUGatingUnit default) z is about sigmoid(-b_g) at
initialisation, so every layer starts near the identity and the agent near a Markov
policy. `gating="none"` is TrXL-I (x = x + y) and `gating="post_ln"` the canonical
Transformer-XL layer (x = LN(x + MHA(x)); x = LN(x + MLP(x))), the paper's ablations.

Training is PPO [3] over segments: N envs each take T steps; a segment's steps attend to
the memory (the M steps before the segment, from the previous rollout) and to the earlier
steps of the segment, only within the same episode (an episode id masks keys across a
reset). The PPO update recomputes the whole segment in one pass from the stored memory, so
at the rollout's parameters its log-probabilities equal the rollout's (tested).

Reproduce (CPU demo: bsuite MemoryChain through gymnax, remember one bit for 8 steps;
1 layer of d=32, T=M=16, 64 envs, 300k env steps = 292 PPO updates):
    python transformers/gtrxl.py --preset quick
    -> measured: success 1.00 (mean episodic return 1.00 of +-1) over the last 50 updates,
       first above 0.98 after 10 updates; ~27k env steps/s, 34 s compile + 12 s loop on a
       shared 2-core CPU (load ~7).
    python transformers/gtrxl.py --preset quick --no-memory   (each step sees only itself)
    -> measured: success 0.50, return 0.00 (chance: the bit is not in the observation).
Paper-scale (GPU; 12 layers, d=256, 8 heads, memory 256 on a 64-step MemoryChain;
19.7M parameters; only traced here, not run):
    python transformers/gtrxl.py --preset paper
[1] Table 1 (from memory, not verified here): DMLab-30 mean human-normalised score 117.6
for GTrXL against 99.3 for the LSTM agent (V-MPO, 10B frames).

Differences from the paper:
- RL algorithm: PPO with GAE, not V-MPO/IMPALA on a distributed actor-learner setup; a
  segment's memory is computed with the rollout's parameters and held fixed (no gradient)
  through the PPO epochs, as Transformer-XL's training does.
- Task: bsuite MemoryChain (gymnax) instead of DMLab-30, Numpad or Memory Maze. gymnax
  returns each step the observation of the state BEFORE the step, so the context is seen
  at steps 0 and 1 and the query at the decision step; the agent needs memory all the same.
- Observation torso: one dense layer + ReLU instead of the paper's ResNet; policy and value
  heads are single dense layers on the last layer's output.
- b_g is a learnt per-unit bias initialised to `gate_bias`; gate weights use flax's
  default lecun-normal initialisation (the paper's exact initialiser is not stated here).
- The paper's layer counts, widths, memory lengths and optimiser settings are quoted from
  memory (12 layers, 8 heads, d=256, memory up to 512) and were not verified.
"""

import functools
import math
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from common import envs, run
from common.nets import orthogonal
from common.rl import gae, minibatch_epochs, ppo_loss

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """GTrXL + PPO on a memory task; the architecture defaults are [1]'s 12-layer model."""

    env_id: str = "MemoryChain-bsuite"
    """gymnax environment id (discrete actions, vector observations)"""
    memory_length: int = 64
    """MemoryChain: steps between the context and the query (episode = this + 1 steps)"""
    num_bits: int = 1
    """MemoryChain: context bits (the query asks for one of them)"""
    n_layer: int = 12
    """number of GTrXL layers L"""
    d_model: int = 256
    """model width"""
    n_head: int = 8
    """attention heads"""
    d_head: int = 32
    """width of each head"""
    d_inner: int = 1024
    """hidden width of the position-wise MLP"""
    gating: str = "gru"
    """'gru' (GTrXL), 'none' (TrXL-I: plain residuals) or 'post_ln' (canonical TrXL)"""
    gate_bias: float = 2.0
    """b_g: initial bias that keeps the update gate z near sigmoid(-b_g) (identity map)"""
    mem_len: int = 256
    """M: steps of per-layer memory carried from one segment to the next"""
    memory: bool = True
    """False: the memory-less baseline: every step attends only to itself"""
    num_envs: int = 256
    """parallel environments"""
    num_steps: int = 128
    """T: rollout length per env, the segment the PPO update recomputes in one pass"""
    total_timesteps: int = 100_000_000
    """environment steps of the whole run"""
    lr: float = 2.5e-4
    """Adam learning rate"""
    anneal_lr: bool = True
    """linearly anneal the learning rate to 0"""
    num_epochs: int = 4
    """PPO epochs per rollout"""
    num_minibatches: int = 8
    """minibatches per epoch (split over envs: a minibatch holds whole segments)"""
    gamma: float = 0.99
    """discount"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    clip_coef: float = 0.2
    """PPO ratio clip"""
    ent_coef: float = 0.01
    """entropy bonus coefficient"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """global gradient-norm clip"""

    @property
    def steps_per_update(self) -> int:
        return self.num_envs * self.num_steps  # env steps per update

    @property
    def num_updates(self) -> int:
        return self.total_timesteps // self.steps_per_update

    def validate(self):
        for name in ("memory_length", "num_bits", "n_layer", "d_model", "n_head", "d_head",
                     "d_inner", "num_envs", "num_steps", "num_epochs", "num_minibatches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.mem_len < 0:
            raise ValueError(f"mem_len must be >= 0, got {self.mem_len}")
        if self.gating not in ("gru", "none", "post_ln"):
            raise ValueError(f"gating must be 'gru', 'none' or 'post_ln', got {self.gating!r}")
        if self.d_model % 2:
            raise ValueError(f"d_model must be even (sin/cos pairs), got {self.d_model}")
        if self.num_envs % self.num_minibatches:
            raise ValueError(f"num_envs={self.num_envs} must be divisible by "
                             f"num_minibatches={self.num_minibatches}")
        if self.num_updates < 1:
            raise ValueError(f"total_timesteps={self.total_timesteps} is smaller than one "
                             f"rollout (num_envs * num_steps = {self.steps_per_update})")


PRESETS = {
    "quick": dict(memory_length=8, n_layer=1, d_model=32, n_head=2, d_head=16, d_inner=64,
                  mem_len=16, num_envs=64, num_steps=16, total_timesteps=300_000, lr=1e-3,
                  num_minibatches=4),
    "paper": dict(),
}


# --- ENVIRONMENT ---


@functools.cache
def make_env(env_id: str, num_envs: int, memory_length: int, num_bits: int):
    """The batched env; MemoryChain gets `num_bits` and a fixed `memory_length`."""
    if env_id != "MemoryChain-bsuite":
        return envs.make(env_id, num_envs)
    with jax.ensure_compile_time_eval():
        env = envs.GymnaxEnv(env_id, num_bits=num_bits)
    params = env.default_params().replace(memory_length=memory_length)
    return envs.VecEnv(env, num_envs, sampler=lambda key: params)


def _env(cfg: Config):
    return make_env(cfg.env_id, cfg.num_envs, cfg.memory_length, cfg.num_bits)


# --- NETWORKS ---


def sinusoid(pos, d_model: int):
    """r_d = [sin(d w), cos(d w)] with w_k = 10000^(-2k/d_model); pos (K,) -> (K, d)."""
    inv_freq = 1.0 / 10000 ** (jnp.arange(0, d_model, 2.0) / d_model)
    x = pos[:, None] * inv_freq[None]
    return jnp.concatenate([jnp.sin(x), jnp.cos(x)], -1)


def rel_shift(x):
    """[2] App. B: x[..., i, c] holds the score of query i with r_{K-1-c} (K keys, the Lq
    queries are the last Lq keys). Returns y[..., i, j] = score with r_{K-Lq+i-j}; entries
    of future keys (j > K-Lq+i) are junk and must be masked."""
    *lead, q, k = x.shape
    x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, 0), (1, 0)])  # (..., Lq, K+1)
    x = x.reshape(*lead, k + 1, q)
    return x[..., 1:, :].reshape(*lead, q, k)  # (..., Lq, K)


def episode_mask(ctx_ep, q_ep, max_dist):
    """(B, Lq, C+Lq) bool. Keys are C context steps then the Lq query steps, in time order;
    query i sees key j iff j is not in its future, at most max_dist[i] steps back, and of
    the same episode (context slots with no step hold episode id -1)."""
    C, Lq = ctx_ep.shape[1], q_ep.shape[1]
    dist = C + jnp.arange(Lq)[:, None] - jnp.arange(C + Lq)[None]  # (Lq, K)
    ok = (dist >= 0) & (dist <= max_dist[:, None])
    k_ep = jnp.concatenate([ctx_ep, q_ep], 1)  # (B, K)
    return ok[None] & (k_ep[:, None, :] == q_ep[:, :, None])


class RelMultiHeadAttn(nn.Module):
    """Multi-head attention of queries h over keys [mem; h] with [2]'s relative score."""

    n_head: int
    d_head: int
    d_model: int

    @nn.compact
    def __call__(self, h, cat, r, mask, u, v):
        # h (B, L, d), cat (B, K, d), r (K, d) = r_{K-1} .. r_0, mask (B, L, K), u/v (H, Dh)
        hd = (self.n_head, self.d_head)
        q = nn.DenseGeneral(hd, use_bias=False, name="q")(h)  # (B, L, H, Dh)
        k = nn.DenseGeneral(hd, use_bias=False, name="k")(cat)  # W_{k,E}: (B, K, H, Dh)
        val = nn.DenseGeneral(hd, use_bias=False, name="v")(cat)  # (B, K, H, Dh)
        kr = nn.DenseGeneral(hd, use_bias=False, name="r")(r)  # W_{k,R} r: (K, H, Dh)
        ac = jnp.einsum("bihd,bjhd->bhij", q + u, k)  # [2] terms (a) + (c)
        bd = rel_shift(jnp.einsum("bihd,jhd->bhij", q + v, kr))  # [2] terms (b) + (d)
        score = (ac + bd) / math.sqrt(self.d_head)  # (B, H, L, K)
        score = jnp.where(mask[:, None], score, -1e30)
        out = jnp.einsum("bhij,bjhd->bihd", jax.nn.softmax(score, -1), val)  # (B, L, H, Dh)
        return nn.DenseGeneral(self.d_model, axis=(-2, -1), use_bias=False, name="o")(out)


class GRUGate(nn.Module):
    """[1] Sec. 3.2: g(x, y) = (1 - z) * x + z * h, x the stream, y the sub-layer output."""

    d_model: int
    gate_bias: float = 2.0

    @nn.compact
    def __call__(self, x, y):
        dense = lambda name: nn.Dense(self.d_model, use_bias=False, name=name)
        b_g = self.param("b_g", nn.initializers.constant(self.gate_bias), (self.d_model,))
        r = jax.nn.sigmoid(dense("W_r")(y) + dense("U_r")(x))  # reset gate
        z = jax.nn.sigmoid(dense("W_z")(y) + dense("U_z")(x) - b_g)  # update gate
        h = jnp.tanh(dense("W_g")(y) + dense("U_g")(r * x))  # candidate
        return (1 - z) * x + z * h


class GTrXLLayer(nn.Module):
    """One layer: gated ('gru'), identity-map reordered ('none') or post-LN ('post_ln')."""

    d_model: int
    n_head: int
    d_head: int
    d_inner: int
    gating: str = "gru"
    gate_bias: float = 2.0

    @nn.compact
    def __call__(self, x, mem, r, mask, u, v):
        L = x.shape[1]
        attn = RelMultiHeadAttn(self.n_head, self.d_head, self.d_model, name="attn")
        mlp = lambda h: nn.Dense(self.d_model, name="ff2")(
            nn.relu(nn.Dense(self.d_inner, name="ff1")(h)))
        cat = jnp.concatenate([jax.lax.stop_gradient(mem), x], 1)  # [SG(m); x] (B, K, d)
        if self.gating == "post_ln":  # canonical TrXL: LN(x + sub-layer(x))
            x = nn.LayerNorm(name="ln_attn")(x + attn(x, cat, r, mask, u, v))
            return nn.LayerNorm(name="ln_ff")(x + mlp(x))
        if self.gating == "gru":
            gate1 = GRUGate(self.d_model, self.gate_bias, name="gate_attn")
            gate2 = GRUGate(self.d_model, self.gate_bias, name="gate_ff")
        else:  # TrXL-I: identity-map reordering with plain residual sums
            gate1 = gate2 = lambda x, y: x + y
        cat = nn.LayerNorm(name="ln_attn")(cat)  # LN on the input stream (memory included)
        y = nn.relu(attn(cat[:, -L:], cat, r, mask, u, v))  # ReLU before the gate [1] Sec. 3.1
        x = gate1(x, y)
        y = nn.relu(mlp(nn.LayerNorm(name="ln_ff")(x)))
        return gate2(x, y)


class GTrXL(nn.Module):
    """obs (B, Lq, o) after a context ctx (n_layer, B, C, d) of the C previous steps (each
    layer's input) -> policy logits (B, Lq, A), value (B, Lq) and each layer's input on
    the Lq steps (n_layer, B, Lq, d). ctx_ep (B, C) / q_ep (B, Lq): episode ids; max_dist
    (Lq,): how far back each query may look. `mask` (B, Lq, C+Lq) overrides the mask."""

    num_actions: int
    n_layer: int
    d_model: int
    n_head: int
    d_head: int
    d_inner: int
    gating: str = "gru"
    gate_bias: float = 2.0

    @nn.compact
    def __call__(self, obs, ctx, ctx_ep, q_ep, max_dist, mask=None):
        C, Lq = ctx.shape[2], obs.shape[1]
        x = nn.relu(nn.Dense(self.d_model, name="embed")(obs))  # (B, Lq, d)
        r = sinusoid(jnp.arange(C + Lq - 1, -1, -1.0), self.d_model)  # r_{K-1} .. r_0
        mask = episode_mask(ctx_ep, q_ep, max_dist) if mask is None else mask
        init = nn.initializers.normal(0.02)
        u = self.param("u", init, (self.n_head, self.d_head))
        v = self.param("v", init, (self.n_head, self.d_head))
        inputs = []
        for n in range(self.n_layer):
            inputs.append(x)  # m^{n-1}: the memory stores each layer's input
            x = GTrXLLayer(self.d_model, self.n_head, self.d_head, self.d_inner, self.gating,
                           self.gate_bias, name=f"layer_{n}")(x, ctx[n], r, mask, u, v)
        logits = nn.Dense(self.num_actions, kernel_init=orthogonal(0.01), name="pi")(x)
        value = nn.Dense(1, kernel_init=orthogonal(1.0), name="value")(x)[..., 0]
        return logits, value, jnp.stack(inputs)


def make_model(cfg: Config, num_actions: int) -> GTrXL:
    return GTrXL(num_actions, cfg.n_layer, cfg.d_model, cfg.n_head, cfg.d_head, cfg.d_inner,
                 cfg.gating, cfg.gate_bias)


def log_prob_entropy(logits, action):
    logp = jax.nn.log_softmax(logits)
    ent = -(jnp.exp(logp) * logp).sum(-1)
    return jnp.take_along_axis(logp, action[..., None], -1)[..., 0], ent


# --- STATE ---


@struct.dataclass
class State:
    params: dict
    opt_state: optax.OptState
    key: jax.Array
    step: jax.Array
    env_state: envs.VecState
    obs: jax.Array
    """(N, o): the next observation of every env"""
    ep: jax.Array
    """(N,) int32: episode id of that observation (counts the env's resets)"""
    mems: jax.Array
    """(n_layer, N, max(M, 1), d): each layer's input on the last M steps"""
    mem_ep: jax.Array
    """(N, max(M, 1)): their episode ids (-1: no step yet)"""
    memory: jax.Array
    """() bool: cfg.memory, traced, so that one compiled program can run agents with and
    without memory side by side (seeds of the tests' memory-less baseline)"""


def _optimizer(cfg: Config):
    lr = cfg.lr
    if cfg.anneal_lr:
        lr = optax.linear_schedule(cfg.lr, 0.0, cfg.num_updates * cfg.num_epochs
                                   * cfg.num_minibatches)
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), optax.adam(lr, eps=1e-5))


def init(key, cfg: Config) -> State:
    env = _env(cfg)
    k_param, k_env, key = jax.random.split(key, 3)
    model = make_model(cfg, env.num_actions)
    obs, env_state = env.reset(k_env)
    N, M = cfg.num_envs, max(cfg.mem_len, 1)  # orbax cannot save zero-size arrays
    mems = jnp.zeros((cfg.n_layer, N, M, cfg.d_model))
    mem_ep = jnp.full((N, M), -1, jnp.int32)
    ep = jnp.zeros((N,), jnp.int32)
    params = model.init(k_param, obs[:, None], mems, mem_ep, ep[:, None],
                        jnp.zeros((1,), jnp.int32))["params"]
    return State(params, _optimizer(cfg).init(params), key, jnp.array(0, jnp.int32),
                 env_state, obs, ep, mems, mem_ep, jnp.asarray(cfg.memory))


def segment_max_dist(cfg: Config, memory=None):
    """How far back step t of a segment may look: the M memory steps and steps 0..t; with
    memory False, 0 (only itself). `memory`: the traced State.memory, else cfg.memory."""
    t = jnp.arange(cfg.num_steps)
    if memory is None:
        return cfg.mem_len + t if cfg.memory else jnp.zeros_like(t)
    return jnp.where(memory, cfg.mem_len + t, 0)


# --- ROLLOUT ---


def rollout(params, state: State, cfg: Config):
    """T steps of every env, one query per step over a rolling cache of the last
    C = M + T - 1 steps' layer inputs (only the memory and this segment's steps are
    visible). Returns the trajectory (T, N, ...), the last value (N,), the new env
    state/obs/ep/key and the new memory (last M steps)."""
    env = _env(cfg)
    model = make_model(cfg, env.num_actions)
    M, T = cfg.mem_len, cfg.num_steps
    mems, mem_ep = state.mems[:, :, :M], state.mem_ep[:, :M]
    nl, N, _, d = mems.shape
    cache = jnp.concatenate([jnp.zeros((nl, N, T - 1, d)), mems], 2)  # (n_layer, N, C, d)
    cache_ep = jnp.concatenate([jnp.full((N, T - 1), -1, jnp.int32), mem_ep], 1)
    max_dist = segment_max_dist(cfg, state.memory)

    def act(obs, ep, cache, cache_ep, dist):
        logits, value, inputs = model.apply({"params": params}, obs[:, None], cache,
                                            cache_ep, ep[:, None], dist[None])
        return logits[:, 0], value[:, 0], inputs

    def step(carry, t):
        env_state, obs, ep, cache, cache_ep, key = carry
        key, k_act, k_env = jax.random.split(key, 3)
        logits, value, inputs = act(obs, ep, cache, cache_ep, max_dist[t])
        action = jax.random.categorical(k_act, logits)
        logp, _ = log_prob_entropy(logits, action)
        next_obs, env_state, reward, done, info = env.step(env_state, action, k_env)
        cache = jnp.concatenate([cache, inputs], 2)[:, :, 1:]  # roll in this step
        cache_ep = jnp.concatenate([cache_ep, ep[:, None]], 1)[:, 1:]
        tr = dict(obs=obs, action=action, logp=logp, value=value, reward=reward, done=done,
                  ep=ep, ret=info["returned_episode_return"], ended=info["returned_episode"])
        return (env_state, next_obs, ep + done, cache, cache_ep, key), tr

    carry = (state.env_state, state.obs, state.ep, cache, cache_ep, state.key)
    carry, traj = jax.lax.scan(step, carry, jnp.arange(T))  # traj leaves (T, N, ...)
    env_state, obs, ep, cache, cache_ep, key = carry
    first = max_dist[0]  # the next obs is step 0 of the next segment
    _, last_value, _ = act(obs, ep, cache, cache_ep, first)
    new_mems = jax.lax.stop_gradient(cache[:, :, cache.shape[2] - M:])
    return traj, last_value, (env_state, obs, ep, key), (new_mems, cache_ep[:, T - 1:])


def segment_forward(params, cfg: Config, num_actions: int, obs, mems, mem_ep, ep,
                    memory=None):
    """The whole segment in one pass: obs (N, T, o), memory (n_layer, N, M, d) and its
    episode ids (N, M), the steps' episode ids (N, T) -> logits (N, T, A), values (N, T).
    `memory`: the traced State.memory flag (default cfg.memory)."""
    model = make_model(cfg, num_actions)
    logits, value, _ = model.apply({"params": params}, obs, mems, mem_ep, ep,
                                   segment_max_dist(cfg, memory))
    return logits, value


# --- UPDATE ---


def update(state: State, cfg: Config):
    env = _env(cfg)
    M = cfg.mem_len
    traj, last_value, (env_state, obs, ep, key), (new_mems, new_mem_ep) = rollout(
        state.params, state, cfg)
    adv, ret = gae(traj["reward"], traj["value"], traj["done"], last_value, cfg.gamma,
                   cfg.gae_lambda)  # (T, N)

    # a minibatch holds whole segments of some envs, with the memory they started from
    env_major = lambda x: jnp.swapaxes(x, 0, 1)  # (T, N, ...) -> (N, T, ...)
    batch = {k: env_major(traj[k]) for k in ("obs", "action", "logp", "value", "ep")}
    # with M = 0 the state's one unused slot (episode id -1) is passed: it is always masked
    batch.update(adv=env_major(adv), ret=env_major(ret), mem_ep=state.mem_ep,
                 mems=env_major(state.mems))  # mems (N, n_layer, max(M, 1), d)

    def loss_fn(params, mb):
        logits, value = segment_forward(params, cfg, env.num_actions, mb["obs"],
                                        env_major(mb["mems"]), mb["mem_ep"], mb["ep"],
                                        state.memory)
        logp, ent = log_prob_entropy(logits, mb["action"])
        adv = (mb["adv"] - mb["adv"].mean()) / (mb["adv"].std() + 1e-8)
        return ppo_loss(logp, mb["logp"], adv, ent, value, mb["value"], mb["ret"],
                        cfg.clip_coef, cfg.vf_coef, cfg.ent_coef)  # [3] Eq. 7 + Eq. 9

    key, k_epochs = jax.random.split(key)
    params, opt_state, metrics = minibatch_epochs(
        k_epochs, state.params, state.opt_state, batch, loss_fn, _optimizer(cfg),
        cfg.num_epochs, cfg.num_minibatches)
    n_ended = traj["ended"].sum()
    # 0 when no episode ended in the rollout; the runner logs NaN there (NAN_UNLESS below)
    mean_ended = lambda x: (x * traj["ended"]).sum() / jnp.maximum(n_ended, 1)
    metrics["charts/episodic_return"] = mean_ended(traj["ret"])
    metrics["charts/success"] = mean_ended(traj["ret"] > 0)
    metrics["charts/episodes"] = n_ended
    if M == 0:
        new_mems, new_mem_ep = state.mems, state.mem_ep  # the unused slot
    return State(params, opt_state, key, state.step + 1, env_state, obs, ep, new_mems,
                 new_mem_ep, state.memory), metrics


# --- MAIN ---


NAN_UNLESS = {**run.NAN_UNLESS, "charts/success": "charts/episodes"}
"""Metrics undefined (logged as NaN) in updates where no episode ended."""


def main(argv=None):
    return run.main(Config, init, update, presets=PRESETS, argv=argv, doc=__doc__,
                    nan_unless=NAN_UNLESS)


if __name__ == "__main__":
    main()
