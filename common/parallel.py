"""Device mesh, sharding of the seed axis, and multi-host start.

One process drives all local devices: the leading (seed) axis of the training state is
sharded over a 1-D mesh named "seeds" when it divides evenly, and XLA partitions the
vmapped program accordingly. More hosts join with `initialize_distributed()` (the same
script started once per host, with the usual JAX coordinator environment variables).
"""

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def initialize_distributed() -> bool:
    """Call `jax.distributed.initialize()` when a coordinator is configured (multi-host).

    Reads JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (or a cluster
    environment JAX auto-detects, such as SLURM or a TPU pod). Returns whether it did.
    """
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_JOB_ID"):
        jax.distributed.initialize()
        return True
    return False


def seed_mesh() -> Mesh:
    """A 1-D mesh over every device of every process, axis name "seeds"."""
    return Mesh(np.asarray(jax.devices()), ("seeds",))


def seed_sharding(num_seeds: int) -> NamedSharding | None:
    """Sharding of a leading seed axis over all devices, or None when it does not divide."""
    n = jax.device_count()
    if n == 1 or num_seeds % n:
        return None
    return NamedSharding(seed_mesh(), PartitionSpec("seeds"))


def shard_seeds(tree, num_seeds: int):
    """Place a pytree whose leaves lead with the seed axis across devices (no-op on one)."""
    sharding = seed_sharding(num_seeds)
    return tree if sharding is None else jax.device_put(tree, sharding)
