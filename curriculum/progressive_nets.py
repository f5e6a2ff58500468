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
alpha a learned scalar initialised to a small random value, V a projection of the
(k-1) n_{i-1} anterior features onto n_{i-1} dimensions (dimensionality reduction as k
grows), f = ReLU. Laterals feed every layer i >= 2 and the output layer; the input layer
has none (h_0 is the observation, shared by all columns). Each column has its own policy
and value head (per-task heads), so the frozen columns still solve their own tasks
exactly as before: progressive nets cannot forget.

Task sequence: observation transforms of one gymnax game, as [1]'s "Pong Soup" (noisy,
h-flip, ...): identity (the source), flip (mirror: the width axis reversed for MinAtar
images, the sign flipped for vector observations), permute (channels / features in reverse
order), noise (additive Gaussian noise of std `noise_std`).

Training: each column is trained on its task with PPO (common.rl's loss, GAE and
minibatch epochs; [1] trains each column with A3C). Every arm below runs in the same
compiled program on the same keys (vmapped), the baselines of [1] Sec. 5:
    progressive    the method
    scratch        baseline 1: a single column trained on each task from scratch (= the
                   progressive net with its laterals cut, U = 0: the broken variant)
    finetune_top   baseline 2: the column of the previous task copied, only its output
                   layer trained
    finetune_all   baseline 3: the column of the previous task copied, all of it trained
    random_column  baseline 4: the progressive net whose column 1 stays at its random init
Metric ([1] Sec. 5): AUC = the average score per episode during training on a task, and the
transfer score of an arm on a target task = its AUC / the AUC of baseline 1 (scratch).

Reproduce (CPU, CartPole-v1 -> mirrored CartPole-v1, 2 columns, every arm, 2 seeds):
    python curriculum/progressive_nets.py --preset quick --num-seeds 2 \
        --plot curriculum/progressive_nets.png
Paper-scale run (GPU; Breakout-MinAtar -> flipped -> channel-permuted, 3 columns):
    python curriculum/progressive_nets.py --preset paper

