"""Tests of the runner (common.run), plotting, benchmarking and sharding over devices."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import bench, plot, run
from tests.common import toy_algo

ROOT = Path(__file__).resolve().parents[2]
TOY = str(ROOT / "tests/common/toy_algo.py")


def _rows(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_resume_is_bit_identical(tmp_path):
    """A run stopped at update 20 and resumed to 40 equals an uninterrupted 40-update run,
    metric for metric and in the final parameters."""
    full = toy_algo.main(["--num-seeds", "2", "--run-dir", str(tmp_path / "a"), "--log-every",
                          "7", "--no-progress"])
    common = ["--num-seeds", "2", "--run-dir", str(tmp_path / "b"), "--log-every", "7",
              "--checkpoint-every", "10", "--no-progress"]
    toy_algo.main(common + ["--num-updates", "20"])
    resumed = toy_algo.main(common + ["--resume"])
    np.testing.assert_array_equal(np.asarray(full.state.w), np.asarray(resumed.state.w))
    a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert [r["update"] for r in b] == list(range(1, 41))
    assert a == b
    # A broken resume that restarts from init instead differs: the check can fail.
    fresh = toy_algo.main(common[:2] + ["--run-dir", str(tmp_path / "c"), "--num-updates", "20",
                                        "--no-progress"])
    assert not np.array_equal(np.asarray(fresh.state.w), np.asarray(full.state.w))


def test_resume_refuses_changed_config(tmp_path):
    args = ["--run-dir", str(tmp_path), "--no-progress", "--num-updates", "5"]
    toy_algo.main(args)
    with pytest.raises(ValueError, match="config differs"):
        toy_algo.main(args + ["--resume", "--lr", "0.1"])


def _summary(run_dir):
    return json.loads((Path(run_dir) / "summary.json").read_text())


def test_four_devices_match_one(tmp_path):
    """4 simulated CPU devices shard 4 seeds; each seed's result equals the 1-device run."""
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    d = tmp_path / "dev4"
    code = ("import jax, sys; sys.argv[0] = 'toy';"
            "from tests.common import toy_algo;"
            "assert jax.device_count() == 4;"
            f"toy_algo.main(['--num-seeds', '4', '--run-dir', '{d}', '--no-progress'])")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=ROOT,
                   capture_output=True)
    assert jax.device_count() == 1  # this process: the 1-device reference run
    toy_algo.main(["--num-seeds", "4", "--run-dir", str(tmp_path / "dev1"), "--no-progress"])
    outs = {1: _summary(tmp_path / "dev1"), 4: _summary(d)}
    np.testing.assert_allclose(outs[1]["charts/w0"], outs[4]["charts/w0"], rtol=1e-5)
    np.testing.assert_allclose(outs[1]["final_loss"], outs[4]["final_loss"], rtol=1e-5)
    assert len(set(np.round(outs[4]["charts/w0"], 6))) == 4  # seeds differ


