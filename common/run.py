"""The runner every algorithm file hands its `Config`, `init` and `update` to.

An algorithm file exposes
    Config                               a frozen dataclass; field docstrings become --help;
                                         it has `num_updates` and optionally `steps_per_update`
                                         (env steps, tokens or evaluations per update) and
                                         `validate()` (raises ValueError naming the field)
    init(key, cfg) -> State              a pytree
    update(state, cfg) -> (State, metrics)   pure; metrics is a dict of scalars
    evaluate(state, cfg) -> metrics      optional, run once at the end (jitted and vmapped
                                         over seeds, or per seed on the host when it is
                                         decorated with @run.host_evaluate)

and `main()` calls `run.main(Config, init, update, ...)`. The runner parses the CLI (tyro),
vmaps `--num-seeds` seeds, shards them over local devices, runs jitted chunks of
`lax.scan(update)` of `--log-every` updates on device, and between chunks: prints a
progress bar with steps/s, appends metrics to `<run-dir>/metrics.jsonl`, logs to Weights &
Biases with `--track`, saves orbax checkpoints every `--checkpoint-every` updates, and
checks every metric for NaN and inf. `--resume` continues bit-identically from the latest
checkpoint.

Metric names: `charts/...` (returns, coverage), `losses/...`, `perf/...`; all must stay
finite (see NAN_UNLESS for the ones undefined in some updates).

Data that `update` closes over (a corpus, a fixed data set) should be cached as NUMPY arrays
(functools.cache) and turned into jnp arrays inside `update`: a jnp array first created while
a chunk is being traced and then cached is a constant of that trace only, and the next
compiled chunk fails with "compiled for N inputs but called with N-1".
"""

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import jax
import numpy as np

from common import parallel