Measured (`quick`: CartPole-v1, then CartPole-v1 with negated observations (a mirror:
the same physics, left and right swapped), columns 64-64, 150 PPO updates of 16 x 64 steps
per task, the five arms in one program, 2 seeds, a loaded 2-core CPU: 72 s of CPU, 7 min
wall, compile included). AUC on task 2 (mean return per training episode) and the
transfer score (AUC / scratch's AUC), seeds' mean +- std:
    progressive     161.8 +- 5.3    1.153 +- 0.015
    random_column   150.7 +- 11.8   1.074 +- 0.063   (baseline 4: frozen untrained column 1)
    scratch         140.2 +- 2.8    1               (baseline 1 = laterals cut, U = 0)
    finetune_all     34.1 +- 10.0   0.242 +- 0.066   (baseline 3)
    finetune_top     12.9 +- 2.3    0.091 +- 0.014   (baseline 2)
Task 1 (AUC 125.1 in every arm that trains column 1) afterwards, with the network each
arm keeps for it (`task1_*`, 16 episodes of 500 steps): progressive 232.8 (column 1
untouched), finetune_all 13.1 and finetune_top 68.2 (forgotten). As in [1] (Pong Soup's
h-flip and [2]'s summary): fine-tuning only the top layer fails to transfer, and the
progressive net transfers positively where fine-tuning the whole column from the mirrored
task is held back (negative transfer: its copied policy pushes the wrong way first).
Plot: curriculum/progressive_nets.png. [1]'s own numbers (Atari / Labyrinth transfer
matrices) are not quoted: no copy of the paper's tables was at hand here.

Differences from the paper:
- Columns are MLPs over the flattened observation, so the adapters are linear projections
  (V) and never 1x1 convolutions; [1]'s Atari columns are Mnih et al.'s conv net.
- Training is PPO (common.rl's clipped loss, GAE, Adam with a global-norm clip) on
  vectorised gymnax envs, not A3C with 16 asynchronous threads; [1] reports the mean of
  the top 3 of 25 jobs with sampled learning rates and entropy costs, here every seed
  counts and the hyperparameters are fixed.
- Tasks are MinAtar / CartPole observation transforms, not Atari Pong Soup, other Atari
  games or Labyrinth.
- The output layer's adapter serves the policy logits and the value together (one layer
  of num_actions + 1 units; [1]'s A3C heads share their torso too).
- alpha is drawn from U(0, alpha_init) ([1]: "initialized by a random small value").
- The fine-tuning baselines copy the previous task's column into a fresh slot (the
  policy and value heads included), so the copied-from column stays available; `evaluate`
  scores them on task 1 with their last column, the single network a fine-tuned agent
  keeps, which shows their forgetting.
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
    """the task sequence, one column each (K = len(tasks)): identity | flip | permute |
    noise"""
    arms: tuple[str, ...] = ARMS
    """arms run side by side on the same keys: progressive | scratch (baseline 1) |
    finetune_top (2) | finetune_all (3) | random_column (4)"""
    noise_std: float = 0.5
    """std of the additive Gaussian observation noise of the `noise` task"""
    hidden: tuple[int, ...] = (256, 256)
    """hidden layer sizes n_1..n_L of every column"""
    alpha_init: float = 0.1
    """the adapters' scalars alpha start at U(0, alpha_init) ("a random small value")"""
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
        if self.noise_std < 0 or self.alpha_init < 0:
            raise ValueError(
                f"noise_std={self.noise_std} and alpha_init={self.alpha_init} must be >= 0"
            )
        if (self.num_envs * self.num_steps) % self.num_minibatches:
            raise ValueError(
                f"num_envs * num_steps = {self.num_envs * self.num_steps} is not "
                f"divisible by num_minibatches={self.num_minibatches}"
            )
        for name in ("clip_coef", "eval_envs", "eval_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")


PRESETS = {
    # CPU demo: CartPole-v1 then mirrored CartPole-v1, 2 x 64 columns, 100 updates of
    # 16 x 64 steps per task, every arm side by side.
    "quick": dict(
        env_id="CartPole-v1",
        tasks=("identity", "flip"),
        hidden=(64, 64),
        updates_per_task=150,
        num_envs=16,
        num_steps=64,
        num_minibatches=4,
        lr=1e-3,
        eval_steps=500,
    ),
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
    return {
        "kernel": orthogonal(scale)(key, (n_in, n_out)),
        "bias": jnp.zeros(n_out),
    }


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
        pi, v = (
            dense_init(ks[-2], sizes[-1], num_actions, 0.01),
            dense_init(ks[-1], sizes[-1], 1, 1.0),
        )
        out = {"kernel": jnp.concatenate([pi["kernel"], v["kernel"]], 1), "bias": jnp.zeros(n_out)}
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
                    "alpha": jax.random.uniform(ka, ()) * cfg.alpha_init,
                    "V": orthogonal(np.sqrt(2))(kv, (k * n_prev, n_prev)),
                    "U": orthogonal(scale)(ku, (n_prev, n_i)),
                }
            )
        adapters.append(layer_adapters)
    return {"columns": columns, "adapters": adapters}


def adapter(p, anterior, dtype):
    """[1] Eq. 2's lateral term U f(V (alpha * h^(<k))): anterior [B, (k-1) n] -> [B, n_i]."""
    z = (p["alpha"] * anterior).astype(dtype) @ p["V"].astype(dtype)  # [B, n_{i-1}]
    return jax.nn.relu(z) @ p["U"].astype(dtype)


def progressive_layer(w, h_own, anterior, lateral, gate, dtype, f=jax.nn.relu):
    """[1] Eq. 2: h_i^(k) = f(W h_{i-1}^(k) + b + gate * U f(V alpha h_{i-1}^(<k))); `lateral`
    None for column 1 (no anterior columns), gate 0 cuts the laterals (baseline 1)."""
    pre = h_own.astype(dtype) @ w["kernel"].astype(dtype) + w["bias"].astype(dtype)
    if lateral is not None:
        pre = pre + gate * adapter(lateral, anterior, dtype)
    return f(pre.astype(jnp.float32))


