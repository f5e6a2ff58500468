"""Progressive neural networks: one column per task, earlier columns frozen, lateral adapters.

[1] A. A. Rusu, N. C. Rabinowitz, G. Desjardins, H. Soyer, J. Kirkpatrick, K. Kavukcuoglu,
    R. Pascanu, R. Hadsell. "Progressive Neural Networks." arXiv:1606.04671 (2016).
[2] L. Weng. "Curriculum for Reinforcement Learning." Lil'Log, 2020 (the post).
No official code exists; this file is written from [1] and [2].

A sequence of K tasks is learnt one after the other. Column 1 (L hidden layers h_i^(1))
is trained on task 1; then its parameters Theta^(1) are frozen and column 2 is added for
task 2, reading the frozen column's activations through lateral connections; and so on
([1] Sec. 2, [2] "Curriculum through Distillation"). Column k, layer i ([1] Eq. 1):
    h_i^(k) = f(W_i^(k) h_{i-1}^(k) + sum_{j<k} U_i^(k:j) h_{i-1}^(j))
with the non-linear adapters of [1] Eq. 2 (omitting biases there; here W has one):
    h_i^(k) = f(W_i^(k) h_{i-1}^(k) + U_i^(k) f(V_i^(k) (alpha_{i-1}^(k) * h_{i-1}^(<k))))
    h_{i-1}^(<k) = [h_{i-1}^(1), ..., h_{i-1}^(k-1)]   (the anterior features, concatenated)
alpha learned scalars (one per anterior column, [1]: to adjust "for the different scales of
the different inputs"), initialised to small random values, V a projection of the
(k-1) n_{i-1} anterior features onto n_{i-1} dimensions, f = ReLU. Laterals feed every
layer i >= 2 and the output layer; the input layer has none (h_0 is the observation,
shared by all columns). Each column has its own policy and value head, so the frozen
columns still solve their own tasks exactly as before: progressive nets cannot forget.

Task sequence: observation transforms of one gymnax game, as [1]'s "Pong Soup" (noisy,
h-flip, ...): identity (the source), flip (the width axis reversed for MinAtar frames and
[H, W] grids, the sign flipped for vector observations), permute (channels of frames,
rows of grids, features of vectors in reverse order), noise (additive N(0, noise_std^2)).

Training: each column is trained on its task with PPO (common.rl's loss, GAE and
minibatch epochs; [1] trains each column with A3C). Every arm below runs in the same
compiled program on the same keys (vmapped), the baselines of [1] Sec. 5:
    progressive    the method
    scratch        baseline 1: a single column trained on each task from scratch (= the
                   progressive net with its laterals cut, U = 0: the broken variant)
    finetune_top   baseline 2: the column of the previous task copied, only its output
                   layer trained
    finetune_all   baseline 3: the column of the previous task copied, all of it trained
    random_column  baseline 4: the progressive net whose anterior columns are all reset to
                   their random init (each is trained on its task, then reset) and frozen
Metric ([1] Sec. 5): AUC_k = the area under the learning curve on task k, the curve being
the mean return of the episodes that ended in each PPO update, averaged over the task's
updates; the transfer score of an arm on target k = its AUC_k / scratch's AUC_k.

Reproduce (CPU, CartPole-v1 -> mirrored CartPole-v1, 2 columns, every arm, 5 seeds):
    python curriculum/progressive_nets.py --preset quick --num-seeds 5 \
        --plot curriculum/progressive_nets.png
Paper-scale run (GPU; Breakout-MinAtar -> flipped -> channel-permuted, 3 columns):
    python curriculum/progressive_nets.py --preset paper

Measured (`quick`: CartPole-v1, then CartPole-v1 with negated observations, columns 64-64,
150 PPO updates of 16 x 64 steps per task, 5 seeds; a loaded 2-core CPU: 149 s of CPU,
13.4 min wall). Task-2 AUC and transfer score, mean +- std over seeds:
    progressive     288.9 +- 41.5   1.42 +- 0.15   (per seed 1.46 1.12 1.49 1.48 1.53)
    random_column   209.0 +- 34.9   1.02 +- 0.10   (baseline 4)
    scratch         203.5 +- 17.6   1               (baseline 1 = laterals cut)
    finetune_all    106.0 +- 41.1   0.51 +- 0.18   (baseline 3)
    finetune_top     13.7 +- 1.6    0.07 +- 0.01   (baseline 2)
Task-1 AUC 186.4 +- 5.5 in every arm. Task-1 return afterwards (16 episodes, cut at 500)
with the network each arm keeps for task 1: progressive 245 (column 1 untouched);
finetune_all 12 and finetune_top 38 (forgotten). Progressive beats random_column in all
5 paired seeds (gaps 14 to 132, mean 80), but the seed spreads nearly meet (mean - std
247, mean + std 244): 5 seeds is a small sample. random_column ties scratch, so the gain
here comes from the trained column 1's features, not from the extra capacity. On this
mirrored task fine-tuning the whole column transfers negatively (0.51, its copied policy
pushes the wrong way first), unlike the post's summary that progressive nets reach
"similar transfer performance as fine-tuning the entire network": one transform of one
game, no general claim. [1]'s own
transfer matrices are not quoted (no copy of its tables was at hand).

Differences from the paper:
- Columns are MLPs over the flattened observation, so the adapters are linear projections
  (V) and never 1x1 convolutions; [1]'s Atari columns are Mnih et al.'s conv net.
- Training is PPO on vectorised gymnax envs, not A3C with 16 threads; the PPO defaults
  (lr 5e-4, 64 envs x 128 steps, 4 epochs, 8 minibatches) are purejaxrl's MinAtar
  settings, not [1]'s. [1] reports the top 3 of 25 jobs with sampled learning rates and
  entropy costs; here every seed counts and the hyperparameters are fixed.
- Tasks are MinAtar / CartPole observation transforms, not Atari Pong Soup or Labyrinth;
  on [H, W] grids "permute" is a vertical flip.
- The output layer's adapter serves the policy logits and the value together.
- alpha is drawn from U(0, alpha_init) ([1]: "initialized by a random small value").
- The fine-tuning baselines copy the previous column into a fresh slot; `evaluate` scores
  them on task 1 with their last column, the single network a fine-tuned agent keeps.
- random_column trains each column on its task before resetting it (so its task-1 AUC
  matches the others'); its task-1 score is that of a random column.
- Transfer is NaN wherever scratch's AUC is <= 0 (Catch, Pong: returns can be negative).
- Every stage runs `updates_per_task` PPO updates (a fixed budget, not to convergence).
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from common import envs, run
from common.nets import orthogonal
from common.plot import save_png
from common.rl import episode_metrics, gae, minibatch_epochs, ppo_loss, rollout

TRANSFORMS = ("identity", "flip", "permute", "noise")
ARMS = ("progressive", "scratch", "finetune_top", "finetune_all", "random_column")
LATERAL_ARMS = ("progressive", "random_column")
FINETUNE_ARMS = ("finetune_top", "finetune_all")

# --- CONFIG ---


@dataclass(frozen=True)
class Config:
    """Progressive nets (Rusu et al. 2016) on a sequence of observation-transformed tasks."""

    env_id: str = "Breakout-MinAtar"
    """gymnax game every task is made from"""
    tasks: tuple[str, ...] = ("identity", "flip", "permute")
    """the task sequence, one column each (K = len(tasks)): identity | flip | permute
    (reverse order; a vertical flip of [H, W] grids) | noise"""
    arms: tuple[str, ...] = ARMS
    """arms run side by side on the same keys: progressive | scratch (baseline 1) |
    finetune_top (2) | finetune_all (3) | random_column (4)"""
    noise_std: float = 0.5
    """std of the additive Gaussian observation noise of the `noise` task"""
    hidden: tuple[int, ...] = (256, 256)
    """hidden layer sizes n_1..n_L of every column"""
    alpha_init: float = 0.1
    """the adapters' scalars alpha (one per anterior column) start at U(0, alpha_init)"""
    updates_per_task: int = 1220
    """PPO updates that train each column (num_envs * num_steps env steps each)"""
    num_envs: int = 64
    """parallel environments"""
    num_steps: int = 128
    """steps per environment per rollout"""
    lr: float = 5e-4
    """Adam learning rate (annealed linearly to 0 over each task when anneal_lr)"""
    anneal_lr: bool = True
    """anneal the learning rate linearly to 0 over each task's updates"""
    num_epochs: int = 4
    """PPO epochs per rollout"""
    num_minibatches: int = 8
    """PPO minibatches per epoch"""
    gamma: float = 0.99
    """discount"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    clip_coef: float = 0.2
    """PPO ratio clip epsilon (also clips the value loss)"""
    ent_coef: float = 0.01
    """entropy bonus coefficient ([1]'s A3C has one too)"""
    vf_coef: float = 0.5
    """value loss coefficient"""
    max_grad_norm: float = 0.5
    """global gradient-norm clip"""
    eval_envs: int = 16
    """episodes of the final evaluation on task 1 (one per env, fixed key)"""
    eval_steps: int = 500
    """steps of that evaluation (return of the first episode, cut at eval_steps)"""
    dtype: str = "float32"
    """compute dtype of the columns' matmuls: float32 | bfloat16 (params stay float32)"""

    @property
    def num_columns(self) -> int:
        return len(self.tasks)

    @property
    def num_updates(self) -> int:
        return self.num_columns * self.updates_per_task

    @property
    def steps_per_update(self) -> int:
        return len(self.arms) * self.num_envs * self.num_steps

    def validate(self):
        envs.check_id(self.env_id)
        for t in self.tasks:
            if t not in TRANSFORMS:
                raise ValueError(f"tasks={self.tasks}: {t!r} must be one of {TRANSFORMS}")
        if len(self.tasks) < 2:
            raise ValueError(f"tasks={self.tasks} must hold >= 2 tasks (columns)")
        for a in self.arms:
            if a not in ARMS:
                raise ValueError(f"arms={self.arms}: {a!r} must be one of {ARMS}")
        if not self.arms or len(set(self.arms)) != len(self.arms):
            raise ValueError(f"arms={self.arms} must be non-empty and without repeats")
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"hidden={self.hidden} must be non-empty sizes >= 1")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r} must be one of ('float32', 'bfloat16')")
        if not self.alpha_init > 0:  # alpha = 0 zeroes every lateral and its gradient
            raise ValueError(f"alpha_init={self.alpha_init} must be > 0 (0 cuts the laterals)")
        ints = ("updates_per_task", "num_envs", "num_steps", "num_epochs", "num_minibatches")
        for name in (*ints, "eval_envs", "eval_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if (self.num_envs * self.num_steps) % self.num_minibatches:
            raise ValueError(
                f"num_envs * num_steps = {self.num_envs * self.num_steps} is not "
                f"divisible by num_minibatches={self.num_minibatches}"
            )
        if self.clip_coef <= 0 or self.noise_std < 0:
            raise ValueError(f"clip_coef={self.clip_coef} must be > 0, noise_std >= 0")


PRESETS = {
    # CPU demo: CartPole-v1 then mirrored CartPole-v1, 2 x 64 columns, 150 updates of
    # 16 x 64 steps per task, every arm side by side.
    "quick": dict(
        env_id="CartPole-v1", tasks=("identity", "flip"), hidden=(64, 64), updates_per_task=150
    )
    | dict(num_envs=16, num_steps=64, num_minibatches=4, lr=1e-3, eval_steps=500),
    # Breakout-MinAtar -> h-flipped -> channel-permuted, 3 columns of 256-256, 10M steps a
    # task per arm (the defaults).
    "paper": dict(),
}

# --- TASKS ---


def transform(obs, task, key, cfg: Config):
    """The observation of task `task` (a traced index into cfg.tasks) from the raw batch
    obs [N, ...]: flip mirrors the width axis (of [H, W, C] frames, of [H, W] grids; a
    vector is negated), permute reverses the channels of frames, the rows of grids (a
    v-flip) and the order of a vector's features, noise adds N(0, noise_std^2)."""
    ndim = obs.ndim - 1
    variants = {
        "identity": obs,
        "flip": obs[..., ::-1, :] if ndim == 3 else obs[..., ::-1] if ndim == 2 else -obs,
        "permute": obs[..., ::-1, :] if ndim == 2 else obs[..., ::-1],
        "noise": obs + cfg.noise_std * jax.random.normal(key, obs.shape),
    }
    return jnp.stack([variants[t].astype(jnp.float32) for t in cfg.tasks])[task]


def make_env(cfg: Config) -> envs.VecEnv:
    return envs.make(cfg.env_id, cfg.num_envs)


# --- NETWORKS ---


def dense_init(key, n_in, n_out, scale):
    """Orthogonal kernel with gain `scale` (the PPO convention), zero bias."""
    return {"kernel": orthogonal(scale)(key, (n_in, n_out)), "bias": jnp.zeros(n_out)}


def init_params(key, cfg: Config, obs_dim: int, num_actions: int):
    """Every column's parameters. `columns`: the columns' own layers stacked on a leading
    column axis [K, ...] (so a column can be copied at a traced index); `adapters[k - 1]`:
    column k's adapters (k >= 1), one per layer i >= 2 and for the output layer."""
    sizes = (obs_dim, *cfg.hidden)
    n_out = num_actions + 1  # policy logits, then the value

    def column(k):
        ks = jax.random.split(k, len(cfg.hidden) + 2)
        layers = [
            dense_init(ks[i], sizes[i], sizes[i + 1], np.sqrt(2)) for i in range(len(cfg.hidden))
        ]
        pi = dense_init(ks[-2], sizes[-1], num_actions, 0.01)["kernel"]
        v = dense_init(ks[-1], sizes[-1], 1, 1.0)["kernel"]
        out = {"kernel": jnp.concatenate([pi, v], 1), "bias": jnp.zeros(n_out)}
        return {"layers": layers, "out": out}

    k_cols, k_ad = jax.random.split(key)
    cols = [column(k) for k in jax.random.split(k_cols, cfg.num_columns)]
    columns = jax.tree.map(lambda *x: jnp.stack(x), *cols)
    adapters = []
    for k, kk in zip(
        range(1, cfg.num_columns), jax.random.split(k_ad, cfg.num_columns - 1), strict=True
    ):
        layer_adapters = []
        targets = (*cfg.hidden[1:], n_out)  # layers i = 2..L and the output layer
        for i, (n_prev, n_i, ki) in enumerate(
            zip(cfg.hidden, targets, jax.random.split(kk, len(targets)), strict=True)
        ):
            ka, kv, ku = jax.random.split(ki, 3)
            scale = 0.01 if i == len(targets) - 1 else np.sqrt(2)
            layer_adapters.append(
                {
                    "alpha": jax.random.uniform(ka, (k,)) * cfg.alpha_init,  # [k - 1 anterior]
                    "V": orthogonal(np.sqrt(2))(kv, (k * n_prev, n_prev)),
                    "U": orthogonal(scale)(ku, (n_prev, n_i)),
                }
            )
        adapters.append(layer_adapters)
    return {"columns": columns, "adapters": adapters}


def adapter(p, anterior, dtype):
    """[1] Eq. 2's lateral term U f(V (alpha * h^(<k))): anterior [B, (k-1) n] -> [B, n_i];
    alpha [k-1] holds one scalar per anterior column (each scales that column's n features)."""
    alpha = jnp.repeat(p["alpha"], anterior.shape[-1] // p["alpha"].shape[0])
    z = (alpha * anterior).astype(dtype) @ p["V"].astype(dtype)  # [B, n_{i-1}]
    return jax.nn.relu(z) @ p["U"].astype(dtype)


def progressive_layer(w, h_own, anterior, lateral, gate, dtype, f=jax.nn.relu):
    """[1] Eq. 2: h_i^(k) = f(W h_{i-1}^(k) + b + gate * U f(V alpha h_{i-1}^(<k))); `lateral`
    None for column 1 (no anterior columns), gate 0 cuts the laterals (baseline 1)."""
    pre = h_own.astype(dtype) @ w["kernel"].astype(dtype) + w["bias"].astype(dtype)
    if lateral is not None:
        pre = pre + gate * adapter(lateral, anterior, dtype)
    return f(pre.astype(jnp.float32))


def forward(params, x, column, gate, cfg: Config):
    """(logits [B, A], value [B]) of column `column` (traced) on inputs x [B, ...]. Every
    column runs (column k reads columns j < k at each layer); `column` picks one."""
    dtype = jnp.dtype(cfg.dtype)
    x = x.reshape(x.shape[0], -1)
    cols, ad = params["columns"], params["adapters"]
    K, L = cfg.num_columns, len(cfg.hidden)
    col = lambda w, k: jax.tree.map(lambda a: a[k], w)  # noqa: E731
    h = [progressive_layer(col(cols["layers"][0], k), x, None, None, gate, dtype) for k in range(K)]
    for i in range(1, L + 1):  # layers 2..L (layer 1 has no laterals), then the output layer
        w = cols["layers"][i] if i < L else cols["out"]
        f = jax.nn.relu if i < L else (lambda z: z)
        ant = [
            (jnp.concatenate(h[:k], -1), ad[k - 1][i - 1]) if k else (None, None) for k in range(K)
        ]
        h = [progressive_layer(col(w, k), h[k], *ant[k], gate, dtype, f) for k in range(K)]
    out = jnp.stack(h)[column]  # [B, A + 1]
    return out[..., :-1], out[..., -1]


# --- FREEZING ---


def trainable_mask(params, arm, stage, cfg: Config):
    """1 where a parameter is trained in `stage` by arm `arm` (both traced), 0 elsewhere:
    the earlier columns are frozen ([1] Sec. 2). Column `stage` and its adapters train;
    finetune_top trains its output layer only after task 1."""
    arm_is = {a: arm == ARMS.index(a) for a in ARMS}
    on = jnp.arange(cfg.num_columns) == stage  # [K]
    own = jnp.where(arm_is["finetune_top"] & (stage > 0), 0.0, on.astype(jnp.float32))
    lateral = arm_is["progressive"] | arm_is["random_column"]
    mask = {
        "columns": {
            "layers": jax.tree.map(
                lambda p: own.reshape(-1, *[1] * (p.ndim - 1)), params["columns"]["layers"]
            ),
            "out": jax.tree.map(
                lambda p: on.astype(jnp.float32).reshape(-1, *[1] * (p.ndim - 1)),
                params["columns"]["out"],
            ),
        },
        "adapters": [
            jax.tree.map(lambda p, k=k: ((stage == k) & lateral).astype(jnp.float32), ad)
            for k, ad in enumerate(params["adapters"], 1)
        ],
    }
    return mask


def make_optimizer(cfg: Config, mask=None):
    """Adam after a global-norm clip (common.rl's PPO). The freeze, its only mechanism: with
    a mask, the first link sets the gradients of the frozen parameters to exactly 0, so they
    stay out of the clip's global norm and Adam (reset at each task) moves them by 0."""
    lr = cfg.lr
    if cfg.anneal_lr:
        lr = optax.linear_schedule(
            cfg.lr, 0.0, cfg.updates_per_task * cfg.num_epochs * cfg.num_minibatches
        )

    def masked(grads, state, params=None):
        if mask is not None:
            grads = jax.tree.map(lambda g, m: jnp.where(m > 0, g, 0.0), grads, mask)
        return grads, state

    return optax.chain(
        optax.GradientTransformation(lambda p: optax.EmptyState(), masked),
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.adam(lr, eps=1e-5),
    )


def start_column(columns, init_columns, arm, stage):
    """The columns as a new task `stage` (traced, >= 1) starts: the fine-tuning baselines
    copy column stage - 1 into column `stage`; random_column (baseline 4) resets column
    stage - 1 to its init, so every anterior column it reads is random and frozen."""
    prev = jnp.maximum(stage - 1, 0)
    copy = (stage > 0) & jnp.isin(arm, jnp.array([ARMS.index(a) for a in FINETUNE_ARMS]))
    reset = (stage > 0) & (arm == ARMS.index("random_column"))
    return jax.tree.map(
        lambda p, p0: jnp.where(
            copy, p.at[stage].set(p[prev]), jnp.where(reset, p.at[prev].set(p0[prev]), p)
        ),
        columns,
        init_columns,
    )


# --- STATE ---


@struct.dataclass
class ArmState:
    params: Any
    opt_state: Any
    env_state: Any
    obs: jax.Array
    key: jax.Array
    init_columns: Any  # the columns at init (random_column resets its anterior columns to them)
    auc_sum: jax.Array  # [K] sum over each task's updates of the curve value last_return
    auc_count: jax.Array  # [K] the number of those updates
    last_return: jax.Array  # () mean return of the latest update where episodes ended


@struct.dataclass
class State:
    arms: ArmState  # leaves lead with the arm axis [len(cfg.arms), ...]
    arm_ids: jax.Array  # [len(cfg.arms)] indices into ARMS
    update_idx: jax.Array


def init(key, cfg: Config) -> State:
    env = make_env(cfg)
    k_net, k_env, k_run = jax.random.split(key, 3)
    obs, env_state = env.reset(k_env)
    params = init_params(k_net, cfg, int(np.prod(env.observation_shape)), env.num_actions)
    K = cfg.num_columns
    one = ArmState(
        params,
        make_optimizer(cfg).init(params),
        env_state,
        obs,
        k_run,
        params["columns"],
        jnp.zeros(K),
        jnp.zeros(K),
        jnp.zeros(()),
    )
    n = len(cfg.arms)  # every arm starts from the same params and keys
    return State(
        jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), one),
        jnp.array([ARMS.index(a) for a in cfg.arms], jnp.int32),
        jnp.zeros((), jnp.int32),
    )


