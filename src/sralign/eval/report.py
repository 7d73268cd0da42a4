"""The report: ``report.html`` (self-contained: figures embedded) and its Markdown twin."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}" style="max-width:100%">'


STAT_COLS = ("sharp/HR", "noise/HR")


def summary_rows(result) -> list[dict]:
    """One row per policy, then "bicubic" and "HR" (metrics only: the truth's own no-reference
    scores, the floor bicubic upsampling sets)."""
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
        row.update(getattr(result, "stats", {}).get(name, {}))
        if name in getattr(result, "flags", {}):
            row["hacking flags"] = "; ".join(result.flags[name]) if result.flags[name] else "none"
        rows.append(row)
    if getattr(result, "bicubic", None):
        rows.append({"policy": "bicubic", **result.bicubic, **result.stats.get("bicubic", {})})
    if getattr(result, "stats", None):
        rows.append({"policy": "HR", **result.hr_values, "sharp/HR": 1.0, "noise/HR": 1.0})
    return rows


def column_tag(result, metric: str) -> str:
    """"" for a reward metric, "(held-out)" for one no method trained on, "(gap in reward)" for
    a raw no-reference metric whose gap to the HR is trained."""
    if metric in result.reward_names:
        return ""
    if f"gap:{metric}" in result.reward_names:
        return " (gap in reward)"
    return " (held-out)"


def format_table(result, markdown: bool = True) -> str:
    rows = summary_rows(result)
    metric_cols = list(result.metrics)
    stat_cols = [c for c in STAT_COLS if any(c in r for r in rows)]
    flag_cols = ["hacking flags"] if getattr(result, "flags", None) else []
    cols = ["policy", "sampler", "Mean@M", "Best@M", "Worst@M", "std/img", "win rate", *metric_cols, *stat_cols, *flag_cols]

    def head(c):
        if c in result.metrics:
            any_row = next(iter(result.metrics[c].values()))
            arrow = "↑" if any_row["higher_is_better"] else "↓"
            return f"{c}{arrow}{column_tag(result, c)}"
        return c

    def fmt(v):
        if v is None:
            return "—"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(head(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


CLAIM = "Worst@M rises more than Mean@M and per-image std falls"


def spread_claim(d_mean: float, d_worst: float, d_std: float) -> bool:
    """DP²O-SR's claim for one aligned policy against its reference: Worst@M rises
    (``d_worst`` > 0) by more than Mean@M does (``d_worst`` > ``d_mean``) and the reward's
    per-image std over the M seeds falls (``d_std`` < 0). Changes in reward units."""
    return d_worst > 0 and d_worst > d_mean and d_std < 0


def delta_rows(result) -> list[dict]:
    """Each aligned policy against its reference (same sampler and seeds): changes of the reward's
    Mean@M / Worst@M / per-image std, DP²O-SR's spread claim (``ΔWorst−ΔMean``, ``spread claim``
    yes/no: ``spread_claim``), the held-out fidelity metrics, sharpness and noise relative to the
    HR, and the hacking flags — the figures a claim of improvement rests on."""
    rows = []
    for name, reasons in getattr(result, "flags", {}).items():
        ref = next((r for r in result.reward if r.startswith("reference (") and result.samplers.get(r) == result.samplers.get(name)), None)
        if ref is None:
            continue
        pair = result.paired[name]  # normalised over the row and its reference only (``bestof.paired_deltas``)
        d_mean, d_worst, d_std = pair["ΔMean@M"], pair["ΔWorst@M"], pair["Δstd/img"]
        row = {"policy": name, "vs": ref, "ΔMean@M": d_mean, "ΔWorst@M": d_worst, "Δstd/img": d_std,
               "ΔWorst−ΔMean": d_worst - d_mean, "spread claim": "yes" if spread_claim(d_mean, d_worst, d_std) else "no"}
        for f in ("psnr", "psnr_rgb", "ssim"):
            if f in result.metrics:
                row[f"Δ{f}"] = result.metrics[f][name]["mean"] - result.metrics[f][ref]["mean"]
        row.update({k: result.stats[name][k] for k in STAT_COLS})
        if getattr(result, "trained", None):  # judged by its own training reward too
            own = result.trained.get(name, {})
            row["trained reward"] = own.get("reward", "—")
            row["ΔMean@M (trained)"] = own.get("ΔMean@M")
            row["ΔWorst@M (trained)"] = own.get("ΔWorst@M")
        row["hacking flags"] = "; ".join(reasons) if reasons else "none"
        rows.append(row)
    return rows


def claim_line(result) -> str:
    """One sentence: for which aligned policies DP²O-SR's spread claim holds ("" without any)."""
    rows = delta_rows(result)
    if not rows:
        return ""
    yes = [r["policy"] for r in rows if r["spread claim"] == "yes"]
    no = [r["policy"] for r in rows if r["spread claim"] != "yes"]
    parts = ([f"holds for {', '.join(yes)}"] if yes else []) + ([f"does not hold for {', '.join(no)}"] if no else [])
    return f"DP²O-SR's claim ({CLAIM}, against the reference at equal seeds): {'; '.join(parts)}."


