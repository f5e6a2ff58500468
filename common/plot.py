"""Learning curves from run logs: `python -m common.plot RUN_DIR [RUN_DIR ...] --metric M`.

Each run's `metrics.jsonl` holds one line per update with the seed mean and the per-seed
values (`<metric>/seeds`). The plot shows the mean over seeds and a band of +- one standard
deviation, against env steps where the run logs them, one curve per run directory.
"""

import argparse
import json
from pathlib import Path

import numpy as np


def save_png(fig, out) -> str:
    """Write a matplotlib figure to the PNG `out` at 100 dpi with a 64-colour palette (a few
    tens of kB, light enough to commit) and close it; returns `out`."""
    import matplotlib.pyplot as plt
    from PIL import Image

    fig.savefig(out, dpi=100)
    plt.close(fig)
    Image.open(out).convert("RGB").quantize(64).save(out, optimize=True)
    return str(out)


def load(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run folder?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curve(rows: list[dict], metric: str):
    """(x, per-seed values [updates, seeds]) of `metric`; x is env steps or updates."""
    names = sorted({k for r in rows for k in r if not k.endswith("/seeds")})
    rows = [r for r in rows if metric + "/seeds" in r]
    if not rows:
        raise KeyError(f"metric {metric!r} not logged; available: {names}")
    x_key = "env_steps" if "env_steps" in rows[0] else "update"
    x = np.array([r[x_key] for r in rows], dtype=float)
    y = np.array([[np.nan if v is None else v for v in r[metric + "/seeds"]] for r in rows])
    return x, y, x_key


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing nan-aware moving average over the first axis."""
    if window <= 1:
        return y
    out = np.empty_like(y)
    for i in range(len(y)):
        seg = y[max(0, i - window + 1): i + 1]
        with np.errstate(all="ignore"):
            out[i] = np.nanmean(seg, axis=0) if np.isfinite(seg).any() else np.nan
    return out


def plot(run_dirs: list[str], metric: str, out: str, window: int = 1, labels=None,
         xlabel: str | None = None, ylabel: str | None = None) -> str:
    """One curve per run folder: the mean over seeds of `metric` (moving mean over `window`
    updates) and a band of +- one standard deviation. `labels`: one legend name per run,
    or a function of the run's config.json record (its "config" holds the run's Config);
    the folder name by default. Writes the PNG `out` (save_png) and returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, d in enumerate(run_dirs):
        x, y, x_key = curve(load(d), metric)
        y = smooth(y, window)
        with np.errstate(all="ignore"):
            m, s = np.nanmean(y, 1), np.nanstd(y, 1)
        if callable(labels):
            label = labels(json.loads((Path(d) / "config.json").read_text()))
        else:
            label = labels[i] if labels else Path(d).name
        ax.plot(x, m, label=f"{label} ({y.shape[1]} seeds)")
        ax.fill_between(x, m - s, m + s, alpha=0.2)
    ax.set_xlabel(xlabel or x_key.replace("_", " "))
    ax.set_ylabel(ylabel or metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", help="run folders holding metrics.jsonl")
    p.add_argument("--metric", default="charts/episodic_return", help="metric to plot")
    p.add_argument("--out", default="curve.png", help="output PNG path")
    p.add_argument("--window", type=int, default=1, help="moving-average window (updates)")
    p.add_argument("--labels", nargs="*", help="legend labels, one per run folder")
    a = p.parse_args(argv)
    if a.labels and len(a.labels) != len(a.run_dirs):
        p.error(f"--labels has {len(a.labels)} names for {len(a.run_dirs)} run folders")
    print(plot(a.run_dirs, a.metric, a.out, a.window, a.labels))


if __name__ == "__main__":
    main()


def detections(images, dets, class_names, path, title: str, min_score: float = 0.3,
               colour: str = "yellow"):
    """Save a row of images with their predicted boxes, class names and scores.
    dets: (boxes (N, D, 4) xyxy pixels, scores, classes, valid) as numpy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    b, s, c, v = dets
    n = len(images)
    fig, axes = plt.subplots(1, n, figsize=(1.6 * n, 1.9))
    for i, ax in enumerate(np.atleast_1d(axes)):
        ax.imshow(images[i])
        for box, score, cls in zip(b[i][v[i]], s[i][v[i]], c[i][v[i]], strict=True):
            if score < min_score:
                continue
            x1, y1, x2, y2 = box
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1,
                                       color=colour))
            ax.text(x1, y1, f"{class_names[cls][:4]} {score:.2f}", fontsize=5,
                    color="black", backgroundcolor=colour, va="bottom")
        ax.axis("off")
    fig.suptitle(f"{title} (score >= {min_score})", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    Image.open(path).convert("RGB").quantize(96).save(path, optimize=True)  # a few tens of kB
