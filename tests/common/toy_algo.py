"""A tiny algorithm file for the runner's tests: noisy SGD on a quadratic, with Adam.

It has the contract of every algorithm file (Config, init, update, evaluate, main) and
compiles in about a second, so runner behaviour (resume, devices, CLI) is cheap to test.
"""

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax
from flax import struct

from common import run


@dataclass(frozen=True)
class Config:
    """Minimise ||w - 3||^2 from noisy gradients."""

    dim: int = 8
    """parameter dimension"""
    lr: float = 0.05
    """Adam learning rate"""
    noise: float = 0.5
    """gradient noise scale"""
    total_steps: int = 40
    """number of updates"""

    @property
    def num_updates(self) -> int:
        return self.total_steps

    @property
    def steps_per_update(self) -> int:
        return 1

    def validate(self):
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@struct.dataclass
class State:
    w: jax.Array
    opt_state: optax.OptState
    key: jax.Array


def init(key, cfg: Config) -> State:
    k, key = jax.random.split(key)
    w = jax.random.normal(k, (cfg.dim,))
    return State(w, optax.adam(cfg.lr).init(w), key)


def update(state: State, cfg: Config):
    key, k = jax.random.split(state.key)
    grad = 2 * (state.w - 3.0) + cfg.noise * jax.random.normal(k, state.w.shape)
    upd, opt_state = optax.adam(cfg.lr).update(grad, state.opt_state)
    w = optax.apply_updates(state.w, upd)
    loss = jnp.sum((w - 3.0) ** 2)
    return State(w, opt_state, key), {"losses/loss": loss, "charts/w0": w[0]}


def evaluate(state: State, cfg: Config):
    return {"final_loss": jnp.sum((state.w - 3.0) ** 2)}


PRESETS = {"quick": dict(total_steps=10)}


def main(argv=None):
    return run.main(Config, init, update, presets=PRESETS, evaluate=evaluate, argv=argv,
                    doc=__doc__)


if __name__ == "__main__":
    main()
