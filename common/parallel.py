"""Device mesh, sharding of the seed axis, and multi-host start.

One process drives all local devices: the leading (seed) axis of the training state is
sharded over a 1-D mesh named "seeds" when it divides evenly, and XLA partitions the
vmapped program accordingly. More hosts join with `initialize_distributed()` (the same
script started once per host, with the usual JAX coordinator environment variables): the
mesh then spans every device of every process, each process computes the seeds on its own
devices, metrics are gathered to every process once per chunk (`to_host`), and process 0
alone writes the logs and summaries (`is_main_process`); checkpoints are written by all.
"""

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def initialize_distributed() -> bool:
    """Call `jax.distributed.initialize()` when a coordinator is configured (multi-host).

    Reads JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
    JAX_PROCESS_ID, or a cluster environment JAX detects itself (SLURM, a TPU pod slice).
    CPU processes talk through gloo collectives. Must run before the first computation.
    Returns whether it initialised.
    """
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        kw = {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"]}
        if env.get("JAX_NUM_PROCESSES"):
            kw["num_processes"] = int(env["JAX_NUM_PROCESSES"])
        if env.get("JAX_PROCESS_ID"):
            kw["process_id"] = int(env["JAX_PROCESS_ID"])
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(**kw)
        return True
    if env.get("SLURM_JOB_ID") or env.get("TPU_WORKER_HOSTNAMES"):
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


def is_main_process() -> bool:
    """True on the one process that writes logs and summaries (process 0)."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """A barrier across processes (no-op with one): e.g. every process has checked the run
    directory before the main process writes into it."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def agree(value: int) -> int:
    """Process 0's `value` on every process (e.g. the time stamp of a default run dir)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def to_host(tree):
    """A pytree of (possibly multi-process) arrays as numpy on every process: the global
    value, gathered over processes when the seed axis spans several."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)
