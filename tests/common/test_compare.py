"""Tests of common/compare.py: flag order, cells (median, "never" columns), the table, the
plot, and a whole comparison of the toy file at two learning rates."""

import types

import numpy as np
import pytest

from common import compare
from common.compare import Column, Method
from common.run import RunResult

TOY = "tests.common.toy_algo"
PACKAGE = types.SimpleNamespace(
    __doc__="Toy comparison.",
    SETTINGS={"short": ("--total-steps", "6"), "long": ("--total-steps", "12")},
    METHODS={"adam": Method(TOY), "tiny_lr": Method(TOY, ("--lr", "1e-4"),
                                                      {"long": ("--noise", "0.0")})},
    COLUMNS=(Column("final_loss", "loss", ".2f"), Column("charts/w0", "w0", ".2f")),
    CURVE="losses/loss")


def test_flags_come_method_then_setting_then_override():
    argv = compare.argv_of(PACKAGE.METHODS["tiny_lr"], "long", PACKAGE.SETTINGS["long"], 2, 5,
                           "/tmp/x")
    assert argv[:6] == ["--lr", "1e-4", "--total-steps", "12", "--noise", "0.0"]
    assert argv[6:] == ["--num-seeds", "2", "--seed", "5", "--run-dir", "/tmp/x",
                        "--no-progress"]


def test_cells_take_the_median_and_count_the_seeds_that_got_there():
    col, never = Column("k", "k", ".1f"), Column("k", "k", ".0f", never=-1)
    assert compare.cell(np.array([1.0, 9.0, 2.0]), col) == "2.0"
    assert compare.cell(np.array([1.0, np.nan]), col) == "1.0 (1/2)"
    assert compare.cell(np.array([-1.0, 30.0, 10.0]), never) == "20 (2/3)"
    assert compare.cell(np.array([-1.0, -1.0]), never) == "never"
    assert compare.cell(None, col) == "n/a"
    res = RunResult(None, {"k": np.array([[0.0, 4.0], [0.0, 6.0]])}, None, {"e": np.array([3])})
    np.testing.assert_array_equal(compare.values(res, "k"), [4.0, 6.0])  # last logged
    np.testing.assert_array_equal(compare.values(res, "e"), [3.0])  # evaluate() first
    assert compare.values(res, "missing") is None


def test_a_comparison_runs_every_cell_and_writes_table_and_plot(tmp_path, capsys):
    """The toy at Adam lr 0.05 against lr 1e-4: the table has a row per method and a column
    per (setting, key); the better learning rate has the lower loss in both settings."""
    out, png = tmp_path / "cmp.md", tmp_path / "cmp.png"
    results = compare_main(["toy", "--num-seeds", "2", "--out", str(out), "--plot", str(png)])
    assert set(results) == {"adam", "tiny_lr"} and set(results["adam"]) == {"short", "long"}
    assert results["adam"]["long"].history["losses/loss"].shape == (2, 12)
    for s in ("short", "long"):
        good, bad = (np.median(results[m][s].final["final_loss"]) for m in ("adam", "tiny_lr"))
        assert good < bad, (s, good, bad)
    text = out.read_text()
    assert text.startswith("Toy comparison.")
    assert "| method | short: loss | short: w0 | long: loss | long: w0 |" in text
    assert text.count("\n| adam |") == 1 and "| tiny_lr |" in text
    assert png.stat().st_size > 1000
    with pytest.raises(ValueError, match="unknown method 'sgd'; known: adam, tiny_lr"):
        compare_main(["toy", "--only", "sgd"])
    with pytest.raises(ValueError, match="unknown setting"):
        compare_main(["toy", "--settings", "medium"])


def compare_main(argv):
    return compare.main(argv, package=PACKAGE)


def test_methods_with_their_own_columns_get_a_row_per_measure(tmp_path):
    """Experiments that report different measures: one row per (method, Column), one
    column per setting; a method without columns of its own falls back to COLUMNS; the
    plot is one bar panel per row when the package has no CURVE."""
    package = types.SimpleNamespace(
        __doc__="Per-method measures.", SETTINGS=PACKAGE.SETTINGS,
        METHODS={"adam": Method(TOY, columns=(Column("final_loss", "loss", ".2f"),
                                              Column("charts/w0", "w0", ".2f"))),
                 "tiny_lr": Method(TOY, ("--lr", "1e-4"))},
        COLUMNS=(Column("final_loss", "loss (default)", ".2f"),))
    out, png = tmp_path / "cmp.md", tmp_path / "bars.png"
    results = compare.main(["toy", "--num-seeds", "2", "--out", str(out), "--plot", str(png)],
                           package=package)
    text = out.read_text()
    assert "| method | measure | short | long |" in text
    loss = np.median(results["adam"]["long"].final["final_loss"])
    assert "| adam | loss | " in text and f"| {loss:.2f} |" in text
    assert "| adam | w0 |" in text and "| tiny_lr | loss (default) |" in text
    assert text.count("\n| ") == 4 and png.stat().st_size > 1000
