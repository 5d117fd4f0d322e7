"""PNG figures to look at: visual-token code maps, dVAE reconstructions, codebook usage, loss curves,
images with texts under them (generated captions, retrieved captions).

Every function draws on a matplotlib ``Figure`` with the non-interactive Agg canvas (no pyplot, no
display, safe in a training process) and writes its PNG atomically: a temporary file in the target
folder, then ``os.replace`` (``beit3.io.atomic_path``), so a reader never sees half a picture.

Images are float tensors (B, 3, H, W) in [0, 1]; codes are LongTensors (B, patches) in raster order.
"""

from __future__ import annotations

import colorsys
import math
import os
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .io import atomic_path

_GOLDEN = (math.sqrt(5) - 1) / 2
_PANEL_INCHES = 2.4
_DPI = 100
_LABEL_MAX_CELLS = 64  # write the code id into each cell only when it stays legible


def code_palette(codebook_size: int) -> np.ndarray:
    """(codebook_size, 3) RGB in [0, 1]: a fixed color per code id, the same in every run and every figure.

    Hues step by the golden ratio, so neighbouring ids get far-apart hues; saturation and value take
    two more low-discrepancy steps, so ids of similar hue still differ in shade.
    """
    ids = np.arange(codebook_size, dtype=np.float64)
    hue = (ids * _GOLDEN) % 1.0
    saturation = 0.45 + 0.55 * ((ids * 0.7548776662 + 0.3) % 1.0)
    value = 0.55 + 0.45 * ((ids * 0.5698402910 + 0.6) % 1.0)
    return np.array(
        [colorsys.hsv_to_rgb(h, s, v) for h, s, v in zip(hue, saturation, value)], dtype=np.float32
    ).reshape(-1, 3)


def save_code_maps(
    images: torch.Tensor,
    codes: torch.Tensor,
    grid: int | tuple[int, int],
    path: str | os.PathLike,
    codebook_size: int,
    max_images: int = 8,
) -> Path:
    """Each image (left) beside its code map (right): one colored cell per patch, colors from ``code_palette``.

    Args:
        images: (B, 3, H, W) in [0, 1], the pixels the codes were computed from.
        codes: (B, h * w) code ids in [0, codebook_size), raster order.
        grid: the code grid (h, w), or one int for a square grid.
        path: the PNG to write; its folder is created.
        codebook_size: K, to check the ids and to title the figure.
        max_images: draw at most this many rows.
    Returns:
        ``path`` as a Path.
    """
    rows = _check_images(images, "images")
    height_cells, width_cells = (grid, grid) if isinstance(grid, int) else tuple(grid)
    codes = torch.as_tensor(codes).detach().cpu()
    if codes.dim() != 2 or codes.shape[0] != images.shape[0] or codes.shape[1] != height_cells * width_cells:
        raise ValueError(
            f"codes must be (B, h*w) = ({images.shape[0]}, {height_cells * width_cells}) for {images.shape[0]} images "
            f"and a {height_cells}x{width_cells} grid; got {tuple(codes.shape)}. Pass the grid the tokenizer used "
            "(image side / tokenizer.patch_size)."
        )
    if codes.numel() and (codes.min() < 0 or codes.max() >= codebook_size):
        raise ValueError(
            f"Code ids range over [{codes.min().item()}, {codes.max().item()}], outside [0, {codebook_size}); "
            "is codebook_size that of the tokenizer that made them?"
        )
    rows = min(rows, max_images)
    palette = code_palette(codebook_size)
    figure = Figure(figsize=(2 * _PANEL_INCHES, rows * _PANEL_INCHES * 1.1), dpi=_DPI, layout="constrained")
    axes = figure.subplots(rows, 2, squeeze=False)
    for row in range(rows):
        ids = codes[row].reshape(height_cells, width_cells).numpy()
        image_axes, code_axes = axes[row]
        # one pixel frame for both panels: cell (i, j) sits exactly where its patch sits in the image
        extent = (0, images.shape[-1], images.shape[-2], 0)
        image_axes.imshow(_to_hwc(images[row]), extent=extent)
        image_axes.set_title(f"image {row}", fontsize=9)
        code_axes.imshow(palette[ids], interpolation="nearest", extent=extent)
        code_axes.set_title(f"codes: {len(np.unique(ids))} distinct of {codebook_size}", fontsize=9)
        cell_h, cell_w = images.shape[-2] / height_cells, images.shape[-1] / width_cells
        for x in np.arange(1, width_cells) * cell_w:
            code_axes.axvline(x, color="white", linewidth=0.4)
        for y in np.arange(1, height_cells) * cell_h:
            code_axes.axhline(y, color="white", linewidth=0.4)
        if height_cells * width_cells <= _LABEL_MAX_CELLS:
            for (i, j), code in np.ndenumerate(ids):
                code_axes.text(
                    (j + 0.5) * cell_w,
                    (i + 0.5) * cell_h,
                    str(code),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="black" if palette[code].mean() > 0.55 else "white",
                )
        for ax in (image_axes, code_axes):
            ax.set_xticks([])
            ax.set_yticks([])
    return _save(figure, path)