# --- UPDATE ---


def arm_update(s: ArmState, arm, update_idx, cfg: Config):
    """One PPO update of arm `arm` on the task of the current stage."""
    env = make_env(cfg)
    stage = update_idx // cfg.updates_per_task
    first = update_idx % cfg.updates_per_task == 0
    gate = jnp.isin(arm, jnp.array([ARMS.index(a) for a in LATERAL_ARMS])).astype(jnp.float32)
    params = {**s.params, "columns": start_column(s.params["columns"], s.init_columns, arm, stage)}
    params = jax.tree.map(lambda new, old: jnp.where(first, new, old), params, s.params)
    mask = trainable_mask(params, arm, stage, cfg)
    optimizer = make_optimizer(cfg, mask)
    # ... a fresh optimizer (and learning-rate schedule) and fresh episodes per column
    opt_state = jax.tree.map(
        lambda a, b: jnp.where(first, a, b), optimizer.init(params), s.opt_state
    )
    key, k_reset = jax.random.split(s.key)
    obs_r, env_r = env.reset(k_reset)
    env_state = jax.tree.map(lambda a, b: jnp.where(first, a, b), env_r, s.env_state)
    obs = jnp.where(first, obs_r, s.obs)

    # --- ROLLOUT ---
    def act(obs, key):
        k_noise, k_act = jax.random.split(key)
        x = transform(obs, stage, k_noise, cfg)
        logits, value = forward(params, x, stage, gate, cfg)
        action = jax.random.categorical(k_act, logits)
        logp = jax.nn.log_softmax(logits)[jnp.arange(action.shape[0]), action]
        return action, dict(x=x, logp=logp, value=value)

    (env_state, obs, key), traj = rollout(env, act, env_state, obs, key, cfg.num_steps)
    key, k_last = jax.random.split(key)
    _, last_value = forward(params, transform(obs, stage, k_last, cfg), stage, gate, cfg)
    adv, returns = gae(
        traj["reward"], traj["value"], traj["done"], last_value, cfg.gamma, cfg.gae_lambda
    )

    # --- UPDATE --- (the frozen columns get no gradient and no update)
    batch = {k: traj[k] for k in ("x", "action", "logp", "value")} | dict(adv=adv, ret=returns)
    batch = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), batch)  # (T*N, ...)

    def loss_fn(p, mb):
        logits, value = forward(p, mb["x"], stage, gate, cfg)
        logp_all = jax.nn.log_softmax(logits)
        logp = jnp.take_along_axis(logp_all, mb["action"][:, None], -1)[:, 0]
        entropy = -(jnp.exp(logp_all) * logp_all).sum(-1)
        adv = (mb["adv"] - mb["adv"].mean()) / (mb["adv"].std() + 1e-8)
        old = (mb["logp"], adv, entropy, value, mb["value"], mb["ret"])
        return ppo_loss(logp, *old, cfg.clip_coef, cfg.vf_coef, cfg.ent_coef, clip_vloss=True)

    key, k_epochs = jax.random.split(key)
    params, opt_state, metrics = minibatch_epochs(
        k_epochs, params, opt_state, batch, loss_fn, optimizer, cfg.num_epochs, cfg.num_minibatches
    )
    auc_sum, auc_count, last_return = auc_step(s, episode_metrics(traj), stage, first, cfg)
    new = ArmState(
        params, opt_state, env_state, obs, key, s.init_columns, auc_sum, auc_count, last_return
    )
    return new, {**metrics, "return": last_return}