@dataclass(frozen=True)
class RunOptions:
    """Options of the runner shared by every algorithm file."""

    seed: int = 0
    """base random seed; seed i of the vmap uses split(PRNGKey(seed), num_seeds)[i]"""
    num_seeds: int = 1
    """independent seeds trained at once (vmapped and sharded over local devices)"""
    num_updates: int | None = None
    """override the number of updates (default: the config's own num_updates)"""
    log_every: int = 10
    """updates per jitted chunk; metrics are written and progress shown after each chunk"""
    checkpoint_every: int = 0
    """save an orbax checkpoint every N updates (0: only at the end of the run)"""
    run_dir: str | None = None
    """output folder (default: runs/<script>__<seed>__<time>)"""
    resume: bool = False
    """continue from the latest checkpoint in --run-dir"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works without network)"""
    wandb_project: str = "lilrl"
    """Weights & Biases project"""
    debug_nans: bool = False
    """when a logged metric turns NaN or inf, replay that chunk op by op without jit and stop
    at the first op producing a NaN (or inf), naming it and its source line (runs chunks
    synchronously and without buffer donation)"""
    progress: bool = True
    """show a progress bar"""
    fast_compile: bool = False
    """compile the training chunks and evaluate() without XLA's backend optimisations:
    several times faster to compile on CPU, slower to run (for smoke runs and tests of a
    few updates)"""
    preset: str | None = None
    """named override set of the file (e.g. quick, paper); applied before other flags"""

    def validate(self):
        for name in ("num_seeds", "log_every"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.num_updates is not None and self.num_updates < 1:
            raise ValueError(f"--num-updates must be >= 1, got {self.num_updates}")
        if self.checkpoint_every < 0:
            raise ValueError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        if self.resume and self.run_dir is None:
            raise ValueError("--resume needs --run-dir (the folder of the run to continue)")


@dataclass
class RunResult:
    state: Any
    """final training state, leaves lead with the seed axis"""
    history: dict[str, np.ndarray]
    """every metric as [num_seeds, num_updates] (updates run in this process)"""
    run_dir: Path
    final: dict[str, np.ndarray] = field(default_factory=dict)
    """evaluate() output per seed, if the file has one"""


# --- CLI ---


def parse(config_cls, presets: dict[str, dict] | None, argv: list[str] | None, description=None):
    """Parse `argv` into (Config, RunOptions). A `--preset NAME` applies first."""
    presets = presets or {}
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.preset is not None and known.preset not in presets:
        raise SystemExit(
            f"error: unknown --preset {known.preset!r}; choose from {sorted(presets) or 'none'}"
        )
    cfg_default = config_cls(**presets.get(known.preset, {}))
    args_cls = dataclasses.make_dataclass("Args", [
        ("config", Annotated[config_cls, tyro_omit()], field(default=cfg_default)),
        ("run", Annotated[RunOptions, tyro_omit()], field(default=RunOptions())),
    ])
    import tyro

    if presets:
        description = (description or "") + f"\n\nPresets (--preset): {', '.join(presets)}."
    args = tyro.cli(args_cls, args=argv, description=description)
    return args.config, args.run


def tyro_omit():
    import tyro

    return tyro.conf.OmitArgPrefixes


# --- LOGGING ---


def _jsonable(x):
    """A number (or an array of them, e.g. a per-seed curve from `evaluate`) for JSON, with
    NaN and inf as null."""
    if np.ndim(x):
        return [_jsonable(v) for v in np.asarray(x)]
    x = float(x)
    return x if math.isfinite(x) else None


class _Logger:
    def __init__(self, run_dir: Path, cfg, opts: RunOptions, name: str):
        self.path = run_dir / "metrics.jsonl"
        self.wandb = None
        self.enabled = parallel.is_main_process()  # one process writes (multi-host runs)
        if opts.track and self.enabled:
            import wandb

            self.wandb = wandb.init(
                project=opts.wandb_project, name=run_dir.name, dir=str(run_dir),
                config={"config": dataclasses.asdict(cfg), "run": dataclasses.asdict(opts),
                        "script": name},
                resume="allow",
            )

        self.env_steps = 0.0  # cumulative, when a steps metric counts them (see train)
        if self.path.exists():  # a resume: continue the count of the kept rows
            rows = self.path.read_text().splitlines()
            self.env_steps = json.loads(rows[-1]).get("env_steps", 0.0) if rows else 0.0

    def write(self, first_update: int, metrics: dict[str, np.ndarray], steps_per_update,
              steps_metric: str | None = None):
        """metrics: name -> [seeds, chunk]. One JSON line per update. `env_steps` is
        update x steps_per_update, or the running sum of the seed mean of `steps_metric`."""
        n = next(iter(metrics.values())).shape[1] if metrics else 0
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            for i in range(n):
                u = first_update + i + 1
                row = {"update": u}
                if steps_metric in metrics:
                    self.env_steps += float(np.mean(metrics[steps_metric][:, i]))
                    row["env_steps"] = _jsonable(self.env_steps)
                elif steps_per_update:
                    row["env_steps"] = u * steps_per_update
                for k, v in metrics.items():
                    col = v[:, i]
                    row[k] = _jsonable(np.nanmean(col)) if np.isfinite(col).any() else None
                    row[k + "/seeds"] = [_jsonable(c) for c in col]
                f.write(json.dumps(row) + "\n")
                if self.wandb is not None:
                    self.wandb.log({k: v for k, v in row.items()
                                    if not k.endswith("/seeds") and v is not None}, step=u)

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


NAN_UNLESS = {"charts/episodic_return": "charts/episodes"}
"""Metrics that are undefined in an update where their count is 0 (no episode ended in the
rollout). The file logs a finite placeholder and the count; the runner writes NaN where the
count is 0. Nothing is NaN on device by design, so every metric is checked, and --debug-nans
can stop at the first op that makes a NaN."""


class NonFiniteMetric(FloatingPointError):
    """A logged metric turned NaN or inf. Scripts print it as one `error:` line (exit 1)."""


def check_finite(metrics: dict[str, np.ndarray], first_update: int):
    """Raise if any logged metric is NaN or inf, naming it, the update and the seed."""
    for k, v in metrics.items():
        v = np.asarray(v)
        if np.issubdtype(v.dtype, np.inexact) and not np.isfinite(v).all():
            seed, i = np.argwhere(~np.isfinite(v))[0]
            raise NonFiniteMetric(
                f"{k} became {v[seed, i]} at update {first_update + i + 1} (seed index {seed})")


def mark_undefined(metrics: dict[str, np.ndarray], nan_unless: dict[str, str]) -> dict:
    """NaN where a metric of `nan_unless` has a zero count (see NAN_UNLESS)."""
    for k, count in nan_unless.items():
        if k in metrics and count in metrics:
            metrics[k] = np.where(np.asarray(metrics[count]) > 0, metrics[k], np.nan)
    return metrics


def replay_op_by_op(update: Callable, cfg, state, n: int, num_seeds: int, kind: str):
    """Run `n` updates from `state` without jit, with JAX's NaN (or inf) checks on: raises
    FloatingPointError at the first op that produces one, with its source line."""
    checks = jax.debug_nans(True) if kind == "nan" else jax.debug_infs(True)
    with jax.disable_jit(), checks:
        jax.block_until_ready(make_chunk(update, cfg, n, None, num_seeds, donate=False)(state))


# --- CHECKPOINTS ---


def _manager(run_dir: Path):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        (run_dir / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False),
    )


