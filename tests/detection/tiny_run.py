"""Shared pieces of the detection tests: one tiny config per file, run once through the
command line (2 seeds) and reused by the CLI, purity and short behaviour tests, so that a
test module compiles its init and update once (the purity rerun and the untrained
evaluation reuse the run's compiled chunk and its recorded initial states). A module may
ask for its tiny run at XLA's lowest optimisation level (`run_cli(..., fast_compile=True)`:
--fast-compile, and `predict` likewise), where compiling dominates and 40 updates of a tiny
net run fast enough unoptimised.
"""

import contextlib
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import parallel, run
from tests.common.cli import cli_args
from tests.common.compiled import jit0, main_recording_chunks

SEEDS = 2


CHUNK = 20
"""updates per jitted chunk (--log-every): the purity test's rerun of one chunk reuses the
compiled program of the full run"""


_PREDICT: dict = {}
"""module name -> its jitted `predict` compiled at XLA's lowest optimisation level"""


@contextlib.contextmanager
def lowest_level_predict(module):
    """Within: `module.predict(params, batch_stats, images, cfg)` (what evaluate() and the
    plots call) compiles at XLA's lowest optimisation level, one program per cfg and shapes
    shared by every call of the test process (the CLI run's evaluate, the untrained one)."""
    if module.__name__ not in _PREDICT:
        _PREDICT[module.__name__] = jit0(module.predict, 3)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "predict", _PREDICT[module.__name__])
        yield


def run_cli(module, cfg, preset_cfg, run_dir, num_updates=None, fast_compile=False
            ) -> run.RunResult:
    """`module.main` on the flags of `cfg`: SEEDS seeds, chunks of CHUNK updates, all of
    cfg's updates or the first `num_updates` (a multiple of CHUNK); with `fast_compile`,
    --fast-compile and `predict` at the same lowest level (for the run and the untrained
    evaluation). The runner's first compiled chunk and its input states (the run's initial
    states) are recorded: the purity rerun and the untrained evaluation start from them (no
    second init compile; no second chunk trace for a fast_compile run)."""
    argv = cli_args(cfg, preset_cfg, "quick") + [
        "--num-seeds", str(SEEDS), "--log-every", str(CHUNK), "--run-dir", str(run_dir),
        "--no-progress"] + (["--fast-compile"] if fast_compile else [])
    if num_updates is not None:
        argv += ["--num-updates", str(num_updates)]
    with lowest_level_predict(module) if fast_compile else contextlib.nullcontext():
        res, chunks = main_recording_chunks(module.main, argv)
    # on the host: the chunk donates its input
    first = {"states": jax.device_get(chunks[0][1]), "chunk": chunks[0][0], "fast": fast_compile}
    saved = json.loads((res.run_dir / "config.json").read_text())["config"]
    assert saved == json.loads(json.dumps(dataclasses.asdict(cfg))), "flags != config"
    _RECORDED[module.__name__, cfg] = first
    return res


_RECORDED: dict = {}
"""(module name, cfg) -> {"states": the initial states of its CLI run, on the host,
"chunk": the runner's compiled first chunk, "fast": its fast_compile}"""


def initial_states(module, cfg):
    """The SEEDS initial states of the CLI run of `cfg` (`run_cli` first), on the device."""
    return parallel.shard_seeds(jax.device_put(_RECORDED[module.__name__, cfg]["states"]),
                                SEEDS)


def untrained(module, cfg) -> dict:
    """evaluate() of the SEEDS initial states of the CLI run of `cfg` (`run_cli` first),
    with the run's `predict` program."""
    fast = _RECORDED[module.__name__, cfg]["fast"]
    with lowest_level_predict(module) if fast else contextlib.nullcontext():
        return run.evaluate_seeds(module.evaluate, initial_states(module, cfg), cfg, SEEDS)


