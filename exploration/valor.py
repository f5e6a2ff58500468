"""VALOR: options discovered by a policy that encodes a context into a trajectory and a
decoder that reads the context back from the whole trajectory.

[1] J. Achiam, H. Edwards, D. Amodei, P. Abbeel. "Variational Option Discovery Algorithms."
    arXiv:1807.10299 (2018). No released code was found; community spinning-up-style PyTorch
    re-implementations were read (not copied). [1]'s body text and appendix were not read:
    items marked [M] are from memory of [1]; the hyperparameters are those
    re-implementations' defaults, and k_init = 2 and num_updates_total = 5000 are unsourced.
[2] K. Gregor, D. Rezende, D. Wierstra. "Variational Intrinsic Control." arXiv:1611.07507
    (the decoder sees the final state only: `--decoder final_state`, [1]'s VIC baseline).
[3] J. Schulman et al. "High-Dimensional Continuous Control Using GAE." arXiv:1506.02438.

A context c ~ G = Uniform{0, ..., K - 1} is drawn once per episode; the policy pi(a | s, c)
sees the one-hot c beside the state ("encoder"); the decoder D(c | tau) reads the episode
and never sees actions. Both maximise ([1] Eq. (2), the beta-VAE form [M]):

    max_{pi, D}  E_{c ~ G} [ E_{tau ~ pi(c)} [ log P_D(c | tau) ] + beta H(pi | c) ]
    VALOR's decoder: a bidirectional LSTM over the DIFFERENCES of N = 11 equally spaced
      states, x_i = s_{t_{i+1}} - s_{t_i} ([1] Sec. 4 and Fig. 1; the post's Fig. 18) [M];
      logits from its last forward and first backward hidden states (see Differences)
    reward: r_t = 0 for t < T - 1,  r_{T-1} = log P_D(c | tau)  (once, at the episode's end)
    policy: VPG with GAE(gamma, lambda) advantages [3] and an entropy bonus beta H(pi(.|s, c))
    decoder: min_D E[-log P_D(c | tau)] on the episodes of the last dc_every epochs
    curriculum (as in the re-implementations; [1]'s section not re-read): when
      E_c[log P_D(c | tau)] >= log(0.86),  K <- min(int(1.5 K + 1), K_max)

Reproduce (CPU demo: 2-D point mass, curriculum K = 2 -> 16; trajectories in the PNG):
    python exploration/valor.py --preset quick --num-seeds 4 --plot exploration/valor.png
    python exploration/valor.py --preset quick --num-seeds 4 --variant blind     # broken
    python exploration/valor.py --preset quick --num-seeds 4 --decoder final_state  # VIC
Re-implementations' hyperparameters (K_max 64, 1000-step episodes, gamma = 1; accelerator;
only for tracing: at max_speed 0.1 the point mass meets a wall of its [-1, 1]^2 box after
10-20 steps, so most of a 1000-step episode is spent pressed against it):
    python exploration/valor.py --preset paper
Ours (quick: 400 epochs of 64 twenty-step episodes, K = 2 -> 16, 4 seeds; loaded 2-core
CPU, 21 s compile + 77 s; the same numbers before and after the decoder's ring buffer, a
no-op at dc_every = 1): every seed reached K = 16 (at epochs 75-98) and its decoder scores
0.97 / 0.99 / 1.00 / 0.99 accuracy on 8 held-out episodes per context (chance 1/16;
`evaluate` runs eval_episodes K_max = 128 episodes, c = i mod K: 8 per context at K = 16,
64 for the blind arm at K = 2), mean log P_D -0.06; exploration/valor.png shows the 16
options fanning out from the centre (tab20 colours, one per context).
Same run, `--decoder final_state` (VIC): K = 16 at epochs 54-70, accuracy 1.00 / 1.00 /
1.00 / 0.99 (on a point mass the end point alone tells the options apart; [1]'s claim is
about richer bodies). Broken `--variant blind`: K stays 2, accuracy 0.52 / 0.50 / 0.50 /
0.51 (chance 0.5), log P_D -0.694 = log 1/2. [1] reports learning curves and pictures
(e.g. HalfCheetah / Ant options, K up to 64 with the curriculum) [M]; no number is
comparable to this toy.

Differences from the paper:
- Environment: a pure-JAX point mass in [-1, 1]^2 starting at the centre, pos' = clip(pos +
  max_speed a, -1, 1), a = clip(u, -1, 1), u ~ N(mu(s, c), sigma); [1] runs MuJoCo
  (HalfCheetah, Swimmer, Ant, Toddler) and a point env of its own; the paper preset keeps the
  point mass with [1]'s hyperparameters, as the MuJoCo tasks are not built here.
- The decoder trains every `dc_every` epochs on the dc_every x num_episodes episodes since
  its last step (a ring buffer in the State, as the re-implementations keep them); the
  curriculum is checked on the same epochs, on the last epoch's rewards (decoder before its
  step, fresh rollouts).
- Reward: log P_D once at the episode's last step; the re-implementations give it to every
  step without discount. With gamma 0.99 over 1000 steps the first action would see
  0.99^999 = 4e-5 of it, so the paper preset sets gamma = 1 (the value then carries the
  credit through GAE's deltas); the quick preset keeps 0.99 (T = 20: 0.99^19 = 0.83).
- The biLSTM's logits come from [last forward, first backward] hidden state; the
  re-implementations put a linear head on every step and average over time.
- The curriculum's trigger is the mean log-likelihood (the geometric-mean probability exp
  E[log P_D] >= 0.86; the re-implementations' comment says 0.86, their code tests >= 0.85);
  `threshold` sets it. K starts at `k_init` = 2 (unsourced; the re-implementations start
  at 4).
- [1] compares VALOR with VIC and DIAYN; DIAYN is not a variant here (it lives in
  metarl/diayn.py).
- The logits are masked to the K contexts in use (the decoder's head has K_max outputs).
- `--variant blind` (policy's one-hot zeroed: pi ignores c) is a broken variant for tests,
  not in [1]. `--decoder final_state` reads (s_0, s_T) with an MLP ([2]'s q(c | s_0, s_f)).
- Policy and value are MLPs (tanh), Gaussian with a state-independent log std; [1] also
  uses recurrent policies in some runs [M].
"""

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from common import run
from common.plot import save_png
from common.rl import gae

