"""The package comparison (exploration/compare.py) is a declaration: every cell's command
line must parse and validate in its file (flags, presets, env ids), and init and one update
must trace (jax.eval_shape, nothing compiled) at every setting: the shape-level check a
paper-preset trace gives an algorithm file, here for the settings the comparison runs (it
has no paper preset of its own; each file's paper preset is traced in its own tests). The
coverage reader must find the Coverage state of a file's training state."""

import importlib

import jax
import numpy as np
import pytest

from common import compare, run
from common.envs import CoverageState
from exploration import compare as package


@pytest.mark.parametrize("label", list(package.METHODS))
def test_every_cell_parses_validates_and_traces(label, tmp_path):
    method = package.METHODS[label]
    module = importlib.import_module(method.module)
    for setting, flags in package.SETTINGS.items():
        argv = compare.argv_of(method, setting, flags, 2, 0, str(tmp_path))
        cfg, opts = run.parse(module.Config, module.PRESETS, argv)
        run.check_config(cfg)
        assert cfg.env_id == flags[flags.index("--env-id") + 1]
        assert cfg.total_timesteps == int(package.BUDGET) and opts.num_seeds == 2
        state = jax.eval_shape(lambda k, c=cfg: module.init(k, c), jax.random.key(0))
        _, metrics = jax.eval_shape(lambda s, c=cfg: module.update(s, c), state)
        assert package.CURVE in metrics, (label, setting)


def test_coverage_is_found_in_a_state_and_read_per_seed():
    """Two seeds' states holding a Coverage state somewhere inside: the columns read cells,
    successes and the first success per seed; a state without one is an error."""
    visited = np.zeros((2, 4, 4), bool)
    visited[0, :2, :2] = True
    cov = CoverageState(None, visited, np.array([8, 8]), np.array([3, 0]), np.array([4, -1]))
    result = run.RunResult({"env_state": cov, "params": np.zeros(2)}, {}, None)
    got = [compare.values(result, c.key) for c in package.COLUMNS]
    np.testing.assert_array_equal(got[0], [4, 0])
    np.testing.assert_array_equal(got[1], [3, 0])
    assert compare.cell(got[2], package.COLUMNS[2]) == "4 (1/2)"
    with pytest.raises(ValueError, match="one Coverage wrapper"):
        package.coverage(run.RunResult({"x": jax.numpy.zeros(2)}, {}, None))
