"""`mmtune plot`: loss, learning-rate and tokens-per-second curves from a training run's metrics.jsonl,
and for MoE models the expert load balance.

metrics.jsonl holds one JSON object per logged step with at least `step`, `loss`, `lr`, `grad_norm`
and `tokens_per_s` (docs/INTERNALS.md); MoE runs add `moe_load_max_mean` (the busiest expert's tokens over
the mean, in the worst MoE layer: 1 = balanced) and `moe_load_max_mean_per_layer`. The picture has one
panel per quantity that the file holds; the load panel draws every layer thinly and the worst one bold.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

PANELS = [("loss", "loss", True), ("lr", "learning rate", False), ("tokens_per_s", "tokens / s", False),
          ("moe_load_max_mean", "expert load max/mean", False)]


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl, in file order. Raises FileNotFoundError / ValueError naming the line."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics file (pass <save>/metrics.jsonl or the --save dir of a run)")
    records = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not a JSON object ({e})") from e
        if not isinstance(rec, dict) or "step" not in rec:
            raise ValueError(f"{path}:{lineno}: a metrics record needs a 'step' key, got {line[:80]!r}")
        records.append(rec)
    if not records:
        raise ValueError(f"{path}: no records (has the run logged a step yet? see --log-interval)")
    return records


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def panels(records: list[dict]) -> list[str]:
    """The PANELS keys that some record holds, in panel order."""
    return [k for k, _, _ in PANELS if _series(records, k)[0]]


def _layer_series(records: list[dict]) -> list[tuple[list[float], list[float]]]:
    """Per MoE layer: (steps, max/mean load ratios) from `moe_load_max_mean_per_layer`."""
    rows = [(r["step"], r["moe_load_max_mean_per_layer"]) for r in records
            if isinstance(r.get("moe_load_max_mean_per_layer"), list)]
    n = max((len(v) for _, v in rows), default=0)
    return [([s for s, v in rows if i < len(v)], [float(v[i]) for _, v in rows if i < len(v)]) for i in range(n)]


def _smooth(ys: list[float], window: int) -> list[float]:
    """Trailing moving average (window 1 = unchanged)."""
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_metrics(metrics: str | Path, out: str | Path | None = None, title: str | None = None,
                 smooth: int = 0) -> Path:
    """Write a PNG with one panel per quantity present (loss, lr, tokens/s); returns its path.

    `out` defaults to `loss.png` next to the metrics file. `smooth` > 1 overlays a moving average of the
    loss over that many logged steps.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics)
    metrics = Path(metrics)
    src = metrics / "metrics.jsonl" if metrics.is_dir() else metrics
    out = Path(out) if out is not None else src.with_name("loss.png")
    present = panels(records)
    shown = [(k, label, logy) for k, label, logy in PANELS if k in present]
    if not shown:
        raise ValueError(f"{src}: none of {[k for k, _, _ in PANELS]} appear in any record")
    fig, axes = plt.subplots(len(shown), 1, figsize=(7, 2.4 * len(shown)), sharex=True, squeeze=False)
    for ax, (key, label, logy) in zip(axes[:, 0], shown):
        xs, ys = _series(records, key)
        if key == "moe_load_max_mean":
            for lx, ly in _layer_series(records):
                ax.plot(lx, ly, lw=0.5, alpha=0.4, color="gray")
            ax.axhline(1.0, lw=0.5, ls=":", color="black")  # perfect balance
        ax.plot(xs, ys, lw=1, alpha=0.5 if (key == "loss" and smooth > 1) else 1.0, label=label)
        if key == "loss" and smooth > 1:
            ax.plot(xs, _smooth(ys, smooth), lw=1.5, label=f"mean of {smooth}")
            ax.legend(loc="upper right", fontsize=8)
        if logy and min(ys) > 0:
            ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(title or str(src))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mmtune plot",
        description="Plot loss, learning rate, tokens/s and (MoE models) the expert load max/mean of a training "
                    "run from its metrics.jsonl.",
    )
    p.add_argument("metrics", help="<save>/metrics.jsonl written by `mmtune train` (or the save dir itself)")
    p.add_argument("--out", default=None, help="PNG to write (default: loss.png next to the metrics file)")
    p.add_argument("--title", default=None, help="figure title (default: the metrics file's path)")
    p.add_argument("--smooth", type=int, default=0,
                   help="overlay a moving average of the loss over this many logged steps (0: off)")
    args = p.parse_args(argv)
    out = plot_metrics(args.metrics, args.out, title=args.title, smooth=args.smooth)
    print(out)
    return 0