# --- CONFIG ---

DECODERS = ("valor", "final_state")
VARIANTS = ("valor", "blind")


@dataclass(frozen=True)
class Config:
    """VALOR; defaults are the spinning-up-style re-implementations' ([1]'s appendix not read)."""

    k_init: int = 2
    """K at the start: contexts c ~ Uniform{0..K-1} (unsourced; re-implementations: 4)"""
    k_max: int = 64
    """K_max: the curriculum's ceiling and the one-hot / decoder-head width"""
    threshold: float = 0.86
    """curriculum trigger: K grows when exp(E[log P_D(c | tau)]) >= threshold"""
    decoder: str = "valor"
    """valor (biLSTM on sub-sampled state differences) or final_state (VIC: MLP on s_0, s_T)"""
    variant: str = "valor"
    """valor, or the broken blind (the policy's one-hot context zeroed: pi ignores c)"""
    decoder_points: int = 11
    """N equally spaced states of the episode the decoder reads (N - 1 differences)"""
    num_updates_total: int = 5000
    """VPG epochs (policy updates; unsourced)"""
    num_episodes: int = 40
    """episodes per epoch (episodes_per_epoch), one context each"""
    episode_length: int = 1000
    """T: steps per episode (max_ep_len); the reward comes at step T"""
    pi_lr: float = 3e-4
    """Adam learning rate of the policy (one VPG step per epoch)"""
    vf_lr: float = 1e-3
    """Adam learning rate of the value function"""
    dc_lr: float = 5e-4
    """Adam learning rate of the decoder"""
    train_v_iters: int = 80
    """value-function gradient steps per epoch"""
    train_dc_iters: int = 10
    """decoder gradient steps per decoder update"""
    dc_every: int = 10
    """the decoder (and the curriculum check) updates every dc_every epochs"""
    gamma: float = 0.99
    """discount"""
    gae_lambda: float = 0.97
    """GAE lambda [3]"""
    ent_coef: float = 0.0
    """beta: weight of the policy entropy H(pi | c) [M]"""
    hidden: tuple[int, ...] = (64, 64)
    """hidden sizes of the policy and value MLPs"""
    decoder_hidden: int = 64
    """LSTM units per direction (or the final_state MLP's width)"""
    max_speed: float = 0.1
    """point mass: displacement per step at |a| = 1 (the box is [-1, 1]^2)"""
    eval_episodes: int = 8
    """evaluate(): eval_episodes K_max fresh episodes over the K contexts in use (this many
    per context at K = K_max)"""
    dtype: str = "float32"
    """compute dtype of the networks: float32 or bfloat16 (params stay float32)"""

    @property
    def num_updates(self) -> int:
        return self.num_updates_total

    @property
    def steps_per_update(self) -> int:
        return self.num_episodes * self.episode_length

    def validate(self):
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder={self.decoder!r} must be one of {DECODERS}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant={self.variant!r} must be one of {VARIANTS}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")
        if not 2 <= self.k_init <= self.k_max:
            raise ValueError(f"k_init={self.k_init} must be in [2, k_max={self.k_max}]")
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold={self.threshold} must be in (0, 1)")
        if not 2 <= self.decoder_points <= self.episode_length + 1:
            raise ValueError(
                f"decoder_points={self.decoder_points} must be in [2, "
                f"episode_length + 1 = {self.episode_length + 1}]"
            )
        for name in (
            "episode_length",
            "train_v_iters",
            "train_dc_iters",
            "dc_every",
            "decoder_hidden",
            "eval_episodes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"hidden={self.hidden} must be sizes >= 1")
        if self.max_speed <= 0:
            raise ValueError(f"max_speed={self.max_speed} must be > 0")


PRESETS = {
    # CPU demo: 20-step episodes, K from 2 up to 16, the decoder every epoch.
    "quick": dict(
        k_max=16,
        num_updates_total=400,
        num_episodes=64,
        episode_length=20,
        pi_lr=3e-3,
        vf_lr=3e-3,
        dc_lr=3e-3,
        train_v_iters=10,
        train_dc_iters=5,
        dc_every=1,
        ent_coef=0.0,
        max_speed=0.1,
    ),
    # gamma = 1: the only reward comes at step 1000, and 0.99^999 = 4e-5 (see Differences).
    "paper": dict(gamma=1.0),
}


# --- NETWORKS ---


class Policy(nn.Module):
    """pi(a | s, c): Gaussian, mean from an MLP on [s, onehot(c)], state-independent log std."""

    action_dim: int
    hidden: tuple[int, ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for h in self.hidden:
            x = nn.tanh(nn.Dense(h, dtype=self.dtype)(x))
        mean = nn.Dense(self.action_dim, dtype=self.dtype)(x).astype(jnp.float32)
        log_std = self.param("log_std", nn.initializers.constant(-0.5), (self.action_dim,))
        return mean, log_std


class Value(nn.Module):
    """V(s, c): MLP -> [B]."""

    hidden: tuple[int, ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for h in self.hidden:
            x = nn.tanh(nn.Dense(h, dtype=self.dtype)(x))
        return nn.Dense(1, dtype=self.dtype)(x)[..., 0].astype(jnp.float32)


class Decoder(nn.Module):
    """P_D(c | tau): logits [B, K_max]. valor: biLSTM over [B, N - 1, D] state differences;
    final_state: MLP over [B, 2 D] = (s_0, s_T)."""

    k_max: int
    kind: str
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.kind == "valor":
            fwd = nn.RNN(nn.OptimizedLSTMCell(self.hidden, dtype=self.dtype))(x)
            bwd = nn.RNN(
                nn.OptimizedLSTMCell(self.hidden, dtype=self.dtype), reverse=True, keep_order=True
            )(x)
            x = jnp.concatenate([fwd[:, -1], bwd[:, 0]], -1)  # [B, 2 H] [M]
        else:
            x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype)(x))
            x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype)(x))
        return nn.Dense(self.k_max, dtype=self.dtype)(x).astype(jnp.float32)