def save_checkpoint(mngr, step: int, state):
    import orbax.checkpoint as ocp

    mngr.save(step, args=ocp.args.StandardSave(state))
    mngr.wait_until_finished()


def restore_checkpoint(mngr, abstract_state):
    """(step, state) of the newest checkpoint that restores. A damaged one (a truncated
    array, an emptied metadata file) is skipped with a warning naming it and the error."""
    import orbax.checkpoint as ocp

    steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f"no checkpoint to resume in {mngr.directory}")
    errors = []
    for step in steps:
        try:
            return step, mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
        except Exception as e:  # noqa: BLE001 - any failure to read it: try an older one
            msg = f"checkpoint of update {step} in {mngr.directory} does not restore " \
                  f"({type(e).__name__}: {str(e)[:200]})"
            errors.append(msg)
            print(f"warning: {msg}; trying an older one", file=sys.stderr)
    raise FileNotFoundError("no checkpoint restores:\n  " + "\n  ".join(errors))


# --- RUN DIRECTORY ---

RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "checkpoints")
"""What a run leaves in its directory; a directory holding any of them holds a run."""


class ConfigError(ValueError):
    """A bad flag or run directory, found before anything is created or compiled. Scripts
    print it as a one-line error (exit status 2) instead of a traceback."""


# Value checks by field name, run on every Config before its own `validate()` (which may
# divide by a size it has not checked yet). A file's `validate()` adds what a name cannot say.
def _is_lr(n): return n == "lr" or n.endswith("_lr") or n == "lr_scale"
def _is_size(n):
    return (n.startswith(("num_", "n_", "total_")) or n.endswith(("_size", "_batch"))
            or n in ("d_model", "d_ff", "d_head", "d_inner"))
def _is_prob(n):
    return (n.endswith(("_prob", "_proportion", "_fraction", "_frac", "_ratio"))
            and not n.endswith("pos_ratio")) or n.startswith("gamma") or n in (
        "gae_lambda", "momentum", "tau", "adam_b1", "adam_b2", "label_smoothing")
def _is_coef(n):
    return n.endswith(("_coef", "_coeff", "_weight", "weight_decay")) or n.startswith(
        "lambda_") or n in ("max_grad_norm", "dropout", "dropatt")


