"""The package comparison (generalization/compare.py) is a declaration: every cell's command
line must parse and validate in its file at both settings, on the same 1,000 training
images; the label-corruption flag must really change the training labels (all true in one
setting, independent of the images in the other, through each file's own label function);
and every column must read a per-seed value from what the file's init / update / evaluate
produce (jax.eval_shape: traced, nothing compiled). A broken settings table (the random
setting not passing its flag, or passing it to the true one) fails these tests."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import compare, run
from generalization import compare as package

SEEDS = 2


def cell_config(label: str, setting: str):
    method = package.METHODS[label]
    module = importlib.import_module(method.module)
    argv = compare.argv_of(method, setting, package.SETTINGS[setting], SEEDS, 0, "/tmp/x")
    cfg, opts = run.parse(module.Config, module.PRESETS, argv)
    run.check_config(cfg)
    return module, cfg, opts


def labels_of(module, cfg, key):
    """(training labels of the cell, the true ones), numpy, through the file's own code."""
    name = module.__name__.rsplit(".", 1)[1]
    if name == "overfit_random_labels":
        y = module.images(cfg.dataset, cfg.data_dir, cfg.num_train, cfg.num_test)[1]
        got = jax.jit(module.make_labels, static_argnums=2)(key, jnp.asarray(y), cfg)
        return np.asarray(got)[0], y
    if name == "overfit_mdl":
        y = module.images(cfg.dataset, cfg.data_dir, cfg.num_train, cfg.num_test)[1]
        got = jax.jit(module.make_labels, static_argnums=2)(key, jnp.asarray(y), cfg)
        return np.asarray(got)[0], y
    y = np.asarray(jax.jit(module.train_labels, static_argnums=1)(
        key, cfg.__class__(**{**cfg.__dict__, "label_corruption": 0.0})))
    return np.asarray(jax.jit(module.train_labels, static_argnums=1)(key, cfg)), y


@pytest.mark.parametrize("label", list(package.METHODS))
def test_every_cell_parses_and_corrupts_the_labels_of_its_setting(label):
    """Both settings: the file's Config validates with 1,000 training images and 2 seeds;
    under "true labels" the training labels are the true ones, under "random labels" they
    agree with them for ~1/10 of the images (chance), and the two settings differ only in
    the corruption flag. Broken tables tried: the random setting without its flag (labels
    true): fails; `--corruptions 1.0` in both settings: fails."""
    key = jax.random.PRNGKey(0)
    cfgs = {}
    for setting in package.SETTINGS:
        module, cfg, opts = cell_config(label, setting)
        assert cfg.num_train == 1000 and opts.num_seeds == SEEDS, (label, setting)
        if hasattr(cfg, "corruptions"):  # files with one arm per corruption value
            assert cfg.corruptions == (float(package.CORRUPTION[setting]),)
            assert len(cfg.arms) == 1
        got, true = labels_of(module, cfg, key)
        agree = (got == true).mean()
        print(label, setting, "agreement with the true labels", agree)
        if setting == "true labels":
            assert agree == 1.0, (label, setting, agree)
        else:
            assert abs(agree - 0.1) < 0.04, (label, setting, agree)
        cfgs[setting] = cfg
    a, b = (cfgs[s].__dict__ for s in package.SETTINGS)
    assert {k for k in a if a[k] != b[k]} <= {"corruptions", "label_corruption"}


def _fake_result(module, cfg, num_updates):
    """A RunResult of SEEDS seeds with zeros of the shapes init / update / evaluate give."""
    state = jax.eval_shape(lambda k: module.init(k, cfg), jax.random.PRNGKey(0))
    _, metrics = jax.eval_shape(lambda s: module.update(s, cfg), state)
    final = jax.eval_shape(lambda s: module.evaluate(s, cfg), state)
    return run.RunResult(
        None, {k: np.zeros((SEEDS, num_updates)) for k in metrics}, None,
        {k: np.zeros((SEEDS, *v.shape)) for k, v in final.items()})


@pytest.mark.parametrize("label", list(package.METHODS))
def test_every_column_reads_a_value_per_seed(label):
    """Each column finds its key (or reads its function's input) in what the file logs and
    evaluates at the random-labels setting (traced, not run), one value per seed."""
    module, cfg, _ = cell_config(label, "random labels")
    res = _fake_result(module, cfg, cfg.num_updates)
    for col in package.METHODS[label].columns:
        v = compare.values(res, col.key)
        assert v is not None and v.shape == (SEEDS,), (label, col.header)


def test_readers_pick_one_arm_a_round_and_the_worst_later_layer():
    """`arm` reads the single key of its prefix (two are an error); `at_round` the value
    after round r; `worst_later_layer` the largest train error over layers 2.. reset to
    theta_0 (column 1 of the matrix), not layer 1's."""
    res = run.RunResult(None, {"charts/x": np.arange(12.0).reshape(2, 6)}, None,
                        {"test_acc_random_labels": np.array([0.1, 0.2]),
                         "train_err_matrix": np.zeros((2, 4, 3))})
    np.testing.assert_array_equal(package.arm("test_acc_")(res), [0.1, 0.2])
    np.testing.assert_array_equal(package.at_round("charts/x", 2)(res), [2.0, 8.0])
    m = res.final["train_err_matrix"]
    m[:, 0, 1], m[:, 2, 1], m[1, 3, 1], m[:, 1, 0] = 0.9, 0.3, 0.5, 0.8
    np.testing.assert_array_equal(package.worst_later_layer(res), [0.3, 0.5])
    res.final["test_acc_true_labels"] = np.zeros(2)
    with pytest.raises(ValueError, match="expected one key"):
        package.arm("test_acc_")(res)