def networks(cfg: Config):
    dt = jnp.dtype(cfg.dtype)
    return (
        Policy(2, cfg.hidden, dt),
        Value(cfg.hidden, dt),
        Decoder(cfg.k_max, cfg.decoder, cfg.decoder_hidden, dt),
    )


# --- LOSS ---


def subsample_index(episode_length: int, points: int) -> np.ndarray:
    """N equally spaced time indices in 0..T (first and last included)."""
    return np.round(np.linspace(0, episode_length, points)).astype(np.int32)


def decoder_inputs(states, cfg: Config):
    """states [T + 1, B, D] -> the decoder's input: valor [B, N - 1, D], the differences
    s_{t_{i+1}} - s_{t_i} of N equally spaced states; final_state [B, 2 D] = (s_0, s_T)."""
    if cfg.decoder == "final_state":
        return jnp.concatenate([states[0], states[-1]], -1)
    sub = states[subsample_index(cfg.episode_length, cfg.decoder_points)]  # [N, B, D]
    return jnp.swapaxes(sub[1:] - sub[:-1], 0, 1)  # [B, N - 1, D]


def context_log_prob(logits, c, k):
    """log P_D(c | tau) under the softmax over the K contexts in use (logits [B, K_max])."""
    mask = jnp.arange(logits.shape[-1]) < k
    logp = jax.nn.log_softmax(jnp.where(mask, logits, -jnp.inf))
    return jnp.take_along_axis(logp, c[:, None], -1)[:, 0]


