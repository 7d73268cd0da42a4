"""The report: ``report.html`` (self-contained: figures embedded) and its Markdown twin."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}" style="max-width:100%">'


def summary_rows(result) -> list[dict]:
    rows = []
    for name, cur in result.reward.items():
        row = {
            "policy": name,
            "sampler": result.samplers.get(name, ""),
            "Mean@M": cur["mean"][-1],
            "Best@M": cur["best"][-1],
            "Worst@M": cur["worst"][-1],
            "std/img": result.reward_std[name],
            "win rate": result.win_rate.get(name),
        }
        for metric, per in result.metrics.items():
            row[metric] = per[name]["mean"]
        rows.append(row)
    return rows


def format_table(result, markdown: bool = True) -> str:
    rows = summary_rows(result)
    metric_cols = list(result.metrics)
    cols = ["policy", "sampler", "Mean@M", "Best@M", "Worst@M", "std/img", "win rate", *metric_cols]

    def head(c):
        if c in result.metrics:
            any_row = next(iter(result.metrics[c].values()))
            arrow = "↑" if any_row["higher_is_better"] else "↓"
            tag = "" if any_row["in_reward"] else " (held-out)"
            return f"{c}{arrow}{tag}"
        return c

    def fmt(v):
        if v is None:
            return "—"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(head(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def write_report(out: str | Path, result, figures: dict[str, Path], meta: dict) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` into ``out``. ``figures``: title -> PNG path
    (inside ``out``); ``meta``: config and timing to print."""
    out = Path(out)
    table_md = format_table(result)
    md = ["# sralign report\n", f"M = {result.m} seeds per held-out LR image; reward = {', '.join(result.reward_names)}; "
          f"held-out metrics: {', '.join(result.heldout_metrics) or 'none'}.\n", table_md, ""]
    for title, p in figures.items():
        md += [f"## {title}\n", f"![{title}]({p.name})\n"]
    md += ["## Run\n", "```json", json.dumps(meta, indent=2, default=str), "```"]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md))

    rows = table_md.splitlines()
    th = "".join(f"<th>{html.escape(c.strip())}</th>" for c in rows[0].strip("|").split("|"))
    body = ""
    for r in rows[2:]:
        body += "<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r.strip("|").split("|")) + "</tr>"
    figs = "".join(f"<h2>{html.escape(t)}</h2>{_img_tag(p, t)}" for t, p in figures.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>sralign report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 7px;text-align:right}}
th{{background:#f3f3f3}}pre{{background:#f6f6f6;padding:1em;overflow:auto;font-size:12px}}</style></head><body>
<h1>sralign report</h1>
<p>M = {result.m} seeds per held-out LR image. Reward: {html.escape(', '.join(result.reward_names))}.
Held-out metrics (not trained on): {html.escape(', '.join(result.heldout_metrics) or 'none')}.
↑/↓: higher/lower is better. Win rate: share of (image, seed) where the policy beats its baseline at equal seed.</p>
<table><tr>{th}</tr>{body}</table>
{figs}
<h2>Run</h2><pre>{html.escape(json.dumps(meta, indent=2, default=str))}</pre>
</body></html>"""
    html_path = out / "report.html"
    html_path.write_text(page)
    return html_path, md_path
