"""Routing telemetry as a picture: experts x languages heatmaps of `mtmoe.export.routing`'s statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_heatmap(telemetry: dict, path: Path) -> Path:
    """Experts x languages heatmap of routing share, one panel per MoE layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = telemetry["layers"]
    langs = sorted(telemetry["by_language"])
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers) + 1, 3.2), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        cols = [lang for lang in langs if layer in telemetry["by_language"][lang]]
        matrix = np.array([telemetry["by_language"][lang][layer]["share"] for lang in cols]).T  # [E, langs]
        im = ax.imshow(matrix, vmin=0, vmax=max(0.5, float(matrix.max())), cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(cols)), cols)
        ax.set_yticks(range(matrix.shape[0]))
        ax.set_ylabel("expert")
        ax.set_title(f"{layer} ({'source' if layer.startswith('enc') else 'target'} language)")
        for (e, j), v in np.ndenumerate(matrix):
            ax.text(j, e, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.35 else "k", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="share of routed tokens")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