def forward(params, x, column, gate, cfg: Config):
    """Outputs [B, A + 1] (logits, value) of column `column` (traced) on inputs x [B, ...].
    Every column runs (column k reads columns j < k at each layer); `column` picks one."""
    dtype = jnp.dtype(cfg.dtype)
    x = x.reshape(x.shape[0], -1)
    cols, ad = params["columns"], params["adapters"]
    K, L = cfg.num_columns, len(cfg.hidden)
    h = [
        progressive_layer(
            jax.tree.map(lambda a: a[k], cols["layers"][0]), x, None, None, gate, dtype
        )
        for k in range(K)
    ]  # layer 1: no laterals
    for i in range(1, L + 1):  # layers 2..L, then the output layer (i = L + 1)
        w = cols["layers"][i] if i < L else cols["out"]
        f = jax.nn.relu if i < L else (lambda z: z)
        h = [
            progressive_layer(
                jax.tree.map(lambda a: a[k], w),
                h[k],
                jnp.concatenate(h[:k], -1) if k else None,
                ad[k - 1][i - 1] if k else None,
                gate,
                dtype,
                f,
            )
            for k in range(K)
        ]
    return jnp.stack(h)[column]  # [B, A + 1]


def policy_value(params, x, column, gate, cfg: Config):
    out = forward(params, x, column, gate, cfg)
    return out[..., :-1], out[..., -1]


# --- FREEZING ---


def trainable_mask(params, arm, stage, cfg: Config):
    """1 where a parameter is trained in `stage` by arm `arm` (both traced), 0 elsewhere:
    the earlier columns are frozen ([1] Sec. 2). Column `stage` and its adapters train;
    finetune_top trains its output layer only after task 1; random_column leaves column 1
    untrained."""
    arm_is = {a: arm == ARMS.index(a) for a in ARMS}
    on = jnp.arange(cfg.num_columns) == stage  # [K]
    on = on & ~(arm_is["random_column"] & (stage == 0))
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


def freeze(params, mask):
    """The gradient flows only where mask = 1 (stop_gradient elsewhere; values unchanged)."""
    return jax.tree.map(
        lambda p, m: jnp.where(m > 0, p, jax.lax.stop_gradient(p)),
        params,
        jax.tree.map(lambda m, p: jnp.broadcast_to(m, p.shape), mask, params),
    )


def make_optimizer(cfg: Config, mask=None):
    """Adam after a global-norm clip (common.rl's PPO); with a mask, the updates of the
    frozen parameters are set to exactly 0."""
    lr = cfg.lr
    if cfg.anneal_lr:
        lr = optax.linear_schedule(
            cfg.lr, 0.0, cfg.updates_per_task * cfg.num_epochs * cfg.num_minibatches
        )

    def masked(updates, state, params=None):
        if mask is not None:
            updates = jax.tree.map(lambda u, m: jnp.where(m > 0, u, 0.0), updates, mask)
        return updates, state

    return optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.adam(lr, eps=1e-5),
        optax.GradientTransformation(lambda p: optax.EmptyState(), masked),
    )


# --- STATE ---


