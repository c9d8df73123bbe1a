"""The bench's output: a rich table for the terminal, Markdown tables for BENCHMARKS.md, JSON for machines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

HEADERS = [
    "level",
    "where",
    "method",
    "backend",
    "baseline",
    "time",
    "baseline time",
    "× time",
    "× CPU time",
    "peak mem",
    "× mem",
]


def _where(record: dict) -> str:
    s = record["shapes"]
    if record["level"] == "step":
        depth = f"{s['layers']}L"
        return f"{s['backbone']} {depth} b{s['batch']}×{s['seq']}"
    return f"{s['layer']} {s['in_features']}→{s['out_features']} ×{s['tokens']}"


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _mib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:.0f} MiB"


def _ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _baseline(record: dict) -> str:
    rank = record.get("baseline_rank")
    return f"{record['baseline']} r={rank}" if rank else record["baseline"]


def rows(records: list[dict]) -> list[list[str]]:
    return [
        [
            r["level"],
            _where(r),
            r["method"],
            r.get("backend", ""),
            _baseline(r),
            _ms(r["time_s"]),
            _ms(r["baseline_time_s"]),
            _ratio(r["ratio_time"]),
            _ratio(r.get("ratio_cpu_time")),
            _mib(r.get("peak_mem")),
            _ratio(r.get("ratio_peak_mem")),
        ]
        for r in records
    ]


def print_table(result: dict, console: Console | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=max(Console().width, 170))  # a CI log is not 80 columns of text
    meta = result["meta"]
    plan = meta.get("plan", {}).get("name", "")
    title = f"qmoe bench ({plan}) on {meta['device_name']}, {meta['torch_threads']} thread(s)"
    table = Table(title=title, show_lines=False)
    for h in HEADERS:
        right = h.startswith(("×", "time", "baseline time", "peak"))
        table.add_column(h, justify="right" if right else "left", no_wrap=True)
    for row in rows(result["records"]):
        table.add_row(*row)
    console.print(table)
    console.print(
        "× time: median wall-clock ratio (method / baseline), < 1 is faster; × CPU time: the same with process "
        "CPU time, steadier on a shared machine. adapter rows time the adapter alone against its per-expert loop."
    )


def markdown(result: dict) -> str:
    """Markdown tables, one per level, for BENCHMARKS.md."""
    out = []
    titles = {
        "layer": "Layer level (forward + backward)",
        "adapter": "Adapter vs per-expert loop (forward + backward)",
        "step": "Training step",
    }
    for level, title in titles.items():
        records = [r for r in result["records"] if r["level"] == level]
        if not records:
            continue
        out.append(f"#### {title}\n")
        out.append("| " + " | ".join(HEADERS[1:]) + " |")
        out.append("|" + "---|" * (len(HEADERS) - 1))
        for row in rows(records):
            out.append("| " + " | ".join(row[1:]) + " |")
        out.append("")
    return "\n".join(out)


def write_json(result: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
