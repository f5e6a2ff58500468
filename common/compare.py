"""A package's comparison: its methods on shared settings, the same budget and seeds.

    python -m common.compare exploration --num-seeds 3 --plot exploration/comparison.png

The package's `compare.py` declares what to run:

    SETTINGS: dict[str, tuple[str, ...]]  setting name -> flags every method gets there
                                          (environment, budget)
    METHODS: dict[str, Method]            row label -> the file and its own flags
    COLUMNS: tuple[Column, ...]           what each (method, setting) cell reports
    CURVE: str                            a logged metric plotted against the budget
    (and a module docstring: the table's caption)

Methods that each report their own measures (experiments rather than competing methods)
give them as `Method(..., columns=(Column, ...))`: the table then has one row per (method,
measure) and one column per setting, COLUMNS (default none) serves the methods without
their own, and without a CURVE the plot is one bar panel per row, a bar per setting.

Each (method, setting) runs in this process through the file's own `main(argv)`, the code
path of its command line, with `--num-seeds`, `--seed`, a temporary run directory and no
progress bar; flags come in the order method, setting, method-at-setting, so the later
override the earlier. A cell is the median over seeds of `evaluate()`'s value (or the last
logged value) of its key; a column with a `never` value (e.g. -1 for "not yet") takes the
median over the seeds that got there and says how many did. `--only` and `--settings`
pick rows and settings; the Markdown table goes to stdout and `--out`.
"""

import argparse
import importlib
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Method:
    module: str
    """the algorithm file as a module path, e.g. "exploration.rnd" """
    args: tuple[str, ...] = ()
    """its flags at every setting (a preset, a switched-off bonus, ...)"""
    per_setting: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """extra flags at one setting (e.g. a size the setting names differently)"""
    columns: tuple = ()
    """this method's own measures (Columns; empty: the package's COLUMNS)"""


@dataclass(frozen=True)
class Column:
    key: str | Callable
    """an `evaluate()` key or a logged metric (its last value), or a function of the
    RunResult giving per-seed values (e.g. read from the final state)"""
    header: str
    fmt: str = ".0f"
    never: float | None = None
    """the value that means "did not happen" (left out of the median, counted)"""


def argv_of(method: Method, setting: str, setting_args, num_seeds: int, seed: int,
            run_dir: str) -> list[str]:
    """The file's command line for one cell (method flags, setting flags, overrides)."""
    return [*method.args, *setting_args, *method.per_setting.get(setting, ()),
            "--num-seeds", str(num_seeds), "--seed", str(seed), "--run-dir", run_dir,
            "--no-progress"]


def values(result, key: str) -> np.ndarray | None:
    """Per-seed values of `key`: evaluate()'s output, else the last logged value (or the
    function's values)."""
    if callable(key):
        return np.asarray(key(result), np.float64).reshape(-1)
    if key in result.final:
        return np.asarray(result.final[key], np.float64).reshape(-1)
    if key in result.history:
        return np.asarray(result.history[key], np.float64)[:, -1]
    return None


def cell(v: np.ndarray | None, col: Column) -> str:
    """The median over seeds (of those that got there, when the column has `never`)."""
    if v is None:
        return "n/a"
    ok = np.isfinite(v) & (v != col.never if col.never is not None else True)
    if not ok.any():
        return "never" if col.never is not None else "n/a"
    text = format(float(np.median(v[ok])), col.fmt)
    return text if ok.all() else f"{text} ({ok.sum()}/{v.size})"


def rows(results: dict, methods: dict, columns) -> list[tuple[str, Column]]:
    """(method label, Column) of every row of the per-method layout, in method order."""
    return [(label, c) for label in results for c in (methods[label].columns or columns)]