def test_bad_config_fails_before_compiling(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"lr must be > 0, got -1"):
        toy_algo.main(["--lr", "-1", "--run-dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()  # failed before any run folder or compile
    with pytest.raises(ValueError, match="--num-seeds must be >= 1"):
        toy_algo.main(["--num-seeds", "0", "--run-dir", str(tmp_path / "y")])
    with pytest.raises(SystemExit, match="unknown --preset 'fast'; choose from"):
        toy_algo.main(["--preset", "fast"])
    with pytest.raises(SystemExit):  # tyro: a value of the wrong type
        toy_algo.main(["--dim", "many"])


def test_help_documents_every_field(capsys):
    with pytest.raises(SystemExit):
        toy_algo.main(["--help"])
    out = capsys.readouterr().out
    for flag, doc in [("--lr", "Adam learning rate"), ("--noise", "gradient noise scale"),
                      ("--num-seeds", "independent seeds"), ("--resume", "latest checkpoint"),
                      ("--track", "Weights & Biases")]:
        assert flag in out and doc in out, flag


def test_every_metric_is_checked_and_undefined_ones_are_marked_on_the_host():
    """Any metric (not only losses/) that turns NaN or inf stops the run, naming the metric,
    the update and the seed; a metric undefined by design (no episode ended) is logged as a
    finite placeholder with its count and becomes NaN on the host, after the check."""
    m = {"losses/x": np.array([[1.0, 2.0], [1.0, 3.0]]),
         "charts/best_f": np.array([[1.0, 2.0], [1.0, np.inf]])}
    with pytest.raises(FloatingPointError, match=r"charts/best_f became inf at update 12 "
                                                 r"\(seed index 1"):
        run.check_finite(m, 10)
    m = {"charts/episodic_return": np.array([[0.0, 5.0]]), "charts/episodes": np.array([[0, 2]])}
    run.check_finite(m, 0)
    out = run.mark_undefined(m, run.NAN_UNLESS)["charts/episodic_return"]
    np.testing.assert_array_equal(out, [[np.nan, 5.0]])


def _toy_with_metrics(extra):
    """toy_algo's update with extra metrics computed from its state."""
    def update(state, cfg):
        state, m = toy_algo.update(state, cfg)
        return state, {**m, **extra(state)}
    return update


def test_debug_nans_names_the_op_and_a_healthy_run_passes(tmp_path):
    """Without --debug-nans a NaN stops the run naming the metric and suggesting the flag;
    with it, the chunk is replayed op by op and the error names the op (log) and its source
    line. A healthy run whose undefined metric is a placeholder passes under --debug-nans
    (jax_debug_nans on the jitted program used to fail it) and logs null there."""
    cfg = toy_algo.Config(total_steps=20)
    bad = _toy_with_metrics(lambda s: {"losses/bad": jnp.log(2.0 - jnp.abs(s.w - 3.0).max())})
    opts = dict(log_every=5, progress=False)
    with pytest.raises(FloatingPointError, match=r"losses/bad became nan at update \d+ .*"
                                                 r"--debug-nans"):
        run.train(toy_algo.Config, toy_algo.init, bad, cfg,
                  run.RunOptions(run_dir=str(tmp_path / "a"), **opts))
    with pytest.raises(FloatingPointError, match=r"encountered in log") as err:
        run.train(toy_algo.Config, toy_algo.init, bad, cfg,
                  run.RunOptions(run_dir=str(tmp_path / "b"), debug_nans=True, **opts))
    assert any(fr.name == "<lambda>" and "test_run.py" in fr.filename
               for fr in __import__("traceback").extract_tb(err.tb)), "no source line"
    healthy = _toy_with_metrics(lambda s: {"charts/episodic_return": s.w[0] * 0.0,
                                           "charts/episodes": (s.w[0] > 1e9).astype(int)})
    res = run.train(toy_algo.Config, toy_algo.init, healthy, cfg,
                    run.RunOptions(run_dir=str(tmp_path / "c"), debug_nans=True, **opts))
    assert np.isnan(res.history["charts/episodic_return"]).all()
    assert _rows(tmp_path / "c")[-1]["charts/episodic_return"] is None


def test_a_steps_metric_counts_env_steps_across_a_resume(tmp_path):
    """A file whose steps per update vary (CMA-ES under IPOP) names the metric that counts
    them: env_steps is its running sum (3 per update here, not the Config's 1), continued
    after a resume, and perf/sps uses it."""
    upd = _toy_with_metrics(lambda s: {"charts/evaluations": jnp.where(s.w[0] > 1e9, 0, 3)})
    cfg = toy_algo.Config(total_steps=8)
    opts = dict(log_every=2, progress=False, run_dir=str(tmp_path / "r"))
    run.train(toy_algo.Config, toy_algo.init, upd, cfg, run.RunOptions(num_updates=4, **opts),
              steps_metric="charts/evaluations")
    run.train(toy_algo.Config, toy_algo.init, upd, cfg, run.RunOptions(resume=True, **opts),
              steps_metric="charts/evaluations")
    assert [r["env_steps"] for r in _rows(tmp_path / "r")] == [3, 6, 9, 12, 15, 18, 21, 24]
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["perf/sps"] > 0


def test_every_rate_coefficient_and_size_is_validated_by_name(monkeypatch):
    """Issue: `--lr -1e-3` and `--lr 0` ran to exit 0; `--num-minibatches 0` raised
    ZeroDivisionError. For every algorithm file, every field that VALUE_RULES covers rejects
    a value outside its range with a ConfigError naming the flag, the value and the
    constraint, before the file's own validate(); the defaults and presets all pass."""
    import dataclasses
    import importlib

    from common import envs

    monkeypatch.setattr(envs, "check_id", lambda *a, **k: None)  # importing brax takes ~10 s

    bad = {"> 0": [0, -1e-3], ">= 1": [0], "in [0, 1]": [-0.1, 1.5], ">= 0": [-1]}
    files = sorted(p for t in ("exploration", "evolution", "transformers", "detection")
                   for p in (ROOT / t).glob("[!_]*.py"))
    covered = set()
    for path in files:
        mod = importlib.import_module(f"{path.parent.name}.{path.stem}")
        if not hasattr(mod, "Config"):
            continue
        for preset in [{}, *getattr(mod, "PRESETS", {}).values()]:
            run.check_config(mod.Config(**preset))
        cfg = mod.Config()
        for f in dataclasses.fields(cfg):
            v = getattr(cfg, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            for applies, constraint, _ in run.VALUE_RULES:
                if applies(f.name):
                    covered.add(f.name)
                    for b in bad[constraint]:
                        b = type(v)(b) if isinstance(v, int) and b == int(b) else b
                        flag = "--" + f.name.replace("_", "-")
                        with pytest.raises(run.ConfigError,
                                           match=rf"{flag} must be {re.escape(constraint)}"):
                            run.check_config(dataclasses.replace(cfg, **{f.name: b}))
            if isinstance(v, float):
                with pytest.raises(run.ConfigError, match="must be finite, got nan"):
                    run.check_config(dataclasses.replace(cfg, **{f.name: float("nan")}))
    assert {"lr", "num_minibatches", "gamma", "ent_coef", "batch_size"} <= covered


def test_track_writes_offline_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    toy_algo.main(["--track", "--run-dir", str(tmp_path), "--no-progress", "--num-updates", "4"])
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for p in runs[0].iterdir())


def test_plot_and_bench(tmp_path, capsys):
    toy_algo.main(["--num-seeds", "2", "--run-dir", str(tmp_path / "r"), "--no-progress"])
    out = plot.plot([str(tmp_path / "r")], "losses/loss", str(tmp_path / "c.png"), window=3)
    assert Path(out).stat().st_size > 5000
    with pytest.raises(KeyError, match="available"):
        plot.plot([str(tmp_path / "r")], "charts/nope", str(tmp_path / "d.png"))
    bench.main([TOY, "--seeds", "2", "--chunk", "5", "--no-overhead", "--set", "total_steps=20"])
    table = capsys.readouterr().out
    assert "| 2 |" in table and "steps/s" in table


def test_matmul_flops_counts_loops_branches_and_convolutions():
    """2 m n k per product; a scan body times its length (XLA's cost analysis counts it
    once); the costlier branch of a cond; a convolution as 2 x outputs x kernel taps x
    input channels; the gradient of a product for both factors costs two more products."""
    import flax.linen as nn

    x = jnp.ones((32, 48))
    w = jnp.ones((48, 48))
    mm = 2 * 32 * 48 * 48
    assert bench.matmul_flops(lambda x: x @ w, x) == mm
    scan = lambda x, w: jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, 7)[0]
    assert bench.matmul_flops(scan, x, w) == 7 * mm
    grad = jax.grad(lambda x, w: scan(x, w).sum(), argnums=(0, 1))
    assert bench.matmul_flops(grad, x, w) == 3 * 7 * mm
    cond = lambda x, p: jax.lax.cond(p, lambda: x @ w @ w, lambda: x)
    assert bench.matmul_flops(cond, x, True) == 2 * mm
    conv = nn.Conv(16, (3, 3), feature_group_count=2)
    img = jnp.ones((2, 8, 8, 4))
    v = conv.init(jax.random.PRNGKey(0), img)
    assert bench.matmul_flops(conv.apply, v, img) == 2 * (2 * 8 * 8 * 16) * (3 * 3 * 2)


def test_host_evaluate_runs_per_seed_on_numpy(tmp_path):
    """A host evaluate gets one seed's state with concrete arrays (numpy works on it) and
    its results are stacked over seeds, equal to the jitted evaluate's."""
    seen = []

    @run.host_evaluate
    def host_eval(state, cfg):
        w = np.asarray(state.w)  # fails on a tracer
        seen.append(w.shape)
        return {"final_loss": float(np.sum((w - 3.0) ** 2))}

    cfg = toy_algo.Config(total_steps=4)
    opts = run.RunOptions(num_seeds=3, log_every=2, run_dir=str(tmp_path), progress=False)
    res = run.train(toy_algo.Config, toy_algo.init, toy_algo.update, cfg, opts,
                    evaluate=host_eval)
    assert seen == [(cfg.dim,)] * 3
    jitted = run.evaluate_seeds(toy_algo.evaluate, res.state, cfg, 3)
    np.testing.assert_allclose(res.final["final_loss"], jitted["final_loss"], rtol=1e-5)


# --- runs that lose nothing: run directories, resume, interrupts, bad values ---


def test_a_directory_holding_a_run_is_never_reused_silently(tmp_path):
    """Without --resume a run into a directory holding another run is refused (it used to
    overwrite config.json and the log and keep the old checkpoints, so a later --resume
    continued the old run); --resume names the field that differs, the seed included."""
    d = str(tmp_path / "r")
    toy_algo.main(["--run-dir", d, "--no-progress", "--num-updates", "4"])
    before = (tmp_path / "r" / "metrics.jsonl").read_text()
    with pytest.raises(run.ConfigError, match="already holds a run.*--resume"):
        toy_algo.main(["--run-dir", d, "--no-progress", "--num-updates", "4", "--seed", "1"])
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == before
    with pytest.raises(ValueError, match=r"config differs.*seed: saved 0, now 1"):
        toy_algo.main(["--run-dir", d, "--no-progress", "--num-updates", "8", "--seed", "1",
                       "--resume"])
    with pytest.raises(ValueError, match=r"config differs.*lr: saved 0.05, now 0.1"):
        toy_algo.main(["--run-dir", d, "--no-progress", "--num-updates", "8", "--lr", "0.1",
                       "--resume"])


def test_resume_of_a_finished_run_refuses_and_keeps_its_summary(tmp_path):
    """--resume of a run that did all its updates used to exit 0 and rewrite summary.json
    without any training metric; now it says so and leaves the run untouched."""
    args = ["--run-dir", str(tmp_path), "--no-progress", "--num-updates", "6"]
    toy_algo.main(args)
    summary = (tmp_path / "summary.json").read_text()
    with pytest.raises(run.ConfigError, match="already finished its 6 updates"):
        toy_algo.main(args + ["--resume"])
    assert (tmp_path / "summary.json").read_text() == summary
    toy_algo.main(args[:-1] + ["9", "--resume"])  # a larger --num-updates continues it
    assert [r["update"] for r in _rows(tmp_path)] == list(range(1, 10))


def test_resume_after_a_kill_logs_each_update_once(tmp_path):
    """A hard kill after the checkpoint at 10 but after logging updates 11-15: the resume
    cuts the log back to the checkpoint (it used to log 11-15 twice, out of order), and the
    result equals an uninterrupted run."""
    full = toy_algo.main(["--run-dir", str(tmp_path / "full"), "--no-progress",
                          "--log-every", "5", "--num-updates", "20"])
    args = ["--run-dir", str(tmp_path / "k"), "--no-progress", "--log-every", "5",
            "--checkpoint-every", "10"]
    toy_algo.main(args + ["--num-updates", "15"])  # checkpoints at 10 and 15
    ckpt = tmp_path / "k" / "checkpoints"
    import shutil

    shutil.rmtree(ckpt / "15")  # the kill: updates 11-15 logged, their checkpoint lost
    resumed = toy_algo.main(args + ["--num-updates", "20", "--resume"])
    assert [r["update"] for r in _rows(tmp_path / "k")] == list(range(1, 21))
    assert _rows(tmp_path / "k") == _rows(tmp_path / "full")
    np.testing.assert_array_equal(np.asarray(resumed.state.w), np.asarray(full.state.w))


@pytest.mark.parametrize("damage", ["empty_metadata", "truncated_array"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, damage):
    """The newest checkpoint damaged (its _METADATA emptied, or an array file truncated):
    the resume warns, naming it, and continues from the older intact one; the run equals an
    uninterrupted one (before: an orbax traceback or a bare JSONDecodeError)."""
    full = toy_algo.main(["--run-dir", str(tmp_path / "full"), "--no-progress",
                          "--log-every", "5", "--num-updates", "30"])
    args = ["--run-dir", str(tmp_path / "k"), "--no-progress", "--log-every", "5",
            "--checkpoint-every", "10"]
    toy_algo.main(args + ["--num-updates", "20"])  # checkpoints at 10 and 20
    newest = tmp_path / "k" / "checkpoints" / "20"
    if damage == "empty_metadata":
        (newest / "default" / "_METADATA").write_text("")
    else:
        for f in (newest / "default").rglob("d/*"):
            if f.is_file():
                f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    resumed = toy_algo.main(args + ["--num-updates", "30", "--resume"])
    err = capsys.readouterr().err
    assert "checkpoint of update 20" in err and "does not restore" in err, err
    np.testing.assert_array_equal(np.asarray(resumed.state.w), np.asarray(full.state.w))
    assert [r["update"] for r in _rows(tmp_path / "k")] == list(range(1, 31))


def test_sigint_checkpoints_prints_the_resume_command_and_exits_nonzero(tmp_path):
    """Ctrl-C during a run with the default --checkpoint-every 0: the chunk in flight
    finishes, a checkpoint is saved, the resume command is printed and the exit status is
    130 (before: a raw KeyboardInterrupt traceback and all work lost). Resuming with that
    command reaches the same state as an uninterrupted run."""
    import signal
    import time

    d = tmp_path / "r"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, TOY, "--run-dir", str(d), "--log-every", "5",
                             "--num-updates", "1000000", "--no-progress"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = d / "metrics.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 10):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err)
    assert "Traceback" not in err, err
    done = max(r["update"] for r in _rows(d))
    assert f"interrupted at update {done} of 1000000" in err, err
    command = err.split("continue with: ")[1].strip()
    assert "--resume" in command and f"--run-dir {d}" in command, command
    assert (d / "checkpoints" / str(done)).exists()
    # continue to done + 5 (as the printed command would, with a smaller --num-updates)
    total = str(done + 5)
    resumed = toy_algo.main(["--run-dir", str(d), "--log-every", "5", "--num-updates", total,
                             "--no-progress", "--resume"])
    full = toy_algo.main(["--run-dir", str(tmp_path / "full"), "--log-every", "5",
                          "--num-updates", total, "--no-progress"])
    np.testing.assert_array_equal(np.asarray(resumed.state.w), np.asarray(full.state.w))


def test_errors_come_before_anything_is_created(tmp_path, monkeypatch):
    """A --resume into a mistyped directory, and a --num-seeds whose state cannot fit the
    device, fail before any directory is created or anything compiled, naming the flag."""
    missing = tmp_path / "typo"
    with pytest.raises(run.ConfigError, match="holds no run"):
        toy_algo.main(["--run-dir", str(missing), "--resume", "--no-progress"])
    assert not missing.exists()
    monkeypatch.setattr(run, "device_memory_bytes", lambda: 10_000)
    with pytest.raises(run.ConfigError, match=r"--num-seeds 100: the training state alone"):
        toy_algo.main(["--run-dir", str(missing), "--num-seeds", "100", "--no-progress"])
    assert not missing.exists()
    toy_algo.main(["--run-dir", str(missing), "--num-seeds", "2", "--no-progress",
                   "--num-updates", "2"])  # 2 x (8 + 2 x 8 + 2) floats fit in 10 kB


def test_cli_prints_config_errors_in_one_line():
    """From the command line a bad value is one `error:` line and exit status 2, no
    traceback (tests calling main(argv) still get the ValueError)."""
    res = subprocess.run([sys.executable, TOY, "--lr", "-1", "--no-progress"], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                         text=True)
    assert res.returncode == 2, res
    assert res.stderr.strip() == "error: --lr must be > 0, got -1.0", res.stderr


def test_summary_values_may_be_arrays_per_seed():
    """An `evaluate` may return a curve per seed (metarl's return per episode index): the
    summary writes it as nested lists, NaN as null (a float() of an array raised)."""
    assert run._jsonable(np.array([[1.0, np.nan], [2.0, 3.0]])) == [[1.0, None], [2.0, 3.0]]
    assert run._jsonable(np.float32(2.5)) == 2.5 and run._jsonable(np.inf) is None


def test_fast_compile_reaches_the_chunk_compile_and_keeps_the_results(tmp_path, monkeypatch):
    """--fast-compile compiles the training chunks and evaluate() with the runner's init
    options (XLA's lowest backend level): the results equal the optimised run's to float
    tolerance, and the options really reach both compiles."""
    args = ["--num-seeds", "2", "--no-progress", "--num-updates", "10"]
    fast = toy_algo.main(args + ["--fast-compile", "--run-dir", str(tmp_path / "fast")])
    full = toy_algo.main(args + ["--run-dir", str(tmp_path / "full")])
    np.testing.assert_allclose(fast.history["losses/loss"], full.history["losses/loss"],
                               rtol=1e-4)
    seen = []  # the options each chunk was compiled with
    real = run.make_chunk

    def make_chunk(*a, **k):
        fn = real(*a, **k)

        class Spy:
            def lower(self, *args):
                low = fn.lower(*args)

                class L:
                    def compile(self, options=None):
                        seen.append(options)
                        return low.compile(options)

                return L()

        return Spy()

    monkeypatch.setattr(run, "make_chunk", make_chunk)
    evaluated = []  # ... and the options evaluate() was compiled with
    real_eval = run.evaluate_seeds

    def evaluate_seeds(*a, compiler_options=None):
        evaluated.append(compiler_options)
        return real_eval(*a, compiler_options=compiler_options)

    monkeypatch.setattr(run, "evaluate_seeds", evaluate_seeds)
    toy_algo.main(args + ["--fast-compile", "--run-dir", str(tmp_path / "a")])
    toy_algo.main(args + ["--run-dir", str(tmp_path / "b")])
    assert seen == [run.INIT_COMPILER_OPTIONS, None], seen
    assert evaluated == [run.INIT_COMPILER_OPTIONS, None], evaluated


def test_pop_flags_takes_a_files_own_flags_out_of_argv_or_sys_argv(monkeypatch):
    """A file's extra `--plot PNG` / `--compare DIR` leave the argv the runner parses (a
    list argv is copied, sys.argv is edited in place when argv is None); a flag without
    its value is an error, not a silent swallow of the next flag."""
    argv = ["--preset", "quick", "--plot", "a.png", "--num-seeds", "2"]
    flags, rest = run.pop_flags(argv, "--plot", "--compare")
    assert flags == {"--plot": "a.png", "--compare": None}
    assert rest == ["--preset", "quick", "--num-seeds", "2"] and len(argv) == 6
    monkeypatch.setattr(sys, "argv", ["algo.py", "--compare", "runs/x", "--seed", "1"])
    flags, rest = run.pop_flags(None, "--plot", "--compare")
    assert flags == {"--plot": None, "--compare": "runs/x"} and rest is None
    assert sys.argv == ["algo.py", "--seed", "1"]
    for bad in (["--plot"], ["--plot", "--seed", "1"]):
        with pytest.raises(SystemExit, match="--plot needs a value"):
            run.pop_flags(bad, "--plot")


def test_summary_says_how_many_seeds_were_not_finite():
    """A seed whose metric diverged (NaN or inf) is left out of the mean, and the line says
    so; with every seed finite the line is the plain mean +- std over all of them."""
    res = run.RunResult(state=None, run_dir=Path("."),
                        final={"err": np.array([1.0, np.nan, 3.0, np.inf]),
                               "ok": np.array([1.0, 3.0])},
                        history={})
    lines = run.summarize(res).splitlines()
    assert "2 +- 1  (n=2 of 4; 2 not finite)" in lines[0], lines
    assert "2 +- 1  (n=2)" in lines[1], lines