@struct.dataclass
class ArmState:
    params: Any
    opt_state: Any
    env_state: Any
    obs: jax.Array
    key: jax.Array
    auc_sum: jax.Array  # [K] sum of the returns of the episodes ended on each task
    auc_count: jax.Array  # [K] their number
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
    params = s.params
    # A new task: the fine-tuning baselines start column `stage` as a copy of the previous.
    copy = first & (stage > 0) & jnp.isin(arm, jnp.array([ARMS.index(a) for a in FINETUNE_ARMS]))
    params = {
        **params,
        "columns": jax.tree.map(
            lambda p: jnp.where(copy, p.at[stage].set(p[jnp.maximum(stage - 1, 0)]), p),
            params["columns"],
        ),
    }
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
        logits, value = policy_value(params, x, stage, gate, cfg)
        action = jax.random.categorical(k_act, logits)
        logp = jax.nn.log_softmax(logits)[jnp.arange(action.shape[0]), action]
        return action, dict(x=x, logp=logp, value=value)

    (env_state, obs, key), traj = rollout(env, act, env_state, obs, key, cfg.num_steps)
    key, k_last = jax.random.split(key)
    _, last_value = policy_value(params, transform(obs, stage, k_last, cfg), stage, gate, cfg)
    adv, returns = gae(
        traj["reward"], traj["value"], traj["done"], last_value, cfg.gamma, cfg.gae_lambda
    )

    # --- UPDATE --- (the frozen columns get no gradient and no update)
    batch = dict(
        x=traj["x"],
        action=traj["action"],
        logp=traj["logp"],
        value=traj["value"],
        adv=adv,
        ret=returns,
    )
    batch = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), batch)  # (T*N, ...)

    def loss_fn(p, mb):
        logits, value = policy_value(freeze(p, mask), mb["x"], stage, gate, cfg)
        logp_all = jax.nn.log_softmax(logits)
        logp = jnp.take_along_axis(logp_all, mb["action"][:, None], -1)[:, 0]
        entropy = -(jnp.exp(logp_all) * logp_all).sum(-1)
        adv = (mb["adv"] - mb["adv"].mean()) / (mb["adv"].std() + 1e-8)
        return ppo_loss(
            logp,
            mb["logp"],
            adv,
            entropy,
            value,
            mb["value"],
            mb["ret"],
            cfg.clip_coef,
            cfg.vf_coef,
            cfg.ent_coef,
            clip_vloss=True,
        )

    key, k_epochs = jax.random.split(key)
    params, opt_state, metrics = minibatch_epochs(
        k_epochs, params, opt_state, batch, loss_fn, optimizer, cfg.num_epochs, cfg.num_minibatches
    )
    ep = episode_metrics(traj)
    ended = ep["charts/episodes"]
    onehot = jax.nn.one_hot(stage, cfg.num_columns)
    last_return = jnp.where(ended > 0, ep["charts/episodic_return"], s.last_return)
    last_return = jnp.where(first & (ended == 0), 0.0, last_return)
    new = ArmState(
        params,
        opt_state,
        env_state,
        obs,
        key,
        s.auc_sum + onehot * (traj["ret"] * traj["ended"]).sum(),
        s.auc_count + onehot * ended,
        last_return,
    )
    return new, {**metrics, "return": last_return}


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
        logits, _ = policy_value(params, transform(obs, task, k_noise, cfg), column, gate, cfg)
        return jax.random.categorical(k_act, logits), {}

    _, traj = rollout(env, act, env_state, obs, k_run, cfg.eval_steps)
    alive = jnp.cumsum(traj["done"], 0) - traj["done"] == 0  # [T, N] before the first end
    return (traj["reward"] * alive).sum(0).mean()


def evaluate(state: State, cfg: Config):
    """auc_<arm>_<k>: [1]'s AUC (mean return per training episode) on task k;
    transfer_<arm>: its AUC / scratch's, averaged over the target tasks 2..K ([1]'s transfer
    score); task1_<arm>: task-1 return after the whole sequence with the arm's network for
    task 1 (column 1; for the fine-tuning baselines, the one network they keep: the last)."""
    s = state.arms
    auc = s.auc_sum / jnp.maximum(s.auc_count, 1)  # [arms, K]
    out = {}
    for i, a in enumerate(cfg.arms):
        for k in range(cfg.num_columns):
            out[f"auc_{a}_{k + 1}"] = auc[i, k]
        if "scratch" in cfg.arms:  # a ratio of scores: NaN unless scratch's AUC is > 0
            base = auc[cfg.arms.index("scratch"), 1:]
            out[f"transfer_{a}"] = jnp.where(base > 0, auc[i, 1:] / base, jnp.nan).mean()
        params = jax.tree.map(lambda x, i=i: x[i], s.params)
        column = cfg.num_columns - 1 if a in FINETUNE_ARMS else 0
        gate = 1.0 if a in LATERAL_ARMS else 0.0
        out[f"task1_{a}"] = eval_return(params, column, 0, gate, jax.random.PRNGKey(1), cfg)
    return out


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
    for a in c["arms"]:
        _, y, _ = plot.curve(rows, f"charts/return_{a}")
        for k, ax in enumerate(axes):  # smoothed within each task only
            ax.plot(np.arange(n) + 1, plot.smooth(y[k * n : (k + 1) * n], 5).mean(1), label=a)
    for k, ax in enumerate(axes):
        ax.set(title=f"task {k + 1}: {c['tasks'][k]} (column {k + 1})", xlabel="PPO updates")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("training episode return")
    axes[-1].legend(fontsize=8)
    seeds = len(rows[0]["charts/task/seeds"])
    fig.suptitle(f"Progressive nets on {c['env_id']}, {seeds} seeds", fontsize=10)
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
