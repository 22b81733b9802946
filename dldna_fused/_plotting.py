"""What every figure of the toolkit does last: title, layout, and the optional PNG."""

from __future__ import annotations

from pathlib import Path

DPI = 110


def finish_figure(fig, title: str | None = None, save_path: str | Path | None = None):
    """Sets the figure's title, lays it out, writes it to ``save_path`` (format by suffix) when
    given, and returns it."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if save_path is not None:
        fig.savefig(save_path, dpi=DPI)
    return fig