def episode_rewards(log_p_d, episode_length: int):
    """[T, B]: 0 at every step but the last, where it is log P_D(c | tau) (no gradient)."""
    r = jnp.zeros((episode_length, log_p_d.shape[0]))
    return r.at[-1].set(jax.lax.stop_gradient(log_p_d))


def decoder_turn(step, dc_every: int):
    """Whether epoch `step` (0-based, before its increment) trains the decoder and checks the
    curriculum: the last of every dc_every epochs (dc_every - 1, 2 dc_every - 1, ...)."""
    return (step + 1) % dc_every == 0


def ring_write(buf, x, step, dc_every: int):
    """Write the epoch's rows x [B, ...] into slot step % dc_every of buf [dc_every B, ...]."""
    return jax.lax.dynamic_update_slice_in_dim(buf, x, (step % dc_every) * x.shape[0], 0)


def curriculum(k, mean_log_p_d, turn, cfg: Config):
    """[1]'s curriculum: on a decoder turn, K <- next_k(K) when E[log P_D] >= log threshold."""
    grow = turn & (mean_log_p_d >= jnp.log(cfg.threshold))
    return jnp.where(grow, next_k(k, cfg.k_max), k)


def advantages(rewards, values, cfg: Config):
    """[T, B] per-episode rewards and values -> (GAE(gamma, lambda) advantages [3] Eq. (16),
    the discounted reward-to-go GAE(gamma, 1) that the value regresses to)."""
    dones = jnp.zeros_like(rewards).at[-1].set(1.0)
    last = jnp.zeros(rewards.shape[1:])
    adv, _ = gae(rewards, values, dones, last, cfg.gamma, cfg.gae_lambda)
    rtg, _ = gae(rewards, jnp.zeros_like(rewards), dones, last, cfg.gamma, 1.0)
    return adv, rtg


