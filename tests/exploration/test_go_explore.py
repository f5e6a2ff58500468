"""Tests of exploration/go_explore.py: the selection weights, the archive update rule, the
downscaled cell, exact return by state restore (hand cases, through the functions `update`
runs), behaviour against the no-return baseline, purity, CLI and the paper preset."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from exploration import go_explore as ge
from tests.common.cli import cli_args
from tests.common.config_fields import unread_fields
from tests.common.preset import trace_paper

# One tiny configuration for every test: DeepSea N=12 (91 cells), 8 explorers, rounds of 16
# steps, 16 rounds = 2,048 env steps.
TINY = ge.Config(env_id="DeepSea-bsuite-12", total_timesteps=2048, num_explorers=8,
                 explore_steps=16, archive_size=128)
INT_MAX = np.iinfo(np.int32).max


def test_cell_weights_by_hand():
    """[1] App. A.5 / released `WeightedSelector` without domain knowledge, the no-domain
    script's weights (seen 3, chosen 0.1, chosen-since-new 0, action 0; powers 0.5, 0.5,
    1, 0.5): W = 1 + sum_a [w_a / (v_a + 0.001)^p_a + 1e-5].

        counts (seen, chosen, csn, action)   W
        (0, 0, 0, 0)   1 + 3/sqrt(.001) + .1/sqrt(.001) + 4e-5     = 99.0312
        (3, 1, 1, 5)   1 + 3/sqrt(3.001) + .1/sqrt(1.001) + 4e-5   = 2.83172
        (99, 24, 0, 0) 1 + 3/sqrt(99.001) + .1/sqrt(24.001) + 4e-5 = 1.32193
        terminal or empty: 0

    A cell never seen is picked ~35x as often as one seen 3 times (the count terms, not the
    constant 1, decide)."""
    counts = jnp.array([[0, 0, 0, 0], [3, 1, 1, 5], [99, 24, 0, 0], [1, 1, 1, 1],
                        [0, 0, 0, 0]])
    selectable = jnp.array([True, True, True, False, False])
    w = ge.cell_weights(counts, selectable, (3.0, 0.1, 0.0, 0.0), (0.5, 0.5, 1.0, 0.5))
    hand = [1 + 3 / np.sqrt(0.001) + 0.1 / np.sqrt(0.001) + 4e-5,
            1 + 3 / np.sqrt(3.001) + 0.1 / np.sqrt(1.001) + 4e-5,
            1 + 3 / np.sqrt(99.001) + 0.1 / np.sqrt(24.001) + 4e-5, 0.0, 0.0]
    np.testing.assert_allclose(w, hand, rtol=1e-5)
    np.testing.assert_allclose(w[:3], [99.0312, 2.83172, 1.32193], rtol=1e-4)
    # chosen-since-new with power 1 and the action term enter the same way.
    w2 = ge.cell_weights(counts[1:2], selectable[1:2], (0.0, 0.0, 2.0, 1.0), (0.5, 0.5, 1.0, 0.5))
    np.testing.assert_allclose(w2, [1 + 2 / 1.001 + 1 / np.sqrt(5.001) + 4e-5], rtol=1e-6)


def test_accept_rule_by_hand():
    """[1] Sec. 3.1.3, released `should_accept_cell`: higher score replaces; equal score and
    shorter replaces; equal score and equal or longer does not; lower score never, even
    much shorter. An empty entry (-inf, INT_MAX) always accepts. optimize_score False:
    shorter only."""
    best_s, best_l = jnp.float32(1.0), jnp.int32(10)
    cases = [((2.0, 50), True), ((1.0, 9), True), ((1.0, 10), False), ((1.0, 11), False),
             ((0.5, 1), False)]
    for (s, n), want in cases:
        assert bool(ge.accept(jnp.float32(s), jnp.int32(n), best_s, best_l, True)) is want, s
    assert bool(ge.accept(jnp.float32(-5.0), jnp.int32(99), -jnp.inf, INT_MAX, True))
    assert bool(ge.accept(jnp.float32(0.5), jnp.int32(9), best_s, best_l, False))
    assert not bool(ge.accept(jnp.float32(2.0), jnp.int32(11), best_s, best_l, False))


def _archive():
    """A hand archive of 4 slots, 2 filled: (0, 0) start, (1, 1) with score 1, length 10."""
    a = ge.empty_archive(4, 2, {"x": jnp.zeros(())})
    seen = jnp.zeros(4, bool)
    a, _, _, _ = ge.add_visit(a, seen, seen, 0, jnp.array([0, 0]), 0.0, 0, False, {"x": 0.0},
                              True)
    a, _, _, _ = ge.add_visit(a, seen, seen, 0, jnp.array([1, 1]), 1.0, 10, False, {"x": 1.0},
                              True)
    return a.replace(counts=jnp.zeros_like(a.counts).at[0, ge.CHOSEN_SINCE_NEW].set(3))


def test_archive_update_through_add_visit():
    """The step `update` runs for each explorer: a new cell takes the next slot; on a known
    cell, better score replaces (and the state with it), equal score and shorter replaces,
    equal score and longer keeps the entry. Seen counts once per phase (the phase's mask),
    action counts every step; an accepted step zeroes the start cell's chosen-since-new.
    Only the phase's first arrival at a cell may replace its entry (released `process_cell`
    drops the restore point of later arrivals): a second, better arrival in the same phase
    (score 2) is ignored, the same trajectory in a new phase replaces (fails without the
    `arrived` gate: the second arrival would replace)."""
    a, seen = _archive(), jnp.zeros(4, bool)
    f = jax.jit(ge.add_visit, static_argnums=9)
    # equal score, longer: kept; counted seen once, action once; chosen-since-new stays 3
    b, seen1, arrived1, i = f(a, seen, seen, 0, jnp.array([1, 1]), 1.0, 12, False, {"x": 7.0},
                              True)
    assert int(i) == 1 and float(b.score[1]) == 1.0 and int(b.length[1]) == 10
    assert float(b.env_state["x"][1]) == 1.0 and int(b.counts[0, ge.CHOSEN_SINCE_NEW]) == 3
    np.testing.assert_array_equal(arrived1, [False, True, False, False])
    # again in the same phase, now with a better score: seen stays 1, action 2, NOT accepted
    b2, _, _, _ = f(b, seen1, arrived1, 0, jnp.array([1, 1]), 2.0, 13, False, {"x": 8.0}, True)
    np.testing.assert_array_equal(b2.counts[1], [1, 0, 0, 2])
    assert float(b2.score[1]) == 1.0 and float(b2.env_state["x"][1]) == 1.0
    # the same arrival as the first of a new phase: accepted
    b3, _, _, _ = f(b, seen, seen, 0, jnp.array([1, 1]), 2.0, 13, False, {"x": 8.0}, True)
    assert float(b3.score[1]) == 2.0 and float(b3.env_state["x"][1]) == 8.0
    # equal score, shorter: replaced with its state
    c, _, _, _ = f(a, seen, seen, 0, jnp.array([1, 1]), 1.0, 9, False, {"x": 9.0}, True)
    assert int(c.length[1]) == 9 and float(c.env_state["x"][1]) == 9.0
    assert int(c.counts[0, ge.CHOSEN_SINCE_NEW]) == 0
    # better score, longer: replaced
    d, _, _, _ = f(a, seen, seen, 0, jnp.array([1, 1]), 2.0, 30, True, {"x": 5.0}, True)
    assert float(d.score[1]) == 2.0 and int(d.length[1]) == 30 and bool(d.terminal[1])
    # lower score, shorter: kept
    e, _, _, _ = f(a, seen, seen, 0, jnp.array([1, 1]), 0.5, 1, False, {"x": 5.0}, True)
    assert float(e.score[1]) == 1.0 and int(e.length[1]) == 10
    # a new cell: slot 2, size 3
    g, _, _, i = f(a, seen, seen, 0, jnp.array([2, 1]), -0.1, 3, False, {"x": 4.0}, True)
    assert int(i) == 2 and int(g.size) == 3 and bool(g.filled[2])
    np.testing.assert_array_equal(g.keys[2], [2, 1])
    # a full archive drops new cells (index -1) and keeps its size
    full = g.replace(size=jnp.int32(4), filled=jnp.ones(4, bool))
    h, _, _, i = f(full, seen, seen, 0, jnp.array([5, 5]), 0.0, 3, False, {"x": 4.0}, True)
    assert int(i) == -1 and int(h.size) == 4 and not (h.keys == 5).all(-1).any()


def test_downscaled_cell_is_area_average_then_levels():
    """[1] Sec. 3.1: released `convert_state` = cv2.resize(INTER_AREA) / 255 * 8, truncated.
    area_matrix(2, 3) by hand: output 0 averages input [0, 1.5): (1, 0.5, 0) / 1.5. A frame
    of 4 x 6 blocks shrinks to 2 x 3 block means: 255 -> 8, 128 -> floor(4.016) = 4, 31 ->
    floor(0.97) = 0, 32 -> 1."""
    np.testing.assert_allclose(ge.area_matrix(2, 3), [[2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3]],
                               rtol=1e-6)
    np.testing.assert_allclose(ge.area_matrix(8, 84).sum(1), 1.0, rtol=1e-6)
    blocks = np.array([[255, 128, 31], [32, 0, 200]], np.uint8)
    frame = jnp.asarray(np.kron(blocks, np.ones((2, 2), np.uint8)))  # (4, 6)
    cell = ge.downscale_cell(frame, 2, 3, 8)
    np.testing.assert_array_equal(cell, [8, 4, 0, 1, 0, 6])
    assert ge.downscale_cell(jnp.zeros((2, 84, 84), jnp.uint8), 8, 11, 8).shape == (2, 88)


SEEDS = 12
RUN_ARGS = cli_args(TINY, ge.Config()) + ["--num-seeds", str(2 * SEEDS), "--log-every", "16",
                                          "--no-progress"]


def _run(run_dir):
    """TINY through `ge.main`, 2 x SEEDS seeds in ONE compiled program: seeds SEEDS.. are
    the baseline without return (go False, traced in the state: every explore phase starts
    from the start state), each on the key of its Go-Explore twin."""
    keys = jax.random.split(jax.random.PRNGKey(0), 2 * SEEDS)  # the runner's seed keys
    real = ge.init

    def init(key, cfg):
        i = jnp.argmax(jnp.all(key == keys, -1))
        return real(keys[i % SEEDS], cfg).replace(go=i < SEEDS)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ge, "init", init)
        return ge.main(RUN_ARGS + ["--run-dir", str(run_dir)])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("go_explore"))


def test_go_explore_finds_the_treasure_the_no_return_baseline_does_not(tiny_run):
    """Behaviour ([1] Sec. 3.1, "detachment"): DeepSea N=12, 2,048 env steps, 12 seeds.
    Go-Explore against the broken variant that never returns (each explore phase starts
    from the start state: sticky random exploration), same keys, one compiled run.
    Measured (CPU, jax 0.10.2):
        Go-Explore cells 89 85 89 89 89 77 89 85 79 89 89 89, treasure in 10/12 seeds
        no return  cells 56 51 56 59 56 55 56 56 60 51 58 59, treasure in 0/12
    (a uniform walk needs 2^12 episodes; 2,048 steps are 170). The baseline fails every
    assert; so does Go-Explore when `update` ignores the traced `go` flag (both halves
    then run the baseline)."""
    cells = tiny_run.history["charts/distinct_cells"][:, -1]
    wins = tiny_run.final["successes"] > 0
    on, off = cells[:SEEDS], cells[SEEDS:]
    print("GE", on, wins[:SEEDS], "no return", off, wins[SEEDS:])
    assert on.min() > off.max() + 5, (on, off)
    assert wins[:SEEDS].sum() >= 8 and wins[SEEDS:].sum() <= 2, wins
    np.testing.assert_array_equal(tiny_run.state.go, [True] * SEEDS + [False] * SEEDS)


def test_archive_holds_consistent_and_improved_trajectories(tiny_run):
    """Consistency of the final archives (every seed): each non-terminal cell's stored env
    state stands on that cell (so "go" restores a state of the cell), and on DeepSea (one
    row per step) its trajectory length equals its row; a cell's score is -0.01/N times
    the right moves of its trajectory (>= its column), never above the treasure's 1 - 0.01.
    Improvement (Go-Explore seeds): the share of non-treasure cells whose trajectory has
    the fewest right moves (= its column) is 0.61-0.85 per seed (measured, 12 seeds); with
    a "never replace an entry" bug (accept only new cells) it is 0.27-0.42 and fails the
    asserts. It cannot tell which restored state a phase explored from."""
    a = tiny_run.state.archive
    filled, term = np.asarray(a.filled), np.asarray(a.terminal)
    rows, cols = np.asarray(a.env_state.row), np.asarray(a.env_state.column)
    keys, length, score = np.asarray(a.keys), np.asarray(a.length), np.asarray(a.score)
    live = filled & ~term
    np.testing.assert_array_equal(rows[live], keys[..., 0][live])
    np.testing.assert_array_equal(cols[live], keys[..., 1][live])
    np.testing.assert_array_equal(length[filled], keys[..., 0][filled])
    assert (score[filled] <= 1 - 0.01 + 1e-6).all()
    nonpos = filled & (score <= 0)
    assert (-score[nonpos] * 12 / 0.01 >= keys[..., 1][nonpos] - 1e-3).all()
    assert term[filled].sum() > 0 and (keys[..., 0][filled & term] == 12).all()
    excess = np.where(nonpos, np.rint(-score * 12 / 0.01) - keys[..., 1], 0)[:SEEDS]
    optimal = ((excess == 0) & nonpos[:SEEDS]).sum(1) / nonpos[:SEEDS].sum(1)
    print("share of cells with the fewest right moves", optimal.round(2))
    assert optimal.min() > 0.5 and optimal.mean() > 0.6, optimal


def test_train_is_pure_and_cli_writes_its_files(tiny_run, tmp_path, capsys):
    """Same keys: bit-identical archives (the compilation cache serves the program); seeds
    differ; the run wrote its files; `--help` documents every field; bad values fail with
    the field named."""
    with pytest.raises(SystemExit):
        ge.main(["--help"])
    out = capsys.readouterr().out
    for f in dataclasses.fields(ge.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Presets (--preset): quick, paper" in out
    assert (tiny_run.run_dir / "metrics.jsonl").exists()
    h = tiny_run.history["charts/archive_cells"]
    assert h.shape == (2 * SEEDS, 16) and (np.diff(h, axis=1) >= 0).all()
    assert not np.array_equal(tiny_run.state.archive.keys[0], tiny_run.state.archive.keys[1])
    again = _run(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, tiny_run.state.archive, again.state.archive)
    with pytest.raises(ValueError, match="selection='best' must be"):
        ge.main(["--selection", "best", "--run-dir", str(tmp_path)])
    with pytest.raises(ValueError, match=r"--repeat-action-prob must be in \[0, 1\]"):
        ge.main(["--repeat-action-prob", "1.5", "--run-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="seen_power=-1.0 must be >= 0"):
        ge.main(["--seen-power", "-1", "--run-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="return_to_cell=True needs state restore"):
        ge.main(["--env-id", "MontezumaRevenge-v5", "--run-dir", str(tmp_path)])


def test_every_config_field_is_read():
    """No flag that lies: each Config field is read by code that runs (AST, not text)."""
    assert unread_fields(ge) == []


def test_paper_preset_traces():
    """jax.eval_shape of init and one update under the `paper` preset (Montezuma's Revenge
    through envpool, archive-only without return, 11 x 8 cells with 8 levels, archive of
    50,000 cells), with 8 explorers instead of 100 (building 100 ALE emulators is slow on
    a 2-core CPU)."""
    cfg, state, (after, metrics) = trace_paper(ge, num_explorers=8)
    assert cfg.env_id == "MontezumaRevenge-v5" and not cfg.return_to_cell
    assert state.archive.keys.shape == (50_000, 88) and state.archive.env_state is None
    assert state.seen.shape == (8, 50_000) and state.env_state.visited.shape == (256,)
    assert jax.tree.structure(after) == jax.tree.structure(state)
    assert all(m.shape == () for m in jax.tree.leaves(metrics))
