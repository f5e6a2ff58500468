"""Unsupervised meta-RL: meta-learn on tasks proposed by a random or a DIAYN discriminator.

[1] A. Gupta, B. Eysenbach, C. Finn, S. Levine. "Unsupervised Meta-Learning for
    Reinforcement Learning." arXiv:1806.04640 (2018; v3 2020). No released code was found.
[2] B. Eysenbach, A. Gupta, J. Ibarz, S. Levine. "Diversity is All You Need."
    arXiv:1802.06070: the learned task proposer (metarl/diayn.py).
[3] C. Finn, P. Abbeel, S. Levine. "Model-Agnostic Meta-Learning." arXiv:1703.03400: the
    meta-learner, MAML with a policy-gradient inner step and a TRPO outer step
    (metarl/maml_rl.py).

A controlled Markov process C = <S, A, P> has no reward. A task proposer turns it into a
distribution of MDPs: a task is a latent z ~ p(z) (uniform over K) and its reward is

    r_z(s) = log D(z | s) = log_softmax(D(s))[z]              [1] Sec. 3 [M: Eq. 2, not re-read]

with D either a discriminator with random weights D_{phi_rand} (`--proposer random`) or
the one learned by DIAYN on C ([2]; `--proposer diayn`), which maximises I(S; Z). D is then
frozen, and a meta-learner is meta-trained on the MDPs (C, r_z), a fresh batch of z per
meta-iteration ([1] Alg. 1); at meta-test time it meets hand-designed rewards it never saw,
here the goals of 2-D navigation, r(s) = -||s - g||, g ~ U[-0.5, 0.5]^2. This file is a thin
driver: DIAYN (metarl/diayn.py `init`/`update`, its discriminator network) proposes, MAML
(metarl/maml_rl.py: policy, advantages, inner step, meta-objective, TRPO step, evaluation)
learns; what is written here is the reward wrapper, the rollout of C under r_z, and the
meta-update on the proposed tasks:

    D_i ~ pi_theta on (C, r_{z_i}),  z_i ~ p(z), i = 1..meta_batch_size   (vmapped tasks)
    theta'_i = theta - alpha grad L_{z_i}(theta; D_i)                   [3] Alg. 3
    TRPO on mean_i L_{z_i}(theta'_i; D'_i) s.t. KL <= delta                [3] Sec. 5.3

The meta-learner is MAML, the one [1]'s abstract names (DIAYN + model-agnostic meta-learning)
and uses on 2-D navigation. The baseline of [1] Fig. 3, learning from scratch, is the same
policy-gradient adaptation from the run's untrained initialisation (`random/return_XX`),
the same env steps on the same test goals; `adapt/return_XX` is the meta-learned one. [1]'s
reference arm, MAML meta-trained on the hand-designed goals themselves, is maml_rl.py's run
on the same test: `--compare` draws it (see Reproduce).

Reproduce (CPU; DIAYN's proposer, then a random-discriminator run for comparison):
    python metarl/unsupervised_meta_rl.py --preset quick --num-seeds 2 --proposer random \
        --run-dir runs/uml_random
    python metarl/unsupervised_meta_rl.py --preset quick --num-seeds 2 \
        --plot metarl/unsupervised_meta_rl.png --compare runs/uml_random
`--compare` also takes a maml_rl.py run (MAML on hand-designed goals, [1]'s reference arm,
the same quick-preset sizes and meta-test: `python metarl/maml_rl.py --preset quick
--num-seeds 2 --num-iterations 60 --run-dir runs/mrl_quick60`; not drawn in the PNG yet).
Paper-sized (GPU): python metarl/unsupervised_meta_rl.py --preset paper
Ours (quick preset, 2 seeds, 40 new goals x 40 trajectories of 50 steps; 2-core CPU shared
with other jobs: DIAYN run 119 s wall with a warm compilation cache, random run 164 s
including 64 s compile), average return after 0 / 1 / 2 / 3 PG steps, per seed:
    DIAYN proposer (accuracy 0.84, 0.88; 8 skills)  -62.5 -42.4 / -30.4 -17.2 /
        -18.9 -12.1 / -12.3 -10.5
    random discriminator                             -35.5 -27.4 / -19.4 -14.0 /
        -12.8  -8.4 / -13.6  -7.0
    from scratch (untrained init, same goals)        -31.6 -29.3 / -30.4 -27.7 /
        -29.9 -27.3 / -29.3 -26.6
Both proposers beat learning from scratch after two steps on both seeds; after one step
the random discriminator does on both, DIAYN on seed 1 only (seed 0 ties, -30.4 and -30.4).
The random discriminator is ahead of DIAYN at every step (DIAYN's meta-policy starts worse:
it heads for a wall of the box, where its skills live; plot). At the tests' size (4 skills,
10 iterations; slow tier, 8 seeds) DIAYN - random is 0.09 +- 0.71 after one step (not told
apart) and 0.88 +- 0.37 after two (6 of 8 seeds): no robust ordering either way.
[1] [M: figures not re-read]: Fig. 3 compares UML-DIAYN and UML-random with learning from
scratch (and with "DIAYN init" and "VIME init" fine-tuning baselines); its caption says
learning the task distribution with DIAYN "helps more for complex tasks", i.e. on 2-D
navigation random ~ DIAYN, as here. Fig. 4 compares UML-DIAYN with MAML on handcrafted
rewards ("competitive").

Differences from the paper:
- The CMP of meta-training is diayn.py's PointMass2D, the one DIAYN learns D on: start at 0,
  pos' = clip(pos + 0.1 clip(a, -1, 1), -1, 1) (the box [-1, 1]^2). The meta-test goals live
  in maml_rl's PointNav2D (the same step, unbounded, goals inside [-0.5, 0.5]^2, episodes
  end at the goal). r_z is scored on the next state s_{t+1} (as DIAYN's Alg. 1) and has no
  -log p(z) term ([1] writes log D(z|s)): the constant log K per step changes each
  return-to-go by a function of t only, absorbed up to the cubic-in-t baseline fit.
- The random discriminator is DIAYN's discriminator network at its initialisation (flax's
  default init), the very weights the DIAYN run starts from; [1] does not say its init [M].
  flax's Dense biases start at 0, so this ReLU MLP is positively homogeneous: D(c s) =
  c D(s) for c > 0, and argmax_z D(z|s) is constant on rays from the start state 0. Its
  regions are cones (sectors around 0), and each r_z reduces to "go as far as you can into
  sector z", close to the meta-test family of goals around the origin; this likely explains
  why the random proposer does as well as DIAYN here (whose learned D is cone-shaped too).
  A random D with non-zero biases (an ablation) is not built.
- Not built: [1]'s "DIAYN init" and "VIME init" baselines (fine-tuning a pretrained skill or
  exploration policy) and an RL^2 meta-learner ([1] also reports one; the catalogue's test
  asks for it): MAML is the meta-learner of [1]'s 2-D navigation, and RL^2 here would need
  metarl/rl2.py to take a task sampler; its episodes of the CMP are not built.
- `steps_per_update` (the runner's env-step count) is the meta-learner's only: the
  proposer's DIAYN steps (`proposer_timesteps`, 16k quick, 1M paper) are spent in `init`
  and not counted.
- Sizes (skills, DIAYN steps, network widths) are ours: [1]'s 2-D navigation settings were
  not re-read [M]. `paper` takes DIAYN's released 'point' variant (50 skills, 2 x 32, lr
  3e-4, 1 env, 1 gradient step per step; 1M steps ours) and MAML's 2-D navigation setting
  ([3] App. A.2: 20 tasks x 20 trajectories of 100 steps, alpha 0.1, delta 0.01, 500
  iterations).
- DIAYN is trained inside `init` (a jitted scan of diayn.update); `update` is one MAML-TRPO
  meta-iteration on proposed tasks: maml_rl's sample_meta_batch (with this file's sampler)
  and meta_update.
- The linear baseline's least squares is retried with 10x the ridge where it fails, as rllab
  does (maml_rl.fit_baseline): a policy pressed against a wall of the box makes the normal
  equations singular in float32 (x = x^2 = 1), and the quick preset hit NaN advantages at
  iteration 38 without the retry.
- `proposer_accuracy` is DIAYN's discriminator accuracy on its last training batch (NaN
  for the random proposer, which is never trained).
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from common import run
from metarl import diayn
from metarl import maml_rl as mrl

# --- CONFIG ---

PROPOSERS = ("diayn", "random")


@dataclass(frozen=True)
class Config:
    """Unsupervised meta-RL: DIAYN or random task proposals, MAML-TRPO on 2-D navigation."""

    proposer: str = "diayn"
    """task proposer: diayn (D learned by DIAYN on the CMP) or random (D with random weights)"""
    num_skills: int = 50
    """K: z ~ uniform over K, the number of proposed tasks (DIAYN's released 'point' variant)"""
    proposer_timesteps: int = 1_000_000
    """DIAYN environment steps before meta-training (diayn only; ours)"""
    proposer_envs: int = 1
    """DIAYN parallel environments"""
    proposer_grad_steps: int = 1
    """DIAYN gradient steps per DIAYN update"""
    proposer_lr: float = 3e-4
    """DIAYN Adam learning rate (policy, critics, discriminator)"""
    proposer_hidden: tuple[int, ...] = (32, 32)
    """hidden sizes of DIAYN's networks, the discriminator D included"""
    proposer_batch_size: int = 128
    """DIAYN transitions per gradient step"""
    proposer_buffer_size: int = 1_000_000
    """DIAYN replay capacity in transitions"""
    proposer_learning_starts: int = 1000
    """DIAYN transitions stored before its first gradient step"""
    hidden: int = 100
    """units of each hidden ReLU layer of the meta-learned Gaussian policy"""
    num_layers: int = 2
    """hidden layers of the policy"""
    init_std: float = 1.0
    """initial policy standard deviation (in [-1, 1] action units)"""
    horizon: int = 100
    """steps of one trajectory (meta-training, meta-test and DIAYN's episodes)"""
    inner_lr: float = 0.1
    """alpha: step size of the policy-gradient inner step (training and meta-test)"""
    inner_steps: int = 1
    """inner PG steps per proposed task during meta-training"""
    num_trajectories: int = 20
    """trajectories per task for each inner step and for the post-update objective"""
    meta_batch_size: int = 20
    """proposed tasks z per meta-iteration (a fresh draw each iteration)"""
    gamma: float = 0.99
    """discount of the policy-gradient returns"""
    max_kl: float = 0.01
    """delta: TRPO's bound on the mean KL of the post-update policy"""
    num_iterations: int = 500
    """meta-iterations on proposed tasks"""
    eval_tasks: int = 40
    """evaluate(): hand-designed test tasks (goals g ~ U[-0.5, 0.5]^2)"""
    eval_steps: int = 3
    """evaluate(): PG steps of the adaptation curve (0..eval_steps)"""
    eval_trajectories: int = 40
    """evaluate(): trajectories per goal per adaptation step"""
    eval_lr_decay: float = 0.5
    """evaluate(): steps after the first use alpha * eval_lr_decay"""
    dtype: str = "float32"
    """compute dtype of the policy's and DIAYN's matmuls: float32 or bfloat16"""

    @property
    def num_updates(self) -> int:
        return self.num_iterations

    @property
    def steps_per_update(self) -> int:
        """the meta-learner's env steps per meta-iteration (DIAYN's, in init, not counted)"""
        return learner_config(self).steps_per_update

    def validate(self):
        if self.proposer not in PROPOSERS:
            raise ValueError(f"proposer={self.proposer!r} must be one of {PROPOSERS}")
        if self.num_skills < 2:
            raise ValueError(f"num_skills={self.num_skills} must be >= 2")
        for name, sub in (("proposer (diayn.Config)", proposer_config),
                          ("meta-learner (maml_rl.Config)", learner_config)):
            try:
                sub(self).validate()
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None


PRESETS = {
    # CPU demo: 8 skills from 16k DIAYN steps, then 10 tasks x 10 trajectories of 50 steps,
    # a 2 x 32 policy, a wider trust region, 60 meta-iterations.
    "quick": dict(num_skills=8, proposer_timesteps=16_000, proposer_envs=16,
                  proposer_grad_steps=2, proposer_lr=1e-3, proposer_hidden=(64, 64),
                  proposer_buffer_size=16_000, meta_batch_size=10, num_trajectories=10,
                  horizon=50, hidden=32, max_kl=0.05, num_iterations=60),
    "paper": dict(),
}


def proposer_config(cfg: Config) -> diayn.Config:
    """DIAYN on the 2-D point with the meta-learner's horizon and step size."""
    return diayn.Config(
        env_id="PointMass2D", num_skills=cfg.num_skills, total_timesteps=cfg.proposer_timesteps,
        num_envs=cfg.proposer_envs, episode_length=cfg.horizon,
        grad_steps=cfg.proposer_grad_steps, lr=cfg.proposer_lr, hidden=cfg.proposer_hidden,
        batch_size=cfg.proposer_batch_size, buffer_size=cfg.proposer_buffer_size,
        learning_starts=cfg.proposer_learning_starts, max_speed=mrl.ACTION_SCALE,
        dtype=cfg.dtype)


def learner_config(cfg: Config) -> mrl.Config:
    return mrl.Config(
        algo="maml", hidden=cfg.hidden, num_layers=cfg.num_layers, init_std=cfg.init_std,
        horizon=cfg.horizon, inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps,
        num_trajectories=cfg.num_trajectories, meta_batch_size=cfg.meta_batch_size,
        gamma=cfg.gamma, max_kl=cfg.max_kl, num_iterations=cfg.num_iterations,
        eval_tasks=cfg.eval_tasks, eval_steps=cfg.eval_steps,
        eval_trajectories=cfg.eval_trajectories, eval_lr_decay=cfg.eval_lr_decay,
        dtype=cfg.dtype)


# --- NETWORKS --- (D: DIAYN's state-only classifier; pi_theta: MAML's Gaussian MLP)


def discriminator(cfg: Config):
    return diayn.networks(proposer_config(cfg))[2]


# --- TASK PROPOSAL ---


def task_reward(disc, disc_params, z, s):
    """[1] Eq. 2: r_z(s) = log D(z | s) = log_softmax(D(s))[z]; s [..., 2], z an int."""
    return jax.nn.log_softmax(disc.apply(disc_params, s), -1)[..., z]


def sample_tasks(key, cfg: Config):
    """z_1..z_B ~ p(z) = uniform over the K skills: one meta-batch of proposed tasks."""
    return jax.random.randint(key, (cfg.meta_batch_size,), 0, cfg.num_skills)


def train_proposer(key, cfg: Config):
    """(D's params, DIAYN's last batch accuracy): DIAYN's discriminator at init (random; zero
    biases, so D(c s) = c D(s) for c > 0) or after proposer_timesteps of DIAYN (one jitted
    diayn.update, scanned)."""
    pcfg = proposer_config(cfg)
    start = diayn.init(key, pcfg)
    if cfg.proposer == "random":  # nothing to train
        return start.params["disc"], jnp.float32(jnp.nan)
    end, metrics = jax.lax.scan(lambda s, _: diayn.update(s, pcfg), start, None,
                                length=pcfg.num_updates)
    return end.params["disc"], metrics["charts/disc_accuracy"][-1]


# --- ROLLOUT ---


def rollout(net, params, reward_fn, key, num: int, pcfg: diayn.Config):
    """`num` trajectories of pi_params in the CMP (DIAYN's point mass: pos' = clip(pos +
    0.1 clip(a, -1, 1), -1, 1) from the centre), paid reward_fn(s_{t+1}): (obs, act, rew,
    mask) [num, T, ...] in maml_rl's layout (mask all ones: no task ends early)."""
    obs, inner = diayn.env_reset(pcfg, key, num)

    def step(carry, k):
        obs, inner = carry
        mean, log_std = net.apply(params, obs)
        a = mean + jnp.exp(log_std) * jax.random.normal(k, mean.shape)
        obs2, inner2, _ = diayn.env_step(pcfg, inner, jnp.clip(a, -1.0, 1.0))
        return (obs2, inner2), (obs, a, reward_fn(obs2))

    _, (o, a, r) = jax.lax.scan(step, (obs, inner), jax.random.split(key, pcfg.episode_length))
    o, a, r = (jnp.swapaxes(x, 0, 1) for x in (o, a, r))  # [num, T, ...]
    return o, a, r, jnp.ones_like(r)


def sample_batch(net, params, reward_fn, key, cfg: Config, num: int) -> mrl.Batch:
    """A rollout of the CMP under reward_fn with maml_rl's advantages (linear feature
    baseline with rllab's ridge retry: against the box's walls x = x^2 = 1 on every step and
    the float32 normal equations go singular; GAE; standardised)."""
    mcfg = learner_config(cfg)
    o, a, r, m = rollout(net, params, reward_fn, key, num, proposer_config(cfg))
    return mrl.Batch(o, a, r, m, mrl.advantages(o, r, m, mcfg.gamma, mcfg.gae_lambda,
                                                mcfg.baseline_reg))


def sample_meta_batch(net, theta, disc, disc_params, zs, key, lr, cfg: Config):
    """maml_rl's meta-batch sampler on the proposed tasks z (vmapped): inner batches from
    theta_i, the post-update batch from theta', and log pi_old on it, all under r_z."""
    def sample(params, z, k, num):
        return sample_batch(net, params, lambda s: task_reward(disc, disc_params, z, s), k, cfg,
                            num)

    return mrl.sample_meta_batch(net, theta, zs, key, lr, learner_config(cfg), sample)


# --- STATE ---


@struct.dataclass
class State:
    params: Any  # theta, the meta-learned policy
    init_params: Any  # theta at initialisation (the learning-from-scratch baseline)
    disc_params: Any  # D, frozen during meta-training
    key: jax.Array
    train_lr: jax.Array  # alpha inside the meta-objective
    proposer_accuracy: jax.Array


def init(key, cfg: Config) -> State:
    k_prop, k_net, key = jax.random.split(key, 3)
    disc_params, acc = train_proposer(k_prop, cfg)
    params = mrl.network(learner_config(cfg)).init(k_net, jnp.zeros((1, 2)))
    return State(params, params, disc_params, key, jnp.float32(cfg.inner_lr), acc)


# --- UPDATE ---


def update(state: State, cfg: Config):
    """One MAML-TRPO meta-iteration on a fresh meta-batch of proposed tasks."""
    mcfg = learner_config(cfg)
    net, disc = mrl.network(mcfg), discriminator(cfg)
    key, k_task, k_roll = jax.random.split(state.key, 3)
    zs = sample_tasks(k_task, cfg)
    inner, test, old_logp = sample_meta_batch(net, state.params, disc, state.disc_params, zs,
                                              k_roll, state.train_lr, cfg)
    params, metrics = mrl.meta_update(state, inner, test, old_logp, mcfg)  # MAML-TRPO's step
    metrics["charts/task_z_mean"] = zs.mean().astype(jnp.float32)
    return state.replace(params=params, key=key), metrics


# --- EVALUATE ---


def evaluate(state: State, cfg: Config):
    """maml_rl's meta-test on hand-designed goals: adapt/return_XX (meta-learned theta) and
    random/return_XX (learning from scratch: the untrained theta), XX = 0..eval_steps PG
    steps; plus the proposer's accuracy."""
    mcfg = learner_config(cfg)
    out = mrl.evaluate(mrl.State(state.params, state.init_params, state.key, state.train_lr),
                       mcfg)
    out["proposer_accuracy"] = state.proposer_accuracy
    return out


# --- PLOT ---


def skill_map(disc_params, cfg: Config, lim: float = 1.5, n: int = 121):
    """argmax_z D(z | s) on an n x n grid over [-lim, lim]^2: the proposed tasks' regions."""
    g = jnp.linspace(-lim, lim, n)
    s = jnp.stack(jnp.meshgrid(g, g, indexing="xy"), -1)  # [n, n, 2]
    return discriminator(cfg).apply(disc_params, s).argmax(-1)


def plot(curves, region, out: str, lim: float = 1.5):
    """Left: argmax_z D(z|s) of seed 0 (the proposed tasks; the box is DIAYN's arena, the
    dashed square the test goals' range). Right: meta-test return against PG steps for each
    (evaluate() output, label, prefix) in `curves` (mean over seeds, band min..max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.plot import save_png

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4.2))
    k = max(int(np.asarray(region).max()), 9)  # one tab10 colour per skill when K <= 10
    ax.imshow(np.asarray(region), origin="lower", extent=(-lim, lim, -lim, lim), vmin=0,
              vmax=k, cmap="tab10" if k == 9 else "hsv", interpolation="nearest")
    ax.plot([-1, 1, 1, -1, -1], [-1, -1, 1, 1, -1], "k-", lw=1)
    ax.plot([-.5, .5, .5, -.5, -.5], [-.5, -.5, .5, .5, -.5], "k--", lw=1)
    ax.set_title("proposed tasks: argmax_z D(z|s), seed 0", fontsize=9)
    for final, label, prefix in curves:
        keys = sorted(k for k in final if k.startswith(prefix + "/return_"))
        y = np.stack([np.asarray(final[k], np.float64) for k in keys], -1)  # [seeds, steps+1]
        x = np.arange(y.shape[1])
        bx.plot(x, y.mean(0), marker="o", label=f"{label} ({y.shape[0]} seeds)")
        bx.fill_between(x, y.min(0), y.max(0), alpha=0.2)
    bx.set(xlabel="policy-gradient steps on the new goal", ylabel="average return",
           xticks=range(y.shape[1]))
    bx.grid(alpha=0.3)
    bx.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, out)


# --- MAIN ---


LABELS = {"diayn": "UML, DIAYN proposer", "random": "UML, random discriminator"}


def main(argv=None):
    """The runner's CLI plus `--plot PNG` (seed 0's proposed tasks and the meta-test curves)
    and `--compare DIR` (also the curve of an earlier run, e.g. the random proposer)."""
    flags, argv = run.pop_flags(argv, "--plot", "--compare")
    res = run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                   doc=__doc__, summary_keys=[
                       "adapt/return_00", "adapt/return_01", "adapt/return_02",
                       "random/return_01", "random/return_02", "proposer_accuracy",
                       "charts/post_adapt_return"])
    if flags["--plot"] is not None:
        cfg = run.parse(Config, PRESETS, argv)[0]
        curves = [(res.final, LABELS[cfg.proposer], "adapt")]
        if flags["--compare"]:
            d = Path(flags["--compare"])
            summary = json.loads((d / "summary.json").read_text())
            summary = {k: np.array([np.nan if x is None else x for x in v], np.float64)
                       for k, v in summary.items() if isinstance(v, list)}
            c = json.loads((d / "config.json").read_text())["config"]
            algo = c.get("algo", "maml")  # no proposer: a maml_rl.py run
            label = (LABELS[c["proposer"]] if "proposer" in c else "MAML, hand-designed goals"
                     if algo == "maml" else f"maml_rl --algo {algo}, hand-designed goals")
            curves.append((summary, label, "adapt"))
        curves.append((res.final, "from scratch (untrained init)", "random"))
        disc0 = jax.tree.map(lambda x: np.asarray(x)[0], res.state.disc_params)
        region = jax.jit(skill_map, static_argnums=1)(disc0, cfg)
        print("wrote", plot(curves, region, flags["--plot"]))
    return res


if __name__ == "__main__":
    main()