VALUE_RULES = (
    (_is_lr, "> 0", lambda v: v > 0),
    (_is_size, ">= 1", lambda v: v >= 1),
    (_is_prob, "in [0, 1]", lambda v: 0 <= v <= 1),
    (_is_coef, ">= 0", lambda v: v >= 0),
)
"""(field-name test, constraint, check) for int and float Config fields: learning rates
positive, counts and sizes at least 1, probabilities, discounts and fractions in [0, 1],
coefficients and weights non-negative. Every float field must also be finite."""


def check_config(cfg) -> None:
    """Validate a Config before anything is created or compiled: the name-based
    `VALUE_RULES`, then the file's own `validate()`. Raises ConfigError naming the field,
    its value and the constraint."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{flag} must be finite, got {v}")
        for applies, constraint, ok in VALUE_RULES:
            if applies(f.name) and not ok(v):
                raise ConfigError(f"{flag} must be {constraint}, got {v}")
    try:
        if hasattr(cfg, "validate"):
            cfg.validate()
    except ConfigError:
        raise
    except (ValueError, ZeroDivisionError) as e:
        raise ConfigError(str(e)) from e


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_run_dir(run_dir: Path, run_record: dict, resume: bool) -> None:
    """Refuse to mix runs: without --resume the directory must hold no run; with it, it must
    hold one whose saved config, seed, seed count and script equal this one's (the fields
    that differ are named)."""
    saved_path = run_dir / "config.json"
    if resume:
        if not saved_path.exists():
            raise ConfigError(f"--resume: {run_dir} holds no run (no config.json); check "
                              "--run-dir")
        saved = _flat(json.loads(saved_path.read_text()))
        now = _flat(json.loads(json.dumps(run_record, default=str)))
        diff = [f"{k.removeprefix('config.')}: saved {saved.get(k, '(absent)')!r}, now "
                f"{now.get(k, '(absent)')!r}" for k in sorted(set(saved) | set(now))
                if saved.get(k) != now.get(k)]
        if diff:
            raise ConfigError(f"--resume: the config differs from the one saved in "
                              f"{saved_path}: " + "; ".join(diff))
    elif run_dir.exists():
        held = [f for f in RUN_FILES if (run_dir / f).exists()]
        if held:
            raise ConfigError(
                f"--run-dir {run_dir} already holds a run ({', '.join(held)}); continue it "
                "with --resume, or choose another --run-dir (results are never overwritten)")


def _truncate_log(path: Path, last_update: int) -> None:
    """Keep the metric rows up to `last_update` (a resume after a kill between checkpoints
    would otherwise log the updates after the checkpoint twice)."""
    if path.exists():
        rows = [r for r in path.read_text().splitlines()
                if r.strip() and json.loads(r)["update"] <= last_update]
        path.write_text("".join(r + "\n" for r in rows))


def device_memory_bytes() -> int:
    """Memory of one local device: the accelerator's limit, or the host's RAM on CPU."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_state_fits(abstract_state, num_seeds: int) -> None:
    """Refuse, before compiling, a --num-seeds whose training state alone cannot fit."""
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))
    per_device = nbytes / min(num_seeds, jax.local_device_count())
    limit = device_memory_bytes()
    if per_device > limit:
        gib = 2.0**30
        raise ConfigError(
            f"--num-seeds {num_seeds}: the training state alone needs {nbytes / gib:.3g} GiB "
            f"({nbytes / num_seeds / gib:.3g} GiB per seed, {per_device / gib:.3g} GiB per "
            f"device), more than the {limit / gib:.3g} GiB of device memory; lower --num-seeds")


class _Interrupt:
    """SIGINT/SIGTERM during training: finish the chunk in flight, checkpoint, exit non-zero.
    A second Ctrl-C aborts at once."""

    def __init__(self):
        self.signum = None
        self.old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing the current chunk and saving a "
              "checkpoint (Ctrl-C again to abort without one)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, old in self.old.items():
            signal.signal(sig, old)


