"""The package comparison (metarl/compare.py) is a declaration: every cell's command line must
parse and validate in its file, with the shared setting (2-D navigation, 50-step episodes,
goals in [-0.5, 0.5]^2), the shared budget (600,000 meta-training environment steps) and
the shared seeds; the gradient-based rows must differ only in the meta-learner; every column
must read one value per seed from what each file's evaluate() returns (jax.eval_shape:
traced, nothing compiled); and one tiny cell must run end to end through common.compare
(its table and this file's plot)."""

import importlib
import types

import jax
import numpy as np
import pytest

from common import compare, envs, run
from metarl import compare as package

SEEDS = package.SEEDS
SETTING = next(iter(package.SETTINGS))


def cell_config(label: str):
    method = package.METHODS[label]
    module = importlib.import_module(method.module)
    argv = compare.argv_of(method, SETTING, package.SETTINGS[SETTING], SEEDS, 0, "/tmp/x")
    cfg, opts = run.parse(module.Config, module.PRESETS, argv)
    run.check_config(cfg)
    return module, cfg, opts


def name_of(label: str) -> str:
    return package.METHODS[label].module.rsplit(".", 1)[1]


@pytest.mark.parametrize("label", list(package.METHODS))
def test_every_cell_validates_with_the_shared_setting_budget_and_seeds(label):
    """Each cell's Config (run.parse + run.check_config, as its main() does): num_updates x
    steps_per_update is the 600,000-step budget, episodes are 50 steps of PointNav2D, the
    command asks for the shared seeds. Broken tables tried: the MAML rows without
    `--num-iterations` (the quick preset's 120 = 1.2M steps): fails; RL^2 with
    `--episode-length 10` (its default): fails; RL^2 on Meta-Bandit-5: fails."""
    module, cfg, opts = cell_config(label)
    assert opts.num_seeds == SEEDS and opts.seed == 0
    assert cfg.num_updates * cfg.steps_per_update == package.BUDGET, label
    if name_of(label) == "rl2":
        assert cfg.env_id == "Meta-Nav2D" and cfg.episode_length == package.HORIZON
        inner = module.make_env(cfg, 4).env.env
        assert isinstance(inner, envs.PointNav2D) and inner.episode_length == package.HORIZON
        assert cfg.episodes_per_trial == package.RL2_TRIAL
        assert cfg.num_steps == package.RL2_TRIAL * package.HORIZON  # a rollout = a trial
    else:
        assert cfg.horizon == package.HORIZON and cfg.eval_steps >= 3
        assert importlib.import_module("metarl.maml_rl").GOAL_RANGE == 0.5


def test_gradient_rows_differ_only_in_the_meta_learner():
    """MAML-TRPO, first-order MAML and the pretrained reference: the same Config but algo;
    the two unsupervised rows: the same Config but the proposer, and their meta-learner's
    sizes are maml_rl's (the same policy, tasks, trajectories and trust region). Broken:
    first-order MAML with `--inner-lr 0.2`: fails; the random-D row with `--hidden 64`:
    fails."""
    maml = cell_config("MAML-TRPO")[1].__dict__
    for label, algo in (("first-order MAML", "fomaml"), ("pretrained on all tasks", "pretrain")):
        other = cell_config(label)[1].__dict__
        assert {k for k in maml if maml[k] != other[k]} == {"algo"} and other["algo"] == algo
    uml = importlib.import_module("metarl.unsupervised_meta_rl")
    a, b = (cell_config(x)[1] for x in package.METHODS if x.startswith("unsupervised"))
    assert {k for k in a.__dict__ if a.__dict__[k] != b.__dict__[k]} == {"proposer"}
    learner = uml.learner_config(a).__dict__
    assert {k for k in learner if learner[k] != maml[k]} == set(), learner


@pytest.mark.parametrize("name", ["maml_rl", "unsupervised_meta_rl", "rl2"])
def test_every_column_reads_a_value_per_seed(name):
    """Each column finds its evaluate() key in what the file returns (traced, not run),
    one value per seed; RL^2 has no untrained arm (NaN, "n/a" in the table). Broken: the
    reader asking rl2 for `adaptation/k` with 2 digits: fails."""
    label = next(x for x in package.METHODS if name_of(x) == name)
    module, cfg, _ = cell_config(label)
    state = jax.eval_shape(lambda k: module.init(k, cfg), jax.random.PRNGKey(0))
    final = jax.eval_shape(lambda s: module.evaluate(s, cfg), state)
    res = run.RunResult(None, {}, None, {k: np.zeros((SEEDS, *v.shape)) for k, v in final.items()})
    for col in package.COLUMNS:
        v = compare.values(res, col.key)
        assert v.shape == (SEEDS,), (name, col.header)
        assert np.isnan(v).all() == (name == "rl2" and col.header.startswith("untrained init"))


def test_tiny_cell_runs_through_common_compare(tmp_path):
    """maml_rl at a tiny size (2 goals x 2 trajectories of 5 steps, 1 iteration, XLA's fast
    compile) as the package's only row: common.compare runs it through its main(), the
    table has one row of four finite numbers and the plot is written. Broken: the reader
    asking for `adapted/return_0k` (cells "n/a"): fails; the plot not saved: fails."""
    tiny = {"MAML tiny": compare.Method("metarl.maml_rl", (
        "--hidden", "4", "--num-layers", "1", "--horizon", "5", "--meta-batch-size", "2",
        "--num-trajectories", "2", "--num-iterations", "1", "--eval-tasks", "2",
        "--eval-trajectories", "2", "--cg-iters", "2", "--ls-max-steps", "2",
        "--fast-compile"))}
    pkg = types.SimpleNamespace(SETTINGS=package.SETTINGS, METHODS=tiny,
                                COLUMNS=package.COLUMNS, __doc__="tiny")
    out = tmp_path / "table.md"
    results = compare.main(["metarl", "--num-seeds", "1", "--out", str(out)], package=pkg)
    row = out.read_text().splitlines()[4]
    cells = row.strip("|").split("|")[1:]
    assert row.startswith("| MAML tiny |") and len(cells) == 4
    assert all(np.isfinite(float(c)) for c in cells), row
    package.plot(results, SETTING, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000
