"""Plot metrics of a run as an SVG line chart: ``python tools/plot_metrics.py RUN_DIR --out FILE.svg``.

Reads ``RUN_DIR/metrics.jsonl`` (or a metrics.jsonl path) and draws one line per ``--keys`` entry
against the training step, using only the records that have that key (validation metrics exist
every ``trainer.val_every`` steps). Plain SVG, no plotting library: the README's learning curve
is made with it. The file is written to a temporary name and renamed.
"""

from __future__ import annotations

import argparse
import html
import math
import os
from pathlib import Path

from mcore_r1.trainer.metrics import read_metrics

WIDTH, HEIGHT, MARGIN = 640, 360, 56
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")


def series(records: list[dict], key: str) -> list[tuple[float, float]]:
    return [(float(r["step"]), float(r[key])) for r in records
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def render(lines: dict[str, list[tuple[float, float]]], title: str, y_range=(0.0, 1.0)) -> str:
    points = [p for s in lines.values() for p in s]
    if not points:
        raise ValueError("none of the requested metrics has a finite value")
    x_max = max(x for x, _ in points) or 1.0
    y_lo = min(y_range[0], min(y for _, y in points))
    y_hi = max(y_range[1], max(y for _, y in points))
    span = (y_hi - y_lo) or 1.0

    def sx(x: float) -> float:
        return MARGIN + x / x_max * (WIDTH - 2 * MARGIN)

    def sy(y: float) -> float:
        return HEIGHT - MARGIN - (y - y_lo) / span * (HEIGHT - 2 * MARGIN)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           'font-family="sans-serif" font-size="12">',
           f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
           f'<text x="{WIDTH / 2}" y="20" text-anchor="middle" font-size="14">{html.escape(title)}</text>']
    for i in range(5):  # horizontal grid with y labels
        y = y_lo + span * i / 4
        out.append(f'<line x1="{MARGIN}" x2="{WIDTH - MARGIN}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{MARGIN - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.2f}</text>')
    for i in range(5):
        x = x_max * i / 4
        out.append(f'<text x="{sx(x):.1f}" y="{HEIGHT - MARGIN + 18}" text-anchor="middle">{x:.0f}</text>')
    out.append(f'<text x="{WIDTH / 2}" y="{HEIGHT - 12}" text-anchor="middle">training step</text>')
    for k, (key, pts) in enumerate(lines.items()):
        colour = COLOURS[k % len(COLOURS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        out.extend(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colour}"/>' for x, y in pts)
        out.append(f'<text x="{MARGIN + 8}" y="{MARGIN - 14 + 16 * k}" fill="{colour}">{html.escape(key)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run directory or metrics.jsonl")
    parser.add_argument("--out", required=True, help="SVG file to write")
    parser.add_argument("--keys", nargs="+", default=["val/accuracy", "reward/accuracy"])
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    path = Path(args.run)
    path = path / "metrics.jsonl" if path.is_dir() else path
    records = read_metrics(path)
    svg = render({k: series(records, k) for k in args.keys}, args.title or str(path.parent.name))
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(svg, encoding="utf-8")
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