def auc_step(s: ArmState, ep, stage, first, cfg: Config):
    """[1] Sec. 5's area under the learning curve, one update at a time: the curve value of
    an update is the mean return of the episodes that ended in it (the previous value where
    none ended; 0 before the first on a task); AUC_k = the mean of task k's curve values."""
    ended = ep["charts/episodes"]
    last_return = jnp.where(ended > 0, ep["charts/episodic_return"], s.last_return)
    last_return = jnp.where(first & (ended == 0), 0.0, last_return)
    onehot = jax.nn.one_hot(stage, cfg.num_columns)
    return s.auc_sum + onehot * last_return, s.auc_count + onehot, last_return


def update(state: State, cfg: Config):
    arms, m = jax.vmap(lambda s, a: arm_update(s, a, state.update_idx, cfg))(
        state.arms, state.arm_ids
    )
    metrics = {k: v.mean() for k, v in m.items() if k != "return"}
    for i, a in enumerate(cfg.arms):
        metrics[f"charts/return_{a}"] = m["return"][i]
    metrics["charts/task"] = (state.update_idx // cfg.updates_per_task).astype(jnp.float32) + 1
    return State(arms, state.arm_ids, state.update_idx + 1), metrics


# --- EVALUATION ---


def eval_return(params, column, task, gate, key, cfg: Config):
    """Mean return of the first episode of eval_envs envs (cut at eval_steps) of column
    `column` on task `task`, sampling its policy with the fixed `key`."""
    env = envs.make(cfg.env_id, cfg.eval_envs)
    k_reset, k_run = jax.random.split(key)
    obs, env_state = env.reset(k_reset)

    def act(obs, key):
        k_noise, k_act = jax.random.split(key)
        logits, _ = forward(params, transform(obs, task, k_noise, cfg), column, gate, cfg)
        return jax.random.categorical(k_act, logits), {}

    _, traj = rollout(env, act, env_state, obs, k_run, cfg.eval_steps)
    alive = jnp.cumsum(traj["done"], 0) - traj["done"] == 0  # [T, N] before the first end
    return (traj["reward"] * alive).sum(0).mean()


def transfer_scores(auc, cfg: Config):
    """auc_<arm>_<k> from auc [arms, K], and transfer_<arm>_<k> = its AUC / scratch's AUC on
    each target k >= 2 (NaN where scratch's is <= 0, e.g. Catch or Pong scores)."""
    out = {}
    for i, a in enumerate(cfg.arms):
        for k in range(cfg.num_columns):
            out[f"auc_{a}_{k + 1}"] = auc[i, k]
            if "scratch" in cfg.arms and k:
                base = auc[cfg.arms.index("scratch"), k]
                out[f"transfer_{a}_{k + 1}"] = jnp.where(base > 0, auc[i, k] / base, jnp.nan)
    return out


def evaluate(state: State, cfg: Config):
    """auc_<arm>_<k>: [1]'s AUC (area under the per-update learning curve) on task k;
    transfer_<arm>_<k>: its AUC / scratch's on target k >= 2 ([1]'s transfer score; NaN where
    scratch's AUC is <= 0, e.g. on Catch or Pong); task1_<arm>: task-1 return after the whole
    sequence with the arm's network for task 1 (column 1, random for random_column; for the
    fine-tuning baselines, the one network they keep: the last)."""
    s = state.arms
    auc = s.auc_sum / jnp.maximum(s.auc_count, 1)  # [arms, K]
    out = transfer_scores(auc, cfg)
    column = jnp.array([cfg.num_columns - 1 if a in FINETUNE_ARMS else 0 for a in cfg.arms])
    gate = jnp.array([float(a in LATERAL_ARMS) for a in cfg.arms])
    task1 = jax.vmap(lambda p, c, g: eval_return(p, c, 0, g, jax.random.PRNGKey(1), cfg))(
        s.params, column, gate
    )
    return out | {f"task1_{a}": task1[i] for i, a in enumerate(cfg.arms)}


# --- PLOT ---


def plot_curves(run_dir, out):
    """Training return per arm against updates (mean over seeds), one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common import plot

    rows = plot.load(run_dir)
    c = json.loads((Path(run_dir) / "config.json").read_text())["config"]
    K, n = len(c["tasks"]), c["updates_per_task"]
    fig, axes = plt.subplots(1, K, figsize=(4.5 * K, 3.6), sharey=True)
    ys = {a: plot.curve(rows, f"charts/return_{a}")[1] for a in c["arms"]}
    for k, ax in enumerate(axes):  # smoothed within each task only
        for a, y in ys.items():
            ax.plot(np.arange(n) + 1, plot.smooth(y[k * n : (k + 1) * n], 5).mean(1), label=a)
        ax.set(title=f"task {k + 1}: {c['tasks'][k]} (column {k + 1})", xlabel="PPO updates")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("training episode return")
    axes[-1].legend(fontsize=8)
    fig.suptitle(f"Progressive nets on {c['env_id']}, {len(rows[0]['charts/task/seeds'])} seeds")
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


def main(argv=None):
    """`--plot PNG` (this file's only extra flag) draws the learning curves of every arm."""
    flags, argv = run.pop_flags(argv, "--plot")
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv, doc=__doc__)
    if flags["--plot"] is not None:
        print(plot_curves(res.run_dir, flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
