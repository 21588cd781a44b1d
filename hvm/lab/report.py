"""`hvm lab report`: run every experiment, write report.md, report.html and PNG plots.

For each experiment: the chapter's figures with their section, the measured figure
per engine, one sentence on why they differ, and the plots.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvm.lab import EXPERIMENTS, run_experiment
from hvm.lab.base import Comparison, Experiment, Progress, Row, no_progress


@dataclass
class Section:
    experiment: Experiment
    rows: list[Row]
    comparisons: list[Comparison]
    plots: list[Path]


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "%":
        return f"{value:.3f} %"
    return f"{value:,.0f} {unit}" if float(value).is_integer() else f"{value:,.3f} {unit}"


def build(
    out_dir: Path,
    engine: str = "both",
    quick: bool = False,
    progress: Progress = no_progress,
    names: list[str] | None = None,
) -> list[Section]:
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = []
    for name in names or list(EXPERIMENTS):
        exp = EXPERIMENTS[name]
        params: dict[str, Any] = dict(exp.quick) if quick else {}
        if engine != "both" and engine not in exp.engines:
            sections.append(Section(exp, [], [], []))  # shown as "no engine ran"
            continue
        rows = run_experiment(name, engine, params, progress)
        (out_dir / f"{name}.json").write_text(json.dumps({"experiment": name, "rows": rows}, indent=2))
        sections.append(Section(exp, rows, exp.compare(rows), exp.plot(rows, out_dir) if rows else []))
    write_markdown(out_dir / "report.md", sections)
    write_html(out_dir / "report.html", sections)
    return sections


def write_markdown(path: Path, sections: list[Section]) -> None:
    lines = [
        "# hvm lab report",
        "",
        "Each experiment sets a figure from the chapter beside the figure measured on each engine "
        "of this host. Host-specific figures are this host's (KVM here runs on PVM).",
        "",
    ]
    for sec in sections:
        exp = sec.experiment
        lines += [f"## {exp.title} (`{exp.name}`)", "", exp.claim, ""]
        lines += [
            "| chapter figure | section | chapter | engine | measured | why they differ |",
            "|---|---|---|---|---|---|",
        ]
        for c in sec.comparisons:
            lines.append(
                f"| {c.figure.label} | {c.figure.section} | {_fmt(c.figure.value, c.figure.unit)} | "
                f"{c.engine} | {_fmt(c.measured, c.figure.unit)} | {c.why} |"
            )
        if not sec.comparisons:
            lines.append("| — | — | — | — | no engine ran | — |")
        lines.append("")
        lines += [f"> {f.quote} ({f.section})" for f in exp.figures]
        lines.append("")
        if sec.rows:
            keys = [k for k, v in sec.rows[0].items() if not isinstance(v, (dict, list))]
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_cell(r.get(k)) for k in keys) + " |" for r in sec.rows]
            lines.append("")
        lines += [f"![{p.stem}]({p.name})" for p in sec.plots]
        lines.append("")
    path.write_text("\n".join(lines))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "—" if value is None else str(value)


def write_html(path: Path, sections: list[Section]) -> None:
    e = html.escape
    parts = [
        "<!doctype html><meta charset='utf-8'><title>hvm lab report</title>",
        "<style>body{font-family:sans-serif;max-width:72em;margin:auto}td,th{border:1px solid #ccc;"
        "padding:3px 6px;font-size:90%}table{border-collapse:collapse;margin:1em 0}"
        "blockquote{color:#555}</style>",
        "<h1>hvm lab report</h1>",
    ]
    for sec in sections:
        exp = sec.experiment
        parts.append(f"<h2>{e(exp.title)} (<code>{e(exp.name)}</code>)</h2><p>{e(exp.claim)}</p>")
        parts.append(
            "<table><tr><th>chapter figure</th><th>section</th><th>chapter</th><th>engine</th>"
            "<th>measured</th><th>why they differ</th></tr>"
        )
        for c in sec.comparisons:
            parts.append(
                f"<tr><td>{e(c.figure.label)}</td><td>{e(c.figure.section)}</td>"
                f"<td>{e(_fmt(c.figure.value, c.figure.unit))}</td><td>{e(c.engine)}</td>"
                f"<td>{e(_fmt(c.measured, c.figure.unit))}</td><td>{e(c.why)}</td></tr>"
            )
        parts.append("</table>")
        parts += [f"<blockquote>{e(f.quote)} ({e(f.section)})</blockquote>" for f in exp.figures]
        if sec.rows:
            keys = [k for k, v in sec.rows[0].items() if not isinstance(v, (dict, list))]
            parts.append("<table><tr>" + "".join(f"<th>{e(k)}</th>" for k in keys) + "</tr>")
            for r in sec.rows:
                parts.append("<tr>" + "".join(f"<td>{e(_cell(r.get(k)))}</td>" for k in keys) + "</tr>")
            parts.append("</table>")
        parts += [f"<p><img src='{e(p.name)}' alt='{e(p.stem)}'></p>" for p in sec.plots]
    path.write_text("\n".join(parts))
