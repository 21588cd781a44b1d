"""What a lab experiment is: a claim of the chapter, its figures, a run that measures, a comparison.

Each experiment module defines one :class:`Experiment`. The chapter's own figures
live beside it as :class:`ChapterFigure` data with the section they come from;
``run`` returns plain rows (dicts, JSON-ready) measured on an engine; ``compare``
turns rows into :class:`Comparison` lines (chapter figure, measured figure, and
one sentence on why they differ); ``plot`` draws the experiment's figures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Row = dict[str, Any]
#: progress(done, total, what) — the CLI renders it with rich
Progress = Callable[[int, int, str], None]


def no_progress(done: int, total: int, what: str) -> None:
    """A progress callback that shows nothing."""


@dataclass(frozen=True)
class ChapterFigure:
    key: str
    label: str
    value: float
    unit: str
    section: str
    quote: str  # the chapter's words (Chinese), so a reader can find the place


@dataclass
class Comparison:
    figure: ChapterFigure
    engine: str
    measured: float | None
    why: str  # one sentence: why the measured figure differs (or not) from the chapter's


@dataclass
class Experiment:
    name: str
    title: str
    claim: str
    figures: list[ChapterFigure]
    engines: tuple[str, ...]
    run: Callable[[str, dict[str, Any], Progress], list[Row]]
    compare: Callable[[list[Row]], list[Comparison]]
    plot: Callable[[list[Row], Path], list[Path]]
    defaults: dict[str, Any] = field(default_factory=dict)
    quick: dict[str, Any] = field(default_factory=dict)  # smaller parameters for `--quick` and CI


def save_figure(fig: Any, out_dir: Path, name: str) -> Path:
    """Lay out, write ``out_dir/name`` (PNG) and close a matplotlib figure; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = out_dir / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
