"""Exploration methods side by side: every bonus of this package, and the baselines without
one, on the same JAX-native hard-exploration settings with the same budget of environment
steps and the same seeds. Each method runs its own file at its CPU `quick` preset (its own
network sizes, learning rates and batch of envs); the setting replaces the environment and
the budget. Settings: bsuite DeepSea N = 10 (the treasure needs 10 "right" moves in a row
against a small cost; a uniform policy finds it once in 1,024 episodes), the repo's
four-rooms grid (start in one corner room, the only reward in the opposite one, 100-step
episodes), and the same grid with an uncontrollable noisy TV in the start room. Cells:
distinct positions visited by any env since the start; successes: finished episodes with a
positive return; first: environment steps (all envs) until the first of them. PPO with
`int_coef = 0` is RND's file with the bonus switched off, A2C (no SIL) is SIL's file with
no self-imitation steps; the disagreement agent is intrinsic-only, as in its paper (it
ignores the reward). Go-Explore returns to archived cells by restoring the simulator state,
which no other row may do: its row is not on equal terms with the RL agents'."""

import jax
import numpy as np

from common.compare import Column, Method
from common.envs import CoverageState

BUDGET = "20000"
SETTINGS = {
    "DeepSea-10": ("--env-id", "DeepSea-bsuite-10", "--total-timesteps", BUDGET),
    "FourRooms": ("--env-id", "GridMaze-FourRooms", "--total-timesteps", BUDGET),
    "FourRooms + noisy TV": ("--env-id", "GridMaze-FourRooms-NoisyTV", "--total-timesteps",
                             BUDGET),
}
QUICK = ("--preset", "quick")
METHODS = {
    "PPO (no bonus)": Method("exploration.rnd", (*QUICK, "--int-coef", "0")),
    "RND": Method("exploration.rnd", QUICK),
    "ICM": Method("exploration.icm", QUICK),
    "Disagreement": Method("exploration.disagreement", QUICK),
    "SimHash counts": Method("exploration.simhash_count", QUICK),
    "DQN (epsilon-greedy)": Method("exploration.noisy_nets", (*QUICK, "--exploration",
                                                             "epsilon")),
    "NoisyNet-DQN": Method("exploration.noisy_nets", QUICK),
    "Bootstrapped DQN + priors": Method("exploration.bootstrapped_dqn", QUICK),
    "A2C (no SIL)": Method("exploration.sil", (*QUICK, "--sil-updates", "0")),
    "A2C + SIL": Method("exploration.sil", QUICK),
    "Go-Explore (phase 1)": Method("exploration.go_explore", QUICK),
}


def coverage(result) -> CoverageState:
    """The final Coverage state of a run (leaves lead with the seed axis)."""
    found = [x for x in jax.tree.leaves(result.state, is_leaf=lambda x: isinstance(
        x, CoverageState)) if isinstance(x, CoverageState)]
    if len(found) != 1:
        raise ValueError(f"expected one Coverage wrapper in the state, found {len(found)}")
    return found[0]


COLUMNS = (
    Column(lambda r: np.asarray(coverage(r).visited).reshape(
        np.shape(coverage(r).steps)[0], -1).sum(-1), "cells"),
    Column(lambda r: coverage(r).positives, "successes"),
    Column(lambda r: coverage(r).first_success, "first", ",.0f", never=-1),
)
CURVE = "charts/distinct_cells"