def next_k(k, k_max):
    """K <- min(int(1.5 K + 1), K_max) (the re-implementations); int(1.5 K + 1) = (3 K + 2) // 2."""
    return jnp.minimum((3 * k + 2) // 2, k_max)


def gaussian_log_prob(u, mean, log_std):
    return (-0.5 * ((u - mean) * jnp.exp(-log_std)) ** 2 - log_std - 0.5 * jnp.log(2 * jnp.pi)).sum(
        -1
    )


def gaussian_entropy(log_std):
    """H of a diagonal Gaussian: sum_i log sigma_i + 0.5 log(2 pi e)."""
    return (log_std + 0.5 * jnp.log(2 * jnp.pi * jnp.e)).sum(-1)


def policy_loss(logp, adv, entropy, ent_coef):
    """VPG [1] (spinning-up form): -E[log pi(a | s, c) A] - beta H(pi | c)."""
    return -(logp * jax.lax.stop_gradient(adv)).mean() - ent_coef * entropy


# --- STATE ---


@struct.dataclass
class State:
    params: dict  # pi, v, dec
    opt_state: dict
    k: jax.Array  # int32: contexts in use
    step: jax.Array  # int32: epochs done
    key: jax.Array
    variant: jax.Array  # int32 index into VARIANTS (traced: both arms in one program)
    dc_x: jax.Array  # decoder inputs of the last dc_every epochs [dc_every B, ...] (ring)
    dc_c: jax.Array  # int32 [dc_every B]: their contexts


def optimizers(cfg: Config):
    return {"pi": optax.adam(cfg.pi_lr), "v": optax.adam(cfg.vf_lr), "dec": optax.adam(cfg.dc_lr)}


def init(key, cfg: Config) -> State:
    pi, v, dec = networks(cfg)
    k_pi, k_v, k_d, key = jax.random.split(key, 4)
    x = jnp.zeros((1, 2 + cfg.k_max))
    states = jnp.zeros((cfg.episode_length + 1, 1, 2))
    params = {
        "pi": pi.init(k_pi, x),
        "v": v.init(k_v, x),
        "dec": dec.init(k_d, decoder_inputs(states, cfg)),
    }
    opt_state = {n: tx.init(params[n]) for n, tx in optimizers(cfg).items()}
    n = cfg.dc_every * cfg.num_episodes
    dc_x = decoder_inputs(jnp.zeros((cfg.episode_length + 1, n, 2)), cfg)
    return State(
        params,
        opt_state,
        jnp.asarray(cfg.k_init, jnp.int32),
        jnp.zeros((), jnp.int32),
        key,
        jnp.asarray(VARIANTS.index(cfg.variant), jnp.int32),
        dc_x,
        jnp.zeros((n,), jnp.int32),
    )


# --- ROLLOUT ---


def rollout(params, key, c, variant, cfg: Config):
    """Episodes of the contexts c [B] from the centre. Returns states [T + 1, B, 2], the
    policy inputs [T, B, 2 + K_max] and the pre-clip actions u [T, B, 2]."""
    pi, _, _ = networks(cfg)
    onehot = jax.nn.one_hot(c, cfg.k_max) * (variant == 0)  # blind: pi ignores c
    pos = jnp.zeros((c.shape[0], 2))

    def step(pos, k):
        x = jnp.concatenate([pos, onehot], -1)
        mean, log_std = pi.apply(params["pi"], x)
        u = mean + jnp.exp(log_std) * jax.random.normal(k, mean.shape)
        nxt = jnp.clip(pos + cfg.max_speed * jnp.clip(u, -1.0, 1.0), -1.0, 1.0)
        return nxt, (nxt, x, u)

    _, (states, xs, us) = jax.lax.scan(step, pos, jax.random.split(key, cfg.episode_length))
    return jnp.concatenate([pos[None], states]), xs, us


def sample_contexts(key, k, n):
    """c ~ Uniform{0..K-1} [n] for a traced K."""
    return jnp.minimum(jnp.floor(jax.random.uniform(key, (n,)) * k), k - 1).astype(jnp.int32)


# --- UPDATE ---


def update(state: State, cfg: Config):
    pi, v, dec = networks(cfg)
    txs = optimizers(cfg)
    key, k_c, k_roll = jax.random.split(state.key, 3)
    c = sample_contexts(k_c, state.k, cfg.num_episodes)
    states, xs, us = rollout(state.params, k_roll, c, state.variant, cfg)
    # The decoder reads the finished episode; its log-likelihood is the only reward.
    inputs = decoder_inputs(states, cfg)
    logits = dec.apply(state.params["dec"], inputs)
    log_p_d = context_log_prob(logits, c, state.k)
    rewards = episode_rewards(log_p_d, cfg.episode_length)  # [T, B]
    values = v.apply(state.params["v"], xs)  # [T, B]
    adv, rtg = advantages(rewards, values, cfg)  # [3] Eq. (16); the value's target
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)

    # --- POLICY --- one VPG step on E[log pi A] + beta H(pi | c)
    def pi_loss(p):
        mean, log_std = pi.apply(p, xs)
        entropy = gaussian_entropy(log_std)
        return policy_loss(
            gaussian_log_prob(us, mean, log_std), adv, entropy, cfg.ent_coef
        ), entropy

    (loss_pi, entropy), g = jax.value_and_grad(pi_loss, has_aux=True)(state.params["pi"])
    upd, opt_pi = txs["pi"].update(g, state.opt_state["pi"])
    new_pi = optax.apply_updates(state.params["pi"], upd)

    # --- VALUE --- train_v_iters steps of MSE to the reward-to-go
    def v_step(carry, _):
        p, o = carry
        loss, g = jax.value_and_grad(lambda p: ((v.apply(p, xs) - rtg) ** 2).mean())(p)
        upd, o = txs["v"].update(g, o)
        return (optax.apply_updates(p, upd), o), loss

    (new_v, opt_v), loss_v = jax.lax.scan(
        v_step, (state.params["v"], state.opt_state["v"]), None, cfg.train_v_iters
    )

    # --- DECODER --- every dc_every epochs: train_dc_iters steps of -log P_D(c | tau) on
    # the episodes of the last dc_every epochs (a ring buffer; all drawn with this K)
    dc_x = ring_write(state.dc_x, inputs, state.step, cfg.dc_every)
    dc_c = ring_write(state.dc_c, c, state.step, cfg.dc_every)

    def dc_step(carry, _):
        p, o = carry
        loss, g = jax.value_and_grad(
            lambda p: -context_log_prob(dec.apply(p, dc_x), dc_c, state.k).mean()
        )(p)
        upd, o = txs["dec"].update(g, o)
        return (optax.apply_updates(p, upd), o), loss

    (new_dec, opt_dec), loss_dc = jax.lax.scan(
        dc_step, (state.params["dec"], state.opt_state["dec"]), None, cfg.train_dc_iters
    )
    train_dc = decoder_turn(state.step, cfg.dc_every)
    new_dec, opt_dec = jax.tree.map(
        lambda n, o: jnp.where(train_dc, n, o),
        (new_dec, opt_dec),
        (state.params["dec"], state.opt_state["dec"]),
    )
    # --- CURRICULUM --- on the same epochs
    k = curriculum(state.k, log_p_d.mean(), train_dc, cfg)

    params = {"pi": new_pi, "v": new_v, "dec": new_dec}
    opt_state = {"pi": opt_pi, "v": opt_v, "dec": opt_dec}
    metrics = {
        "charts/decoder_logp": log_p_d.mean(),
        "charts/decoder_accuracy": (
            jnp.argmax(jnp.where(jnp.arange(cfg.k_max) < state.k, logits, -jnp.inf), -1) == c
        ).mean(),
        "charts/k": state.k.astype(jnp.float32),
        "charts/entropy": entropy,
        "losses/pi": loss_pi,
        "losses/v": loss_v[-1],
        "losses/decoder": loss_dc[-1],
    }
    return State(params, opt_state, k, state.step + 1, key, state.variant, dc_x, dc_c), metrics


