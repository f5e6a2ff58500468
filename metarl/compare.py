"""The meta-RL methods of this package that meta-train on a task distribution and adapt to new
tasks, on ONE shared task family: 2-D point navigation (common.envs.PointNav2D, MAML's
point robot: start at 0, velocity clipped to 0.1 per step, reward -||pos - g|| per step,
the episode ends within 0.01 of the goal or after 50 steps), goals g ~ U[-0.5, 0.5]^2, with
the same meta-training budget of 600,000 environment steps and the same seeds (2, vmapped).
Each file runs at its CPU `quick` preset (2 x 32 Gaussian MLP for the MAML family, a GRU of
64 for RL^2). Meta-test: goals drawn fresh by each run (maml_rl's evaluate: 40 goals x 40
trajectories per adaptation step; RL^2: 500 trials, each a new goal); a cell is the average
return of one 50-step episode on a new goal, the median over seeds. "0": before any
adaptation (the meta-learned policy as it is); "1" and "3": after 1 and 3 policy-gradient
steps (alpha, then alpha / 2) on 40 trajectories of the goal (2,000 steps each) for the
gradient-based rows, but after 1 and 3 EPISODES of the same goal (50 steps each) in the
GRU's memory for RL^2: RL^2 adapts on 40x less experience per step, so its columns are not
on equal terms with the others. "untrained init, 3": the same adaptation from the run's random
initialisation (learning from scratch, the same goals). MAML-TRPO (second order) and
first-order MAML are maml_rl.py; "pretrained on all tasks" is maml_rl.py `--algo pretrain`
(TRPO with alpha = 0 in the objective: one policy for every goal, then the same test-time
steps), the reference row. Unsupervised meta-RL is unsupervised_meta_rl.py: MAML-TRPO on
tasks proposed by a DIAYN discriminator (8 skills) learned on a reward-free point mass, or
by a random discriminator; it never sees a navigation goal before meta-test, and its 16,000
DIAYN steps come on top of the 600,000. Not rows: MAESN (maesn.py: its family is goals on a
semicircle of radius 2 with a sparse test reward, and its file has no square-goal dense
setting), EPG (a 1-D left/right task), MFEC and NEC (one fixed FourRooms maze, no task
distribution), the episodic LSTM (contextual bandits), MAML on sinusoids and Hochreiter's
learner (supervised regression), meta-gradient RL (one MinAtar game), POET (open-ended
terrains), DIAYN (unsupervised skills; it is the proposer inside unsupervised meta-RL)."""

import sys

import numpy as np

from common import compare as common_compare
from common.compare import Column, Method

BUDGET = 600_000
"""meta-training environment steps of every row (DIAYN's proposer steps not counted)"""
HORIZON = 50
"""steps of one episode (the quick presets' horizon)"""
MAML_STEPS = 10 * 10 * 2 * HORIZON
"""env steps of one maml_rl / unsupervised_meta_rl quick meta-iteration: 10 tasks x 10
trajectories, before and after the inner step"""
RL2_TRIAL = 4
"""RL^2: episodes of the same goal in one trial (0..3: the columns)"""
RL2_ENVS = 60
"""RL^2: trials per rollout (a rollout is one trial: 4 x 50 steps)"""
SEEDS = 2
"""seeds of the committed command (common.compare's --num-seeds)"""

