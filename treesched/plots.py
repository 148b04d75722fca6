"""PNG plots of a run: the training curve (with validation, where the run
has held-out data) and accuracy against test length.

Matplotlib's object API on the Agg canvas (no pyplot, no global backend
switch, safe without a display); files are written atomically.
"""

from __future__ import annotations

import io

import numpy as np

from .fileio import write_bytes


def _figure(width=7.0, height=4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_bytes(path, buffer.getvalue())


def smooth(values, window: int) -> np.ndarray:
    """Trailing moving average (shorter windows at the start)."""
    values = np.asarray(values, dtype=np.float64)
    if window <= 1 or values.size == 0:
        return values
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    index = np.arange(1, values.size + 1)
    start = np.maximum(0, index - window)
    return (cumulative[index] - cumulative[start]) / (index - start)


def plot_training_curve(records, path, title: str = "") -> None:
    """Loss (log scale) and accuracy against step from train_log.jsonl records;
    held-out losses (records with ``valid_loss``) join the loss panel."""
    steps = np.array([r["step"] for r in records], dtype=np.int64)
    loss = np.array([r["loss"] for r in records], dtype=np.float64)
    accuracy = np.array([r["accuracy"] for r in records], dtype=np.float64)
    window = max(1, len(records) // 50)
    figure = _figure(8.0, 4.0)
    axes_loss, axes_acc = figure.subplots(1, 2)
    if window > 1:
        axes_loss.plot(steps, loss, color="0.8", linewidth=0.6, label="logged steps")
        axes_loss.plot(steps, smooth(loss, window), color="C0",
                       label=f"moving mean of {window} logged steps")
    else:   # too few points to smooth: the logged values themselves
        axes_loss.plot(steps, loss, color="C0", label="logged steps")
    held_out = [(r["step"], r["valid_loss"]) for r in records if "valid_loss" in r]
    if held_out:
        valid_steps, valid_loss = np.array(held_out, dtype=np.float64).T
        axes_loss.plot(valid_steps, valid_loss, color="C3", marker="o", markersize=3,
                       label="validation")
    if len(loss) and np.all(loss > 0):
        axes_loss.set_yscale("log")
    axes_loss.set_xlabel("step")
    axes_loss.set_ylabel("loss (cross-entropy, nats)")
    axes_loss.legend(fontsize=8)
    axes_loss.grid(alpha=0.3)
    axes_acc.plot(steps, 100 * accuracy, color="0.8", linewidth=0.6)
    axes_acc.plot(steps, 100 * smooth(accuracy, window), color="C1")
    axes_acc.set_ylim(0, 101)
    axes_acc.set_xlabel("step")
    axes_acc.set_ylabel("training accuracy (%)")
    axes_acc.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    _save(figure, path)


def plot_accuracy_vs_length(lengths, accuracies, path, title: str = "",
                            train_max: int | None = None, score: float | None = None) -> None:
    """Per-length test accuracy, with the training range shaded."""
    lengths = np.asarray(lengths)
    accuracies = 100 * np.asarray(accuracies, dtype=np.float64)
    figure = _figure(7.0, 4.0)
    axes = figure.subplots()
    marker = "o" if len(lengths) <= 60 else None
    axes.plot(lengths, accuracies, marker=marker, markersize=3, color="C0",
              label="accuracy" if score is None else f"accuracy (mean {100 * score:.1f}%)")
    if train_max is not None:
        axes.axvspan(0, train_max, color="0.9", label=f"training lengths 1..{train_max}")
    axes.set_xlim(left=0, right=max(int(lengths.max()) if len(lengths) else 1, 1) * 1.02)
    axes.set_ylim(0, 101)
    axes.set_xlabel("test length")
    axes.set_ylabel("accuracy (%)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower left")
    if title:
        axes.set_title(title)
    figure.tight_layout()
    _save(figure, path)


def plot_accuracy_panels(panels, path, title: str = "", columns: int = 3) -> None:
    """A grid of accuracy-against-length panels, one per entry of ``panels``.

    Each panel is a dict: ``title``; ``curves``, a list of dicts with
    ``lengths``, ``accuracies`` (fractions), ``colour`` (an index into the
    colour cycle), ``bold`` (drawn thicker, e.g. a mean over seeds) and
    ``label`` (None: not in the legend); ``train_max``, the longest training
    length (shaded), or None; ``paper``, a published score in percent (a
    dashed line), or None.  A panel without curves says "not run"."""
    rows = max(1, -(-len(panels) // columns))
    figure = _figure(4.2 * columns, 2.9 * rows)
    grid = figure.subplots(rows, columns, squeeze=False)
    for index, axes in enumerate(grid.flat):
        if index >= len(panels):
            axes.set_visible(False)
            continue
        panel = panels[index]
        axes.set_title(panel["title"], fontsize=9)
        axes.set_ylim(0, 101)
        axes.grid(alpha=0.3)
        axes.tick_params(labelsize=7)
        if not panel["curves"]:
            axes.text(0.5, 0.5, "not run", ha="center", va="center", transform=axes.transAxes,
                      color="0.5")
            continue
        if panel.get("train_max"):
            axes.axvspan(0, panel["train_max"], color="0.92")
        if panel.get("paper") is not None:
            axes.axhline(panel["paper"], color="0.4", linestyle="--", linewidth=0.8,
                         label=f"paper {panel['paper']:g}%")
        right = 1
        for curve in panel["curves"]:
            lengths = np.asarray(curve["lengths"])
            right = max(right, int(lengths.max()))
            axes.plot(lengths, 100 * np.asarray(curve["accuracies"], dtype=np.float64),
                      color=f"C{curve['colour'] % 10}",
                      linewidth=1.8 if curve["bold"] else 0.7,
                      alpha=1.0 if curve["bold"] or curve["label"] else 0.5,
                      label=curve["label"])
        axes.set_xlim(0, right * 1.02)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=6, loc="lower left")
    for axes in grid[-1]:
        axes.set_xlabel("test length", fontsize=8)
    for axes in grid[:, 0]:
        axes.set_ylabel("accuracy (%)", fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    _save(figure, path)