# --- EVALUATE ---


def eval_rollouts(state: State, cfg: Config, key):
    """n = eval_episodes K_max fresh episodes over the contexts in use, c = i mod K (i < n):
    eval_episodes per context only at K = K_max, about n / K otherwise (uneven when K does
    not divide n); returns (states [T + 1, n, 2], c [n], log P_D [n], logits)."""
    n = cfg.eval_episodes * cfg.k_max
    c = (jnp.arange(n) % state.k).astype(jnp.int32)
    states, _, _ = rollout(state.params, key, c, state.variant, cfg)
    _, _, dec = networks(cfg)
    logits = dec.apply(state.params["dec"], decoder_inputs(states, cfg))
    return states, c, context_log_prob(logits, c, state.k), logits


def evaluate(state: State, cfg: Config):
    """Held-out episodes: the decoder's accuracy (argmax over the K contexts in use; chance
    1 / K), its mean log P_D(c | tau), and K."""
    _, c, log_p, logits = eval_rollouts(state, cfg, jax.random.fold_in(state.key, 7))
    guess = jnp.argmax(jnp.where(jnp.arange(cfg.k_max) < state.k, logits, -jnp.inf), -1)
    return {
        "decoder_accuracy": (guess == c).mean(),
        "decoder_logp": log_p.mean(),
        "k": state.k.astype(jnp.float32),
    }


# --- PLOT ---


def plot_options(state: State, cfg: Config, out: str, seed: int = 0):
    """Trajectories of every context in use (one colour each) of seed `seed`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    one = jax.tree.map(lambda x: x[seed], state)
    states, c, _, _ = jax.jit(eval_rollouts, static_argnums=1)(
        one, cfg, jax.random.fold_in(one.key, 7)
    )
    states, c, k = np.asarray(states), np.asarray(c), int(one.k)
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20" if k <= 20 else "hsv")
    fig, ax = plt.subplots(figsize=(5, 5))
    for i in range(states.shape[1]):
        col = cmap(c[i] if k <= 20 else c[i] / k)  # tab20: 20 distinct colours
        ax.plot(
            states[:, i, 0],
            states[:, i, 1],
            color=col,
            lw=0.8,
            alpha=0.6,
            label=f"c = {c[i]}" if i < k else None,
        )
        ax.scatter(states[-1, i, 0], states[-1, i, 1], color=col, s=6)
    ax.set(
        xlim=(-1.05, 1.05),
        ylim=(-1.05, 1.05),
        aspect="equal",
        title=f"{cfg.decoder} decoder, K = {k}: {len(c) // k}+ episodes per context",
    )
    ax.legend(fontsize=6, loc="lower left", ncol=2)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    """The runner's CLI plus `--plot PNG` (trajectories per context of seed 0)."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(
        Config,
        init,
        update,
        presets=PRESETS,
        evaluate=evaluate,
        argv=argv,
        doc=__doc__,
        summary_keys=["decoder_accuracy", "decoder_logp", "k", "charts/decoder_accuracy"],
    )
    if flags["--plot"] is not None:
        cfg = run.parse(Config, PRESETS, argv)[0]
        print("wrote", plot_options(res.state, cfg, flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
