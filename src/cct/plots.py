"""Figures: training curves (the Keras example's loss/accuracy plot) and the confusion matrix.

Drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend switch) and
written atomically, like every other output.
"""
from __future__ import annotations

from pathlib import Path

from .checkpoint import atomic_write
from .errors import CCTError


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols)


def _format(path: str | Path) -> str:
    """The image format a figure path's suffix names (PNG without one)."""
    return Path(path).suffix.lstrip(".").lower() or "png"


def check_figure_path(path: str | Path, flag: str) -> None:
    """Refuse, before any work, a figure path whose suffix names a format matplotlib does not write."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    fmt = _format(path)
    formats = FigureCanvasAgg.get_supported_filetypes()
    if fmt not in formats:
        raise CCTError(f"{flag} {path}: matplotlib writes no .{fmt} files (it writes {', '.join(sorted(formats))})")


def save_figure(fig, path: str | Path, *, dpi: int = 120) -> Path:
    """Write a figure atomically, in the format its suffix names (PNG without one). Every text is drawn as written:
    class names, file names and texts are data, and a `$` in them ("over_$10") would start matplotlib's maths."""
    from matplotlib.text import Text
    for text in fig.findobj(Text):
        text.set_parse_math(False)
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format=_format(path), dpi=dpi))
    return path


def plot_curves(history: list[dict], path: str | Path, title: str | None = None) -> None:
    """Loss and top-1 accuracy per epoch, training against validation (rows as in history.csv)."""
    fig, (ax_loss, ax_acc) = _figure(10, 4, ncols=2)
    epochs = [r["epoch"] for r in history]
    for ax, key, label in ((ax_loss, "loss", "loss"), (ax_acc, "top1", "top-1 accuracy")):
        ax.plot(epochs, [r[f"train_{key}"] for r in history], marker=".", label="train")
        val = [(r["epoch"], r[f"val_{key}"]) for r in history if r.get(f"val_{key}") is not None]
        if val:
            ax.plot(*zip(*val), marker=".", label="validation")
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)  # whole epochs, also in a run of 3
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    save_figure(fig, path)


def plot_confusion(confusion: list[list[int]], classes: list[str], path: str | Path, title: str | None = None) -> None:
    """The confusion matrix (rows: true class, columns: predicted), each row normalised to fractions; cells of up
    to 30 classes also give the count."""
    import numpy as np
    counts = np.asarray(confusion, dtype=float)
    rows = counts.sum(1, keepdims=True)
    fractions = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    k = len(classes)
    label_inches = 0.07 * max(len(c) for c in classes)  # room for the longest class name, on both axes
    size = min(4 + 0.45 * k + label_inches, 28)
    fig, ax = _figure(size, size * 0.85)
    image = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).set_label("fraction of the true class")
    ax.set_xticks(range(k), classes, rotation=90 if k > 10 else 45, ha="right" if k <= 10 else "center")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if counts[i, j]:  # the count, as --json's confusion has it, under the row's fraction
                    ax.text(j, i, f"{fractions[i, j]:.2f}\n{int(counts[i, j])}", ha="center", va="center",
                            fontsize=6, color="white" if fractions[i, j] > 0.5 else "black")
    ax.set_title(title or "confusion matrix\n(each row normalised; cells: fraction, count)")
    save_figure(fig, path)