def resume_command(run_dir: Path) -> str:
    """The command line that continues this run."""
    argv = list(sys.argv)
    if not any(a == "--run-dir" or a.startswith("--run-dir=") for a in argv):
        argv += ["--run-dir", str(run_dir)]
    if "--resume" not in argv:
        argv.append("--resume")
    return " ".join([Path(sys.executable).name] + argv)


# --- TRAIN ---

INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
"""XLA options of the runner's one-off `init` compile: without LLVM's optimisations it
compiles several times faster on CPU (flax's random initialisers dominate: 2.8 s vs 19.9 s
for YOLOv3's), and its values differ from an optimised compile's by an ulp or two."""


def seed_keys(seed: int, num_seeds: int):
    """The per-seed keys of a run: split(PRNGKey(seed), num_seeds), sharded over devices."""
    keys = jax.random.split(jax.random.PRNGKey(seed), num_seeds)
    return parallel.shard_seeds(keys, num_seeds)


def make_init(init: Callable, cfg, num_seeds: int):
    """init vmapped over the seed axis, sharded over devices (lower it on `seed_keys`)."""
    fn = seed_map(lambda k: init(k, cfg), num_seeds)
    return jax.jit(fn, out_shardings=parallel.seed_sharding(num_seeds))


def initial_states(init: Callable, cfg, seed: int, num_seeds: int):
    """The initial states of a run, bit for bit as the runner makes them."""
    keys = seed_keys(seed, num_seeds)
    return make_init(init, cfg, num_seeds).lower(keys).compile(INIT_COMPILER_OPTIONS)(keys)



def seed_map(fn: Callable, num_seeds: int) -> Callable:
    """`jax.vmap(fn)` over the leading seed axis; for one seed, a squeeze and expand instead,
    so that programs with non-batchable parts (envpool's XLA step) run with one seed."""
    if num_seeds > 1:
        return jax.vmap(fn)

    def one(*args):
        out = fn(*jax.tree.map(lambda x: x[0], args))
        return jax.tree.map(lambda x: x[None], out)

    return one


def host_evaluate(fn: Callable) -> Callable:
    """Mark an `evaluate` that runs on the host (e.g. numpy mAP after a jitted forward):
    the runner calls it once per seed with that seed's state instead of jit(vmap(...))."""
    fn.host = True
    return fn


def evaluate_seeds(evaluate: Callable, state, cfg, num_seeds: int,
                   compiler_options: dict | None = None) -> dict:
    """evaluate() of every seed, stacked along a leading seed axis, as numpy (a jitted
    evaluate compiled with `compiler_options`: the runner passes its --fast-compile ones)."""
    if not getattr(evaluate, "host", False):
        fn = jax.jit(seed_map(lambda s: evaluate(s, cfg), num_seeds))
        return parallel.to_host(fn.lower(state).compile(compiler_options)(state))
    # Each seed's slice cut on the host and put back on the device: a transfer, where an
    # eager slice of every leaf compiles one small program per leaf shape.
    state = parallel.to_host(state)
    per = [evaluate(jax.device_put(jax.tree.map(lambda x: x[i], state)), cfg)
           for i in range(num_seeds)]
    return {k: np.stack([np.asarray(p[k]) for p in per]) for k in per[0]}


def make_chunk(update: Callable, cfg, length: int, sharding=None, num_seeds: int = 2,
               donate: bool = True):
    """jit(vmap(scan(update, length))) over the seed axis; the state is donated unless
    `donate` is False. With a `sharding` (of the seed axis), state and metrics stay sharded
    over devices."""

    def chunk(states):
        def one_seed(state):
            return jax.lax.scan(lambda s, _: update(s, cfg), state, None, length)

        return seed_map(one_seed, num_seeds)(states)

    return jax.jit(chunk, donate_argnums=0 if donate else (), in_shardings=sharding,
                   out_shardings=sharding)


