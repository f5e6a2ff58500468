"""Benchmark harness: `python -m common.bench [FILE] [--preset P] [--seeds 1 8] [FLAGS...]`.

For one algorithm file (default: the shared PPO learner on gymnax CartPole-v1 with
PureJaxRL's published configuration: 4 envs x 128 steps, 4 epochs x 4 minibatches, 5e5
steps) and each seed count, it measures on the current device:

- compile seconds of one jitted chunk of `--chunk` updates,
- steady-state throughput (env steps, tokens or evaluations per second over all seeds),
- the matrix-product and convolution FLOPs of one update (counted on its jaxpr, loop bodies
  times their trip counts, the backward pass included), the FLOP rate and its share of the
  device's dense peak when known. XLA's own cost analysis is not used: it counts a loop
  body once and, on GPUs, omits the products it hands to cuBLAS/cuDNN.
- peak device memory (accelerators that report it),
- the final value of the file's headline metric after the whole run,
- the runner's overhead: the same run through `common.run.train` (progress bar, JSONL,
  checkpoints) against a bare loop of the same compiled chunks.

It prints a Markdown table (append it to BENCHMARKS.md with `--out BENCHMARKS.md`).

`--peers` runs the file's `peer_benchmark(num_seeds) -> list[dict]` instead: the file's
method beside installed peer libraries (pycma, evosax, ...) on the same problems in one
process, one row per (problem, implementation), printed as a Markdown table.

`--all-paper` is the command for the day an accelerator is at hand: every algorithm file
with a `paper` preset, in turn, each in its own process under `--time-limit` seconds,
timing its first `--max-updates` updates with 1 seed, and one Markdown table of them all
(compile s, throughput, peak memory, matmul FLOP rate and its share of the device's float32
and bfloat16 dense peaks; on a CPU, of the float32 matmul rate measured in the same run),
or the error, or the time-out, per file:

    python -m common.bench --all-paper --max-updates 5 --time-limit 900 --out BENCHMARKS.md
"""

import argparse
import dataclasses
import functools
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.extend.core
import numpy as np

from common import parallel, run

# Dense peak FLOP/s by device kind: float32 matmuls (TF32 tensor cores on NVIDIA, which
# XLA uses for float32 at its default precision) and bfloat16. Only used to report a share;
# unknown devices report n/a, CPUs a rate measured in the same run (`cpu_matmul_peak`).
PEAK_FLOPS = {"H100": 4.9e14, "H200": 4.9e14, "A100": 1.56e14, "TPU v4": 2.75e14,
              "TPU v5": 1.97e14}
PEAK_FLOPS_BF16 = {"H100": 9.89e14, "H200": 9.89e14, "A100": 3.12e14, "TPU v4": 2.75e14,
                   "TPU v5": 1.97e14}
TOPICS = ("exploration", "transformers", "curriculum", "selfsup", "evolution", "metarl",
          "detection", "generalization")


# The headline metric of a file that sets no HEADLINE_METRIC: the first of these it logs.
HEADLINES = ("charts/episodic_return", "charts/bits_per_char", "charts/bits_per_dim",
             "charts/accuracy", "losses/loss", "losses/total")


# --- The default benchmark: PPO (common.rl) on CartPole-v1 ---


def ppo_target():
    """(Config, init, update) of the default benchmark, imported only when it runs (so that
    benchmarking a file needs none of the RL packages)."""
    from common import envs
    from common.rl import PPOConfig, make_ppo

    @dataclass(frozen=True)
    class PPOBenchConfig(PPOConfig):
        env_id: str = "CartPole-v1"
        """gymnax environment id"""

        @property
        def steps_per_update(self) -> int:
            return self.batch_size

    init = lambda key, cfg: make_ppo(envs.make(cfg.env_id, cfg.num_envs), cfg)[0](key)
    update = lambda state, cfg: make_ppo(envs.make(cfg.env_id, cfg.num_envs), cfg)[1](state)
    return PPOBenchConfig, init, update


