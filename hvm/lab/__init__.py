"""The lab: every claim of the chapter as an experiment that runs on the engines.

``EXPERIMENTS`` maps a name to its :class:`hvm.lab.base.Experiment`; ``run_experiment``
runs one on the requested engines and returns its rows.
"""

from __future__ import annotations

from typing import Any

from hvm.lab.base import Experiment, Progress, Row, no_progress


def _registry() -> dict[str, Experiment]:
    from hvm.lab import (
        apicv,
        context_switch,
        exit_rate,
        io_exits,
        msr_bitmap,
        page_walk,
        popek_goldberg,
        trap_emulate,
        tsc,
    )

    return {e.name: e for e in (
        apicv.EXPERIMENT,
        context_switch.EXPERIMENT,
        exit_rate.EXPERIMENT,
        io_exits.EXPERIMENT,
        msr_bitmap.EXPERIMENT,
        page_walk.EXPERIMENT,
        popek_goldberg.EXPERIMENT,
        trap_emulate.EXPERIMENT,
        tsc.EXPERIMENT,
    )}


EXPERIMENTS = _registry()


def engines_for(experiment: Experiment, choice: str) -> list[str]:
    """'both' means every engine the experiment supports that this host can run."""
    from hvm.engine import available_engines

    host = available_engines()
    if choice == "both":
        return [e for e in experiment.engines if e in host]
    if choice not in experiment.engines:
        raise ValueError(f"experiment {experiment.name} does not run on the {choice} engine")
    return [choice]


def run_experiment(
    name: str, engine: str = "both", params: dict[str, Any] | None = None, progress: Progress = no_progress
) -> list[Row]:
    experiment = EXPERIMENTS[name]
    merged = {**experiment.defaults, **(params or {})}
    rows: list[Row] = []
    for eng in engines_for(experiment, engine):
        rows.extend(experiment.run(eng, merged, progress))
    return rows
