"""Matplotlib figures without pyplot, shared by the analysis and balance plots.

A leaf module: matplotlib is imported only when a figure is made, so importing the package
never needs it.
"""
from __future__ import annotations

from typing import Optional


def figure(**kwargs):
    """A matplotlib ``Figure`` not attached to pyplot: saving it needs no GUI backend and
    leaves the user's backend and pyplot state alone."""
    from matplotlib.figure import Figure
    return Figure(**kwargs)


def save(fig, path: str, title: Optional[str] = None, ax=None) -> str:
    """Title ``ax`` (the whole figure when ``ax`` is None) if ``title``, lay out, write a
    110-dpi PNG to ``path``; returns ``path``."""
    if title:
        if ax is None:
            fig.suptitle(title)
        else:
            ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