SETTINGS = {"Nav2D": ()}
QUICK = ("--preset", "quick")
ITERS = ("--num-iterations", str(BUDGET // MAML_STEPS))
RL2 = ("--env-id", "Meta-Nav2D", "--episode-length", str(HORIZON), "--episodes-per-trial",
       str(RL2_TRIAL), "--num-steps", str(RL2_TRIAL * HORIZON), "--num-envs", str(RL2_ENVS),
       "--total-timesteps", str(BUDGET), "--eval-trials", "500")
METHODS = {
    "MAML-TRPO": Method("metarl.maml_rl", (*QUICK, *ITERS)),
    "first-order MAML": Method("metarl.maml_rl", (*QUICK, *ITERS, "--algo", "fomaml")),
    "pretrained on all tasks": Method("metarl.maml_rl", (*QUICK, *ITERS, "--algo", "pretrain")),
    "unsupervised meta-RL (DIAYN tasks)": Method("metarl.unsupervised_meta_rl",
                                                 (*QUICK, *ITERS)),
    "unsupervised meta-RL (random D)": Method("metarl.unsupervised_meta_rl",
                                              (*QUICK, *ITERS, "--proposer", "random")),
    "RL^2 (PPO; GRU)": Method("metarl.rl2", (*QUICK, *RL2)),
}


def after(k: int, prefix: str = "adapt"):
    """Per-seed return after k adaptation steps: `<prefix>/return_0k` of the gradient-based
    files, rl2's `adaptation/00k` (episode k of the trial); NaN where the run has neither."""

    def read(result):
        for key in (f"{prefix}/return_{k:02d}", f"adaptation/{k:03d}" if prefix == "adapt"
                    else None):
            if key in result.final:
                return result.final[key]
        return np.full(np.shape(next(iter(result.final.values()))), np.nan)

    return read


COLUMNS = (
    Column(after(0), "0 (before adapting)", ".1f"),
    Column(after(1), "1", ".1f"),
    Column(after(3), "3", ".1f"),
    Column(after(3, "random"), "untrained init, 3", ".1f"),
)


def plot(results: dict, setting: str, path: str) -> None:
    """Return on new goals against adaptation steps (RL^2: episodes), one line per row (mean
    over seeds, seeds as dots), beside the return before adaptation and after 3 steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.plot import save_png

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), width_ratios=(3, 2))
    labels = list(results)
    for i, label in enumerate(labels):
        res = results[label][setting]
        y = np.stack([np.asarray(after(k)(res), np.float64) for k in range(4)], -1)
        style = "--" if label.startswith("RL^2") else "-"
        ax.plot(range(4), np.nanmean(y, 0), style, marker="o", color=f"C{i}", label=label)
        ax.plot(np.repeat(np.arange(4)[None], y.shape[0], 0).ravel(), y.ravel(), ".",
                color=f"C{i}", alpha=0.5)
        for j, k in enumerate((0, 3)):
            bx.bar(i + 0.4 * j - 0.2, np.nanmean(y[:, k]), 0.4, color=f"C{i}",
                   alpha=0.45 + 0.5 * j)
    untrained = np.nanmean(np.stack([np.asarray(after(3, "random")(results[m][setting]))
                                     for m in labels]))
    ax.axhline(untrained, color="k", lw=0.8, ls=":", label="untrained init, 3 steps")
    ax.set_xticks(range(4))
    ax.set_xlabel("adaptation steps on the new goal (RL^2, dashed: episodes)")
    ax.set_ylabel("return of a 50-step episode")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    bx.set_xticks(range(len(labels)), [x.replace(" (", "\n(") for x in labels], fontsize=6,
                  rotation=30, ha="right")
    bx.set_title("before (light) and after 3 steps (dark)", fontsize=9)
    bx.grid(alpha=0.3, axis="y")
    fig.suptitle(f"2-D navigation, new goals, {BUDGET:,} meta-training steps", fontsize=10)
    fig.tight_layout()
    save_png(fig, path)


def main(argv=None):
    """`python -m metarl.compare [common.compare flags]`: common.compare's run and table of
    this package, with this file's plot (`--plot PNG`) in place of the generic one."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out = None
    if "--plot" in argv:
        i = argv.index("--plot")
        out = argv[i + 1]
        del argv[i:i + 2]
    results = common_compare.main(["metarl", *argv], package=sys.modules[__name__])
    if out:
        plot(results, next(iter(SETTINGS)), out)
    return results


if __name__ == "__main__":
    main()