def save_reconstructions(
    originals: torch.Tensor, reconstructions: torch.Tensor, path: str | os.PathLike, max_images: int = 8
) -> Path:
    """Originals in the top row, their reconstructions (e.g. ``DVAE.decode`` of its codes) below.

    Args:
        originals, reconstructions: (B, 3, H, W) in [0, 1] (reconstructions are clipped to it);
            the two may differ in H, W but not in B.
        path: the PNG to write.
        max_images: draw at most this many columns.
    """
    count = _check_images(originals, "originals")
    other = _check_images(reconstructions, "reconstructions")
    if other != count:
        raise ValueError(f"{count} originals but {other} reconstructions; pass one reconstruction per original.")
    count = min(count, max_images)
    figure = Figure(figsize=(count * _PANEL_INCHES * 0.8, 2 * _PANEL_INCHES * 0.85), dpi=_DPI, layout="constrained")
    axes = figure.subplots(2, count, squeeze=False)
    for column in range(count):
        for row, (batch, label) in enumerate(((originals, "original"), (reconstructions, "reconstruction"))):
            ax = axes[row][column]
            ax.imshow(_to_hwc(batch[column]))
            ax.set_xticks([])
            ax.set_yticks([])
            if column == 0:
                ax.set_ylabel(label, fontsize=9)
    return _save(figure, path)


def save_codebook_usage(
    steps: Sequence[float], usage: Sequence[float], path: str | os.PathLike, perplexity: Sequence[float] | None = None
) -> Path:
    """Codebook usage (fraction of the K codes used per batch) over training; perplexity beside it if given.

    Args:
        steps: training steps, one per point.
        usage: fractions in [0, 1], as ``usage_figures`` and the tokenizer outputs report them.
        perplexity: exp(entropy) of the code histogram, one per step, or None.
    """
    steps, usage = _numbers(steps, "steps"), _numbers(usage, "usage")
    series = [("codebook usage (fraction of codes used)", usage)]
    if perplexity is not None:
        series.append(("perplexity (exp entropy of code histogram)", _numbers(perplexity, "perplexity")))
    for name, values in series:
        if len(values) != len(steps):
            raise ValueError(
                f"{len(steps)} steps but {len(values)} values of {name.split(' (')[0]}; pass one value per step."
            )
    if not len(steps):
        raise ValueError("No points to plot: steps is empty.")
    figure = Figure(figsize=(4.5 * len(series), 3.2), dpi=_DPI, layout="constrained")
    axes = figure.subplots(1, len(series), squeeze=False)[0]
    for ax, (name, values) in zip(axes, series):
        ax.plot(steps, values, marker="." if len(steps) < 50 else None)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylim(0, 1.02)
    return _save(figure, path)