def load_module(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    if spec is None:
        raise SystemExit(f"error: cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def load_target(path: str | None):
    """(Config, init, update, presets, headline metric) of an algorithm file."""
    if path is None:
        return *ppo_target(), {}, "charts/episodic_return"
    mod = load_module(path)
    metric = getattr(mod, "HEADLINE_METRIC", None)
    return mod.Config, mod.init, mod.update, getattr(mod, "PRESETS", {}), metric


def device_summary() -> str:
    d = jax.devices()[0]
    return f"{jax.device_count()}x {d.device_kind} ({d.platform})"


@functools.cache
def cpu_matmul_peak(n: int = 1024, reps: int = 8) -> float:
    """FLOP/s of a large jitted float32 matmul on this device: the CPU's attainable peak,
    against which the files' matmul rates are reported there."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n))
    f = jax.jit(lambda a: jax.lax.fori_loop(0, reps, lambda i, x: (x @ a) * 1e-3, a))
    jax.block_until_ready(f(a))
    t0 = time.perf_counter()
    jax.block_until_ready(f(a))
    return reps * 2.0 * n**3 / (time.perf_counter() - t0)


def device_peaks() -> tuple[float | None, float | None]:
    """(float32, bfloat16) dense peak FLOP/s of the first device, None where unknown."""
    d = jax.devices()[0]
    if d.platform == "cpu":
        return cpu_matmul_peak(), None
    pick = lambda table: next((v for k, v in table.items() if k in d.device_kind), None)
    return pick(PEAK_FLOPS), pick(PEAK_FLOPS_BF16)


def peak_memory() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    b = stats.get("peak_bytes_in_use")
    return None if b is None else b / 2**30


def _dot_flops(eqn) -> float:
    (contracting, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in contracting])


def _conv_flops(eqn) -> float:
    rhs = eqn.invars[1].aval.shape  # kernel: every output element costs 2 * its size / out ch
    dn = eqn.params["dimension_numbers"]
    out_ch = rhs[dn.rhs_spec[0]]
    return 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod(rhs) / out_ch


def _jaxpr_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "scan":
            total += eqn.params["length"] * _jaxpr_flops(eqn.params["jaxpr"].jaxpr)
        elif name == "cond":  # the most expensive branch
            total += max(_jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
        else:  # pjit, remat, custom_jvp/vjp, while (body counted once): recurse into sub-jaxprs
            for v in eqn.params.values():
                for sub in v if isinstance(v, tuple | list) else (v,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        total += _jaxpr_flops(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        total += _jaxpr_flops(sub)
    return total


def matmul_flops(fn, *args) -> float:
    """FLOPs of the matrix products and convolutions of `fn(*args)` (2 per multiply-add),
    counted on its jaxpr: scan bodies times their length, the costliest branch of a cond,
    while-loop bodies once. Elementwise work is not counted; it is what dense peaks measure."""
    return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def bench_one(config_cls, init, update, cfg, num_seeds: int, chunk: int, metric: str,
              seed: int = 0, max_updates: int | None = None) -> dict:
    if hasattr(cfg, "validate"):
        cfg.validate()
    total = min(cfg.num_updates, max_updates or cfg.num_updates)
    chunk = min(chunk, total)
    sharding = parallel.seed_sharding(num_seeds)
    keys = parallel.shard_seeds(jax.random.split(jax.random.PRNGKey(seed), num_seeds), num_seeds)
    init_fn = jax.jit(run.seed_map(lambda k: init(k, cfg), num_seeds), out_shardings=sharding)
    state = jax.block_until_ready(init_fn(keys))

    t0 = time.perf_counter()
    compiled = run.make_chunk(update, cfg, chunk, sharding, num_seeds).lower(state).compile()
    compile_s = time.perf_counter() - t0
    one_state = jax.tree.map(lambda x: x[0], state)
    flops = chunk * num_seeds * matmul_flops(lambda s: update(s, cfg), one_state)

    # Bare loop of the same compiled chunk: the first call warms up, the rest are timed.
    n_chunks = total // chunk
    last = None
    t_run = t_all = 0.0
    for i in range(n_chunks):
        t0 = time.perf_counter()
        state, m = compiled(state)
        m = jax.device_get(m)
        dt = time.perf_counter() - t0
        t_all += dt
        if i > 0:
            t_run += dt
        last = m
    steps = getattr(cfg, "steps_per_update", 1)
    timed = (n_chunks - 1) * chunk
    sps = timed * steps * num_seeds / t_run if timed else float("nan")
    chunk_s = t_run / max(n_chunks - 1, 1)
    if metric is None:  # the file names none: the first of these that it logs
        metric = next((k for k in HEADLINES if last and k in last), None)
    headline = float(np.nanmean(last[metric][:, -1])) if last and metric in last else float("nan")
    peak, peak_bf16 = device_peaks()
    rate = flops / chunk_s if timed else float("nan")
    return dict(seeds=num_seeds, compile_s=compile_s, sps=sps, bare_s=t_all, updates=total,
                flops_per_chunk=flops, flops_per_s=rate,
                peak_share=rate / peak if (peak and timed) else None,
                bf16_share=rate / peak_bf16 if (peak_bf16 and timed) else None,
                peak_mem_gib=peak_memory(), metric=metric, headline=headline)


def runner_overhead(config_cls, init, update, cfg, num_seeds: int, chunk: int, bare: dict,
                    max_updates: int | None = None):
    """Wall time of the bare loop of compiled chunks divided by the runner's (progress bar,
    JSONL, checkpoints every quarter of the run), compile time excluded from both: 1.0 means
    the runner costs nothing, 0.95 means it costs 5% of throughput."""
    total = min(cfg.num_updates, max_updates or cfg.num_updates)
    every = max(chunk, (total // 4) // chunk * chunk)
    with tempfile.TemporaryDirectory() as d:
        opts = run.RunOptions(num_seeds=num_seeds, log_every=chunk, run_dir=d, progress=True,
                              checkpoint_every=every, num_updates=total // chunk * chunk)
        res = run.train(config_cls, init, update, cfg, opts, name="bench")
        loop_s = json.loads((res.run_dir / "summary.json").read_text())["perf/loop_s"]
    return bare["bare_s"] / loop_s


def fmt(x, spec=",.0f"):
    return "n/a" if x is None or x != x else format(x, spec)


def markdown(rows: list[dict]) -> str:
    """A Markdown table of dict rows (columns: the keys of the first row, in order)."""
    cols = list(rows[0])
    cell = lambda v: fmt(v, ".3g") if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def peers(path: str, num_seeds: int, out: str | None):
    mod = load_module(path)
    if not hasattr(mod, "peer_benchmark"):
        raise SystemExit(f"error: {path} defines no peer_benchmark(num_seeds)")
    print(f"peer benchmark: {path} on {device_summary()}, jax {jax.__version__}, "
          f"{num_seeds} seeds")
    table = markdown(mod.peer_benchmark(num_seeds))
    print(table)
    if out:
        with open(out, "a") as f:
            f.write(f"\n{path}, peers, {device_summary()}, {time.strftime('%Y-%m-%d')}, "
                    f"jax {jax.__version__}:\n\n{table}\n")


def paper_files(root: str | Path = ".") -> list[str]:
    """Every algorithm file of the topic packages under `root` whose PRESETS has a "paper"
    entry (found in the source text: nothing is imported)."""
    found = []
    for topic in TOPICS:
        for f in sorted(Path(root, topic).glob("*.py")):
            src = f.read_text()
            if "PRESETS" in src and '"paper"' in src and "def main(" in src:
                found.append(str(f.relative_to(root)))
    return found


def _last_error(stderr: str) -> str | None:
    """The exception line of a child's traceback (`ValueError: ...`), else its last line."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^([\w.]+(Error|Exception|Exit)\b|error:)", ln):
            return ln
    return lines[-1] if lines else None


def all_paper(files: list[str], max_updates: int, time_limit: float, out: str | None):
    """Each file's paper preset in its own process (a crash or hang costs one row), 1 seed,
    its first `max_updates` updates in chunks of 1; one Markdown table of them all."""
    print(f"paper presets on {device_summary()}, jax {jax.__version__}: {len(files)} files, "
          f"{max_updates} updates each, {time_limit:.0f} s limit each", flush=True)
    rows = []
    for f in files:
        with tempfile.TemporaryDirectory() as d:
            res = Path(d) / "row.json"
            cmd = [sys.executable, "-m", "common.bench", f, "--preset", "paper", "--seeds", "1",
                   "--chunk", "1", "--max-updates", str(max_updates), "--no-overhead",
                   "--json-out", str(res)]
            t0 = time.perf_counter()
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=time_limit,
                                   cwd=Path(__file__).resolve().parents[1])
                status = "ok" if p.returncode == 0 and res.exists() else "error: " + (
                    _last_error(p.stderr) or f"exit {p.returncode}")[:160]
            except subprocess.TimeoutExpired:
                status = f"timed out after {time_limit:.0f} s"
            r = json.loads(res.read_text())[0] if status == "ok" else {}
        row = {"file": f, "status": status, "wall s": time.perf_counter() - t0,
               "compile s": r.get("compile_s"), "steps/s": r.get("sps"),
               "TFLOP/s": r.get("flops_per_s", float("nan")) / 1e12,
               "share fp32 peak": r.get("peak_share"), "share bf16 peak": r.get("bf16_share"),
               "peak mem GiB": r.get("peak_mem_gib")}
        rows.append(row)
        print(f"{f}: {status} ({row['wall s']:.0f} s)", flush=True)
    table = markdown(rows)
    print(table)
    if out:
        with open(out, "a") as fh:
            fh.write(f"\nPaper presets, first {max_updates} updates, 1 seed, "
                     f"{device_summary()}, {time.strftime('%Y-%m-%d')}, jax {jax.__version__}"
                     f" (`python -m common.bench --all-paper`):\n\n{table}\n")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", nargs="?", help="algorithm file (default: PPO on CartPole-v1)")
    p.add_argument("--preset", default=None, help="the file's preset (e.g. bench, quick)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 8], help="seed counts to time")
    p.add_argument("--chunk", type=int, default=10, help="updates per jitted chunk")
    p.add_argument("--no-overhead", action="store_true", help="skip the runner-overhead run")
    p.add_argument("--max-updates", type=int, default=None,
                   help="time at most this many updates (paper-scale configs: a throughput "
                   "sample, not a full run; the final metric is then the one reached there)")
    p.add_argument("--out", default=None, help="append the Markdown table to this file")
    p.add_argument("--peers", action="store_true",
                   help="run the file's peer_benchmark (side by side with peer libraries)")
    p.add_argument("--peer-seeds", type=int, default=11, help="seeds per peer-benchmark cell")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="config overrides, e.g. --set total_timesteps=100000")
    p.add_argument("--all-paper", action="store_true",
                   help="every file's paper preset, each in its own process (see above)")
    p.add_argument("--files", nargs="*", default=None,
                   help="with --all-paper: these files instead of every topic file")
    p.add_argument("--time-limit", type=float, default=900.0,
                   help="with --all-paper: seconds per file before it is stopped")
    p.add_argument("--json-out", default=None, help="also write the rows as JSON here")
    a = p.parse_args(argv)
    if a.all_paper:
        return all_paper(a.files if a.files is not None else paper_files(), a.max_updates or 3,
                         a.time_limit, a.out)
    if a.peers:
        if a.file is None:
            p.error("--peers needs a file")
        return peers(a.file, a.peer_seeds, a.out)
    config_cls, init, update, presets, metric = load_target(a.file)
    if a.preset is not None and a.preset not in presets:
        p.error(f"unknown preset {a.preset!r}; the file has {sorted(presets)}")
    over = dict(presets.get(a.preset, {}))
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    for kv in a.set:
        k, _, v = kv.partition("=")
        if k not in fields:
            p.error(f"--set: {config_cls.__name__} has no field {k!r}")
        over[k] = type(getattr(config_cls(), k))(v) if not isinstance(
            getattr(config_cls(), k), bool) else v.lower() in ("1", "true", "yes")
    cfg = config_cls(**over)
    name = a.file or "common/rl.py PPO, gymnax CartPole-v1"
    if a.preset:
        name += f" --preset {a.preset}"
    if a.max_updates and a.max_updates < cfg.num_updates:
        name += f" (first {a.max_updates} of {cfg.num_updates:,} updates)"
    print(f"benchmark: {name} on {device_summary()}, jax {jax.__version__}")
    rows = []
    for s in a.seeds:
        r = bench_one(config_cls, init, update, cfg, s, a.chunk, metric,
                      max_updates=a.max_updates)
        r["overhead"] = None if a.no_overhead else runner_overhead(
            config_cls, init, update, cfg, s, a.chunk, r, a.max_updates)
        rows.append(r)
        print(json.dumps(r), file=sys.stderr)
    head = ("| target | device | seeds | compile s | steps/s (all seeds) | GFLOP/s | fp32 peak "
            "share | bf16 peak share | peak mem GiB | final metric | runner/bare throughput |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {name} | {device_summary()} | {r['seeds']} | {r['compile_s']:.1f} | "
            f"{fmt(r['sps'])} | {fmt(r['flops_per_s'] / 1e9, '.1f')} | "
            f"{fmt(r['peak_share'], '.1%')} | {fmt(r['bf16_share'], '.1%')} | "
            f"{fmt(r['peak_mem_gib'], '.2f')} | "
            f"{r['metric']} {fmt(r['headline'], '.3g')} | {fmt(r['overhead'], '.3f')} |")
    table = "\n".join(lines)
    print(table)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(rows))
    if a.out:
        with open(a.out, "a") as f:
            f.write(f"\n{time.strftime('%Y-%m-%d')}, jax {jax.__version__}:\n\n{table}\n")


if __name__ == "__main__":
    main()