def format_deltas(result) -> str:
    """The per-policy change table (Markdown) with the spread-claim sentence under it ("" when no
    policy has a reference)."""
    rows = delta_rows(result)
    if not rows:
        return ""
    cols = list(rows[0])

    def fmt(v):
        if v is None:
            return "—"
        return f"{v:+.4f}" if isinstance(v, float) and not isinstance(v, bool) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) if not c.endswith("/HR") else f"{r[c]:.3f}" for c in cols) + " |")
    return "\n".join(lines) + "\n\n" + claim_line(result)


def legend(result) -> str:
    """What the diagnostic columns and flags mean, with the thresholds used."""
    th = getattr(result, "thresholds", None)
    if not th:
        return ""
    return (f"sharp/HR: mean Sobel gradient energy over the HR's (1 = as sharp as the truth). noise/HR: high-pass "
            f"energy inside the HR's smooth regions (attribute reward's texture map, eroded 2 px) over the HR's. "
            f"Rows bicubic and HR: bicubic upsampling of the same LR, and the HR crops themselves (no-reference "
            f"scores only; gap: metrics are 0 there). A policy is flagged when, against its reference at equal seeds, a "
            f"no-reference metric improves by more than {th['nr_gain']:.0%} while held-out PSNR (Y or RGB) falls by more than "
            f"{th['psnr_drop_db']} dB or SSIM by more than {th['ssim_drop']}, or when sharp/HR exceeds {th['sharp_max']} "
            f"or noise/HR exceeds {th['noise_max']} (and its reference's). Spread claim (DP²O-SR): yes when, against "
            f"the reference, Worst@M rises by more than Mean@M (ΔWorst@M > 0 and ΔWorst−ΔMean > 0) and std/img falls."
            + (" Changes against the reference (ΔMean@M, ΔWorst@M, Δstd/img, win rate) normalise the reward per LR over "
               "that policy's and its reference's samples only, so they do not depend on the other rows; the table's "
               "Mean@M / Best@M / Worst@M / std/img put every row on one scale (normalised over all rows' samples), so "
               "their differences need not equal the changes." if getattr(result, "paired", None) else "")
            + (" ΔMean@M / ΔWorst@M (trained): the same change under the reward that policy trained on (column "
               "trained reward)." if getattr(result, "trained", None) else ""))


def _html_table(table_md: str, title: str) -> str:
    if not table_md:
        return ""
    rows = [r for r in table_md.splitlines() if r.startswith("|")]
    notes = "".join(f"<p>{html.escape(r)}</p>" for r in table_md.splitlines() if r.strip() and not r.startswith("|"))
    th = "".join(f"<th>{html.escape(c.strip())}</th>" for c in rows[0].strip("|").split("|"))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r.strip("|").split("|")) + "</tr>" for r in rows[2:])
    return f"<h2>{html.escape(title)}</h2><table><tr>{th}</tr>{body}</table>{notes}"


def reward_words(result) -> str:
    """The ranking reward in words: its kind and metrics."""
    names = ", ".join(result.reward_names)
    if getattr(result, "reward_kind", "hybrid") == "attribute":
        return f"GDPO-SR's attribute-aware reward (PSNR-Y on the HR's smooth area, {', '.join(result.reward_names[1:])} on its texture)"
    return f"DP²O-SR's hybrid reward ({names})"


def write_report(out: str | Path, result, figures: dict[str, Path], meta: dict) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` into ``out``. ``figures``: title -> PNG path
    (inside ``out``); ``meta``: config and timing to print."""
    out = Path(out)
    table_md = format_table(result)
    images = f"Images: {meta['images']}. " if meta.get("images") else ""
    md = ["# sralign report\n", f"{images}M = {result.m} seeds per held-out LR image; reward = {reward_words(result)}; "
          f"held-out metrics: {', '.join(result.heldout_metrics) or 'none'}.\n", table_md, "", legend(result), ""]
    if format_deltas(result):
        md += ["Each aligned policy against its reference:\n", format_deltas(result), ""]
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
<p>{html.escape(images)}M = {result.m} seeds per held-out LR image. Reward: {html.escape(reward_words(result))}.
Held-out metrics (not trained on): {html.escape(', '.join(result.heldout_metrics) or 'none')}.
↑/↓: higher/lower is better. Win rate: share of (image, seed) where the policy beats its baseline at equal seed.</p>
<table><tr>{th}</tr>{body}</table>
<p>{html.escape(legend(result))}</p>
{_html_table(format_deltas(result), "Each aligned policy against its reference")}
{figs}
<h2>Run</h2><pre>{html.escape(json.dumps(meta, indent=2, default=str))}</pre>
</body></html>"""
    html_path = out / "report.html"
    html_path.write_text(page)
    return html_path, md_path