def rerun_first_chunk(module, cfg):
    """Metrics of the first CHUNK updates of the CLI run of `cfg` (--seed 0, SEEDS seeds),
    rerun from the recorded initial states by the runner's own chunk program: the compiled
    one recorded by `run_cli` for a fast_compile run, else `run.make_chunk` with the same
    arguments as in `run.train` (traced again, the persistent compilation cache serves the
    compile)."""
    rec = _RECORDED[module.__name__, cfg]
    chunk = rec["chunk"] if rec["fast"] else run.make_chunk(
        module.update, cfg, CHUNK, parallel.seed_sharding(SEEDS), SEEDS)
    state, metrics = chunk(initial_states(module, cfg))
    return state, jax.device_get(metrics)


def assert_pure(module, cfg, first: run.RunResult):
    """Purity of the runner's jitted, vmapped training of SEEDS seeds: the first CHUNK
    updates, rerun in this process from the same initial states, give the same metrics bit
    for bit; the seeds of a run differ (parameters and losses)."""
    state, metrics = rerun_first_chunk(module, cfg)
    assert set(metrics) == set(first.history)
    for k in first.history:
        np.testing.assert_array_equal(first.history[k][:, :CHUNK], metrics[k], err_msg=k)
    kernel = next(x for x in jax.tree.leaves(state.params) if x.ndim >= 3)
    assert not np.array_equal(kernel[0], kernel[1])
    assert not np.array_equal(first.history["losses/total"][0], first.history["losses/total"][1])
    assert np.isfinite(first.history["losses/total"]).all()


def assert_decay_spares_vectors(module, cfg):
    """The SGD optimizer of `module.make_optimizer(cfg)` (cfg.optimizer == "sgd"), one step
    from all-ones parameters with zero gradients: only the decay moves them, and it moves
    every kernel (ndim > 1) and no bias, batch-norm scale or offset (darknet and Caffe decay
    weights only). Parameters come from jax.eval_shape of init (no network compile)."""
    assert cfg.optimizer == "sgd" and cfg.weight_decay > 0
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), cfg)).params
    params = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), shapes)
    opt = module.make_optimizer(cfg)
    step = jax.jit(lambda p: opt.update(jax.tree.map(jnp.zeros_like, p), opt.init(p), p)[0])
    moved = jax.tree_util.tree_flatten_with_path(jax.tree.map(
        lambda u: bool(np.any(np.asarray(u) != 0)), step(params)))[0]
    names = {jax.tree_util.keystr(path)[-8:] for path, _ in moved}
    assert any("scale" in n for n in names) and any("bias" in n for n in names), names
    for (path, m), leaf in zip(moved, jax.tree.leaves(params), strict=True):
        assert m == (leaf.ndim > 1), (jax.tree_util.keystr(path), leaf.shape, m)


class _Stub:
    """A network whose every output entry is `fill`, whatever its parameters and input."""

    def __init__(self, outputs):
        self.outputs = outputs

    def apply(self, variables, images, *args, **kwargs):
        return self.outputs


def predict_with_constant_outputs(module, model_attr: str, cfg, fill: float, monkeypatch):
    """`module.predict` on one blank image with the network `module.<model_attr>` (a class or
    a factory taking cfg) replaced by a stub whose raw outputs all equal `fill` (shapes from
    the real network, traced only). Large offsets decode to boxes far outside the image, so
    this shows what predict does with them. Returns (boxes, valid) of the first image."""
    images = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
    net = getattr(module, model_attr)(cfg)
    shapes = jax.eval_shape(lambda: net.init_with_output(jax.random.PRNGKey(0), images)[0])
    outputs = jax.tree.map(lambda s: jnp.full(s.shape, fill, s.dtype), shapes)
    monkeypatch.setattr(module, model_attr, lambda cfg: _Stub(outputs))
    # a config the file's jitted predict has not seen: no cached trace of the real network;
    # one program at XLA's lowest optimisation level (it runs once)
    cfg = dataclasses.replace(cfg, nms_iou=cfg.nms_iou * 0.999)
    boxes, _, _, valid = jit0(module.predict, 3)({}, {}, images, cfg)
    return np.asarray(boxes[0]), np.asarray(valid[0])
