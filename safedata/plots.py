"""Figures, headless: matplotlib with the Agg backend (chosen here, before pyplot is first imported, so no stage
ever needs a display), saved as PNG files or as data URIs for a self-contained page."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from .store import atomic_write_bytes  # noqa: E402


def png_bytes(fig, dpi: int = 110, **savefig) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, **savefig)
    plt.close(fig)
    return buffer.getvalue()


def save_figure(fig, path, dpi: int = 110) -> Path:
    """A figure as a PNG file, laid out tight and written atomically; the figure is closed."""
    fig.tight_layout()
    atomic_write_bytes(path, png_bytes(fig, dpi))
    return Path(path)


def png_data_uri(fig, dpi: int = 100) -> str:
    """The figure as an inline image (data:image/png;base64,...) for report.html; the figure is closed."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(fig, dpi, bbox_inches="tight")).decode("ascii")