def make_train(init: Callable, update: Callable, cfg, num_updates: int | None = None):
    """`train(key) -> (final_state, metrics[num_updates])`: the whole run as one scan."""
    n = cfg.num_updates if num_updates is None else num_updates

    def train(key):
        return jax.lax.scan(lambda s, _: update(s, cfg), init(key, cfg), None, n)

    return train


def train(config_cls, init, update, cfg, opts: RunOptions, evaluate=None, name="run",
          nan_unless: dict[str, str] | None = None, steps_metric: str | None = None
          ) -> RunResult:
    """Run `opts.num_seeds` seeds of a configured algorithm with logging and checkpoints.

    Nothing is created before the config, the options and the run directory are checked and
    `init` is traced (an unknown env id or a state too large for the device fails first).
    A directory that holds a run is continued with `opts.resume` and never overwritten.
    SIGINT/SIGTERM finish the chunk in flight, save a checkpoint, print the command that
    resumes, and exit with 128 + the signal number. Every logged metric must stay finite;
    `nan_unless` (default NAN_UNLESS) names those undefined where a count is 0. A file whose
    steps per update vary (CMA-ES restarts with larger populations) names the metric that
    counts them in `steps_metric`; env_steps and steps/s then sum it instead of
    `cfg.steps_per_update`."""
    nan_unless = NAN_UNLESS if nan_unless is None else nan_unless
    check_config(cfg)
    try:
        opts.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from e
    total = opts.num_updates or cfg.num_updates
    steps_per_update = getattr(cfg, "steps_per_update", None)

    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(parallel.agree(int(time.time()))))
    run_dir = Path(opts.run_dir or f"runs/{name}__{opts.seed}__{stamp}")
    record = {"config": dataclasses.asdict(cfg), "num_seeds": opts.num_seeds,
              "seed": opts.seed, "script": name}
    sharding = parallel.seed_sharding(opts.num_seeds)
    keys = seed_keys(opts.seed, opts.num_seeds)
    abstract_state = jax.eval_shape(make_init(init, cfg, opts.num_seeds), keys)  # env ids
    check_state_fits(abstract_state, opts.num_seeds)
    check_run_dir(run_dir, record, opts.resume)
    parallel.sync("lilrl: run dir checked")  # by every process, before anything is written
    main_process = parallel.is_main_process()

    run_dir.mkdir(parents=True, exist_ok=True)
    mngr = _manager(run_dir)
    done = 0
    if opts.resume:
        latest = mngr.latest_step()
        if latest is not None and latest >= total:
            mngr.close()
            raise ConfigError(
                f"--resume: the run in {run_dir} already finished its {latest} updates; pass "
                f"a larger --num-updates to train it further")
        done, state = restore_checkpoint(mngr, abstract_state)
        state = parallel.shard_seeds(state, opts.num_seeds)
        if main_process:
            _truncate_log(run_dir / "metrics.jsonl", done)
        print(f"resumed from update {done} in {run_dir}")
    else:
        if main_process:
            (run_dir / "config.json").write_text(json.dumps(record, default=str, indent=1))
        state = initial_states(init, cfg, opts.seed, opts.num_seeds)

    logger = _Logger(run_dir, cfg, opts, name)
    chunks: dict[int, Any] = {}
    history: dict[str, list] = {}
    bar = None
    if opts.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=done, desc=name, unit="upd", dynamic_ncols=True)
    compile_s = 0.0
    t_loop = time.perf_counter()
    t_last = None  # when the previous chunk's metrics arrived (for steps/s)
    timed = [0.0, 0.0]  # seconds and env steps after the first chunk (perf/sps)

    def chunk_steps(n: int, metrics) -> float:
        """Env steps (evaluations, tokens) of one seed in a chunk of n updates."""
        if steps_metric in metrics:
            return float(np.asarray(metrics[steps_metric]).sum(1).mean())
        return n * (steps_per_update or 0)

    def consume(first: int, n: int, metrics, before=None):
        """Host side of one finished chunk: NaN check, JSONL/W&B, history, progress.
        `before` (with --debug-nans): the chunk's input state, replayed on a NaN or inf."""
        nonlocal t_last
        metrics = parallel.to_host(metrics)  # the one host transfer per chunk
        now = time.perf_counter()
        dt = None if t_last is None else now - t_last
        t_last = now
        if dt is not None:
            timed[0] += dt
            timed[1] += chunk_steps(n, metrics)
        try:
            check_finite(metrics, first)
        except NonFiniteMetric as e:
            if before is None:
                raise NonFiniteMetric(f"{e}; rerun with --debug-nans to stop at the op that "
                                      "produced it") from None
            kind = "nan" if "nan" in str(e) else "inf"
            print(f"\n{e}; replaying updates {first + 1}..{first + n} op by op to find the "
                  f"first op that produces a {kind}", file=sys.stderr, flush=True)
            replay_op_by_op(update, cfg, before, n, opts.num_seeds, kind)
            raise FloatingPointError(f"{e}; the op-by-op replay found no {kind} (the jitted "
                                     "program differs numerically)") from None
        metrics = mark_undefined(metrics, nan_unless)
        logger.write(first, metrics, steps_per_update, steps_metric)
        for k, v in metrics.items():
            history.setdefault(k, []).append(np.asarray(v))
        if bar is not None:
            post = {}
            if steps_per_update and dt:
                post["steps/s"] = f"{chunk_steps(n, metrics) * opts.num_seeds / dt:,.0f}"
            for k in ("charts/episodic_return", "charts/distinct_cells"):
                if k in metrics and np.isfinite(metrics[k][:, -1]).any():
                    post[k.split("/")[-1]] = f"{np.nanmean(metrics[k][:, -1]):.3g}"
            bar.set_postfix(post)
            bar.update(n)

    interrupt = _Interrupt()
    try:
        interrupt.__enter__()
        pending = None  # (first update, n, metrics on device) of the chunk in flight
        while done < total:
            if interrupt.signum is not None:
                break
            n = min(opts.log_every, total - done)
            if opts.checkpoint_every:
                n = min(n, opts.checkpoint_every - done % opts.checkpoint_every)
            if n not in chunks:
                t0 = time.perf_counter()
                fn = make_chunk(update, cfg, n, sharding, opts.num_seeds,
                                donate=not opts.debug_nans)
                chunks[n] = fn.lower(state).compile(
                    INIT_COMPILER_OPTIONS if opts.fast_compile else None)
                compile_s += time.perf_counter() - t0
                t_last = None if t_last is None else t_last + time.perf_counter() - t0
            if opts.debug_nans:  # synchronous, keeping each chunk's input for the replay
                before = state
                state, metrics = chunks[n](state)
                consume(done, n, metrics, before)
                done += n
                if opts.checkpoint_every and done % opts.checkpoint_every == 0 and done < total:
                    save_checkpoint(mngr, done, state)
                continue
            # Dispatch the next chunk first (asynchronous), then do the host work of the
            # previous one while the device computes: logging costs no device time.
            state, metrics = chunks[n](state)
            if pending is not None:
                consume(*pending)
                pending = (done, n, metrics)
            elif t_last is None:  # the first chunk is warm-up: consumed at once, not timed
                consume(done, n, metrics)
            else:
                pending = (done, n, metrics)
            done += n
            if opts.checkpoint_every and done % opts.checkpoint_every == 0 and done < total:
                if pending is not None:
                    consume(*pending)
                    pending = None
                save_checkpoint(mngr, done, state)
        if pending is not None:
            consume(*pending)
        if mngr.latest_step() != done:
            save_checkpoint(mngr, done, state)
        loop_s = time.perf_counter() - t_loop - compile_s
        if interrupt.signum is not None and done < total:
            print(f"\ninterrupted at update {done} of {total}: checkpoint saved in "
                  f"{(run_dir / 'checkpoints').absolute()}\ncontinue with: "
                  f"{resume_command(run_dir)}", file=sys.stderr, flush=True)
            raise SystemExit(128 + interrupt.signum)
    finally:
        interrupt.__exit__()
        if bar is not None:
            bar.close()
        logger.close()
        mngr.close()

    hist = {k: np.concatenate(v, axis=1) for k, v in history.items()}
    final = {}
    if evaluate is not None:
        final = evaluate_seeds(evaluate, state, cfg, opts.num_seeds, compiler_options=(
            INIT_COMPILER_OPTIONS if opts.fast_compile else None))
    # loop_s: wall time of all chunks with logging, progress and checkpoints, less compiling.
    perf = {"perf/compile_s": compile_s, "perf/loop_s": loop_s}
    if timed[1] and steps_per_update and timed[0]:
        perf["perf/sps"] = timed[1] * opts.num_seeds / timed[0]
    if main_process:
        (run_dir / "summary.json").write_text(json.dumps(
            {**perf, **{k: [_jsonable(x) for x in np.atleast_1d(v)] for k, v in final.items()},
             **{k: [_jsonable(x) for x in v[:, -1]] for k, v in hist.items()}}, indent=1))
    return RunResult(state, hist, run_dir, final)