def table(results: dict, settings: list[str], columns, methods: dict | None = None) -> str:
    """Markdown: one row per method, one column per (setting, Column); or, when a method
    has its own columns, one row per (method, Column), one column per setting."""
    if methods and any(m.columns for m in methods.values()):
        lines = ["| method | measure | " + " | ".join(settings) + " |",
                 "|" + "---|" * (len(settings) + 2)]
        for label, c in rows(results, methods, columns):
            by_setting = results[label]
            row = [label, c.header] + [
                cell(values(by_setting[s], c.key) if s in by_setting else None, c)
                for s in settings]
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines)
    head = ["method"] + [f"{s}: {c.header}" for s in settings for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, by_setting in results.items():
        row = [label]
        for s in settings:
            res = by_setting.get(s)
            row += [cell(values(res, c.key) if res is not None else None, c) for c in columns]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(results: dict, settings: list[str], curve: str, path: str) -> None:
    """One panel per setting: `curve` (mean over seeds) against the share of the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.plot import save_png

    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.4),
                             squeeze=False)
    for ax, s in zip(axes[0], settings, strict=True):
        for label, by_setting in results.items():
            res = by_setting.get(s)
            if res is None or curve not in res.history:
                continue
            y = np.nanmean(np.asarray(res.history[curve], np.float64), axis=0)
            ax.plot(np.arange(1, y.size + 1) / y.size, y, label=label)
        ax.set_title(s)
        ax.set_xlabel("share of the budget")
    axes[0, 0].set_ylabel(curve)
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)


def plot_bars(results: dict, settings: list[str], methods: dict, columns, path: str,
              ncols: int = 4) -> None:
    """One panel per (method, Column) row: a bar per setting (the median over seeds, as in
    the table; seeds as dots, `never` and NaN values left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.plot import save_png

    panels = rows(results, methods, columns)
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.9 * nrows), squeeze=False)
    x = np.arange(len(settings))
    for ax, (label, c) in zip(axes.ravel(), panels, strict=False):
        for i, s in enumerate(settings):
            res = results[label].get(s)
            v = values(res, c.key) if res is not None else None
            if v is None:
                continue
            ok = np.isfinite(v) & (v != c.never if c.never is not None else True)
            if ok.any():
                ax.bar(i, np.median(v[ok]), 0.6, color=f"C{i}", alpha=0.8)
                ax.plot(np.full(ok.sum(), i), v[ok], "k.", ms=4)
        ax.set_xticks(x, settings, fontsize=8)
        ax.set_title(f"{label}:\n{c.header}", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    save_png(fig, path)


def compare(package, num_seeds: int = 3, seed: int = 0, only=None, settings=None,
            log=print) -> tuple[dict, list[str]]:
    """Run the cells; returns ({label: {setting: RunResult}}, the settings run)."""
    names = list(package.SETTINGS) if not settings else list(settings)
    labels = list(package.METHODS) if not only else list(only)
    for bad in [s for s in names if s not in package.SETTINGS]:
        raise ValueError(f"unknown setting {bad!r}; known: {', '.join(package.SETTINGS)}")
    for bad in [m for m in package.METHODS if "," in m]:
        raise ValueError(f"method label {bad!r} has a comma (--only splits on commas)")
    for bad in [m for m in labels if m not in package.METHODS]:
        raise ValueError(f"unknown method {bad!r}; known: {', '.join(package.METHODS)}")
    results: dict = {label: {} for label in labels}
    total, done = len(labels) * len(names), 0
    for s in names:
        for label in labels:
            method = package.METHODS[label]
            main = importlib.import_module(method.module).main
            t0 = time.time()
            with tempfile.TemporaryDirectory() as d:
                results[label][s] = main(argv_of(method, s, package.SETTINGS[s], num_seeds,
                                                 seed, d))
            done += 1
            log(f"[{done}/{total}] {label} on {s}: {time.time() - t0:.0f} s", file=sys.stderr)
    return results, names


def main(argv=None, package=None):
    """The command line; `package` (a module-like object) stands in for `<package>.compare`."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("package", help="a package with a compare.py, e.g. exploration")
    p.add_argument("--num-seeds", type=int, default=3, help="seeds per cell (vmapped)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--only", default="", help="comma-separated method labels (default all)")
    p.add_argument("--settings", default="", help="comma-separated settings (default all)")
    p.add_argument("--out", default=None, help="also write the Markdown table here")
    p.add_argument("--plot", default=None, help="write the curves of every setting (PNG)")
    args = p.parse_args(argv)
    package = package or importlib.import_module(f"{args.package}.compare")
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    t0 = time.time()
    results, names = compare(package, args.num_seeds, args.seed, split(args.only),
                             split(args.settings))
    columns = getattr(package, "COLUMNS", ())
    body = table(results, names, columns, package.METHODS)
    text = (f"{(package.__doc__ or '').strip()}\n\n{body}\n\n"
            f"{args.num_seeds} seeds per cell (median); `python -m common.compare "
            f"{' '.join(argv if argv is not None else sys.argv[1:])}`, "
            f"{(time.time() - t0) / 60:.1f} min.\n")
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if args.plot and getattr(package, "CURVE", None):
        plot(results, names, package.CURVE, args.plot)
    elif args.plot:
        plot_bars(results, names, package.METHODS, columns, args.plot)
    return results


if __name__ == "__main__":
    main()