def save_loss_curves(
    records: Iterable[Mapping],
    path: str | os.PathLike,
    panels: Mapping[str, Sequence[str]] | Sequence[str] = ("loss",),
    title: str | None = None,
    smoothing: float | None = None,
) -> Path:
    """A run's curves over steps, one panel per group of metrics, from records such as the lines of ``metrics.jsonl``.

    Args:
        records: dicts with ``step`` (else the position is used) and the keys, e.g.
            ``{"step": 100, "loss": 2.3, "image_loss": 3.1, "lr": 1e-3}``. A step logged again (a resumed run
            repeats the steps after its last checkpoint) keeps its last record; non-finite values are left out.
        panels: {panel title: keys}, e.g. ``{"loss": ["loss", "image_loss"], "learning rate": ["lr"]}``, drawn one
            above the other with a shared step axis; a list of keys is one panel titled "loss". A key that no
            record has is left out (an image-only run has no ``text_loss``), and so is a panel left empty, but at
            least one key must be present.
        smoothing: the weight of an exponential moving average drawn over each curve (the raw values stay behind
            it, faint); None: 0.8 for curves of 30 points or more, none below. The learning rate is never smoothed.
        path: the PNG to write.
    """
    if not isinstance(panels, Mapping):
        panels = {"loss": list(panels)}
    by_step = {}
    for position, record in enumerate(records):
        by_step[record.get("step", position)] = record
    steps = sorted(by_step)
    drawn = {}
    for name, keys in panels.items():
        curves = {}
        for key in keys:
            points = [
                (step, float(by_step[step][key]))
                for step in steps
                if isinstance(by_step[step].get(key), (int, float)) and math.isfinite(by_step[step][key])
            ]
            if points:
                curves[key] = points
        if curves:
            drawn[name] = curves
    if not drawn:
        wanted = [key for keys in panels.values() for key in keys]
        present = sorted({k for r in by_step.values() for k in r})
        raise ValueError(
            f"None of the keys {wanted} has a finite value in the {len(steps)} records; their keys are {present}."
        )
    figure = Figure(figsize=(6.4, 1.2 + 2.2 * len(drawn)), dpi=_DPI, layout="constrained")
    axes = figure.subplots(len(drawn), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (name, curves) in zip(axes, drawn.items()):
        for key, points in curves.items():
            x, y = map(np.asarray, zip(*points))
            weight = (0.8 if len(points) >= 30 else 0.0) if smoothing is None else smoothing
            if key == "lr" or weight <= 0:
                ax.plot(x, y, label=key, marker="." if len(points) < 50 else None)
                continue
            raw = ax.plot(x, y, alpha=0.25, linewidth=0.8)[0]
            ax.plot(x, _moving_average(y, weight), color=raw.get_color(), label=key)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        if name == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    axes[-1].set_xlabel("step")
    if title:
        figure.suptitle(title, fontsize=10)
    return _save(figure, path)


def _moving_average(values: np.ndarray, weight: float) -> np.ndarray:
    """An exponential moving average, debiased at the start (as TensorBoard draws its smoothed curves)."""
    averaged, running = np.empty_like(values, dtype=float), 0.0
    for i, value in enumerate(values):
        running = weight * running + (1 - weight) * value
        averaged[i] = running / (1 - weight ** (i + 1))
    return averaged


def save_captioned_images(
    images: torch.Tensor, texts: Sequence[str], path: str | os.PathLike, columns: int = 4, title: str | None = None
) -> Path:
    """A grid of images, each with its text below (wrapped), e.g. generated or retrieved captions.

    Args:
        images: (B, 3, H, W) in [0, 1]; texts: B strings (several lines each are fine).
    """
    count = _check_images(images, "images")
    if len(texts) != count:
        raise ValueError(f"{count} images but {len(texts)} texts; pass one text per image.")
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(columns * _PANEL_INCHES, rows * _PANEL_INCHES * 1.35), dpi=_DPI, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if index >= count:
            ax.set_axis_off()
            continue
        ax.imshow(_to_hwc(images[index]))
        wrapped = "\n".join(textwrap.fill(line, 30) for line in str(texts[index]).splitlines() or [""])
        ax.set_xlabel(wrapped, fontsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    return _save(figure, path)


# -- helpers ---------------------------------------------------------------------------------------
def _check_images(images: torch.Tensor, name: str) -> int:
    """The batch size of a (B, 3, H, W) tensor; an error naming the argument otherwise."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            f"{name} must be a (B, 3, H, W) tensor in [0, 1]; got "
            f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}."
        )
    if images.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch; pass at least one image.")
    return images.shape[0]


def _to_hwc(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) float32 for imshow; values a little outside (bicubic overshoot) are clipped."""
    return image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()


def _numbers(values, name: str) -> np.ndarray:
    array = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a flat sequence of numbers; got shape {array.shape}.")
    return array


def _save(figure: Figure, path: str | os.PathLike) -> Path:
    """Renders with Agg into a temporary file beside ``path`` (named per process and thread), then moves it into place."""
    path = Path(path)
    FigureCanvasAgg(figure)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=_DPI)
    return path