def summarize(result: RunResult, keys: list[str] | None = None) -> str:
    """Final value of each metric: mean +- std over the seeds where it is finite (last update,
    or evaluate()), saying how many seeds were left out (a diverged seed is not averaged
    away in silence)."""
    lines = []
    items = list(result.final.items()) + [(k, v[:, -1]) for k, v in result.history.items()]
    for k, v in items:
        if keys is not None and k not in keys:
            continue
        v = np.asarray(v, dtype=np.float64).reshape(-1)
        ok = np.isfinite(v)
        if ok.any():
            n = f"n={v.size}" if ok.all() else f"n={ok.sum()} of {v.size}; {(~ok).sum()} not finite"
            lines.append(f"  {k:32s} {v[ok].mean():10.4g} +- {v[ok].std():.3g}  ({n})")
    return "\n".join(lines)


def pop_flags(argv: list[str] | None, *flags: str) -> tuple[dict, list[str] | None]:
    """A file's own `--flag VALUE` options that the runner does not parse (`--plot PNG`,
    `--compare RUN_DIR`): removed from `argv`, or from `sys.argv` when `argv` is None (as
    `main` then reads it), and returned as ({flag: VALUE or None}, the argv to hand `main`)."""
    args = sys.argv[1:] if argv is None else list(argv)
    found = {}
    for flag in flags:
        found[flag] = None
        if flag in args:
            i = args.index(flag)
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise SystemExit(f"error: {flag} needs a value")
            found[flag] = args[i + 1]
            del args[i:i + 2]
    if argv is None:
        sys.argv[1:] = args
        return found, None
    return found, args


def main(config_cls, init, update, *, presets=None, evaluate=None, argv=None, doc=None,
         summary_keys=None, nan_unless=None, steps_metric=None) -> RunResult:
    """Entry point of an algorithm file: parse CLI, train, print the summary."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(Path.home() / ".cache/lilrl-jax"))
    name = Path(sys.argv[0]).stem if argv is None else config_cls.__module__.split(".")[-1]
    cfg, opts = parse(config_cls, presets, argv, description=doc)
    parallel.initialize_distributed()
    try:
        result = train(config_cls, init, update, cfg, opts, evaluate=evaluate, name=name,
                       nan_unless=nan_unless, steps_metric=steps_metric)
    except (ConfigError, NonFiniteMetric) as e:
        if argv is not None:  # called from Python (tests): the exception itself
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2 if isinstance(e, ConfigError) else 1) from None
    print(f"\nfinished {name}: {opts.num_seeds} seed(s), run dir {result.run_dir}")
    print(summarize(result, summary_keys))
    return result
