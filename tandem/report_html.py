"""The drift report as one self-contained HTML file: inline CSS and hand-made SVG bar charts (reference
against live share per bin), no script, no external asset, so it opens from a mail attachment or a CI
artefact as it is.

Why no plotting library: the charts are grouped bars over at most a dozen bins; matplotlib (tens of MB
with its fonts) or plotly (a 3 MB script per report) would cost more than the forty lines below.
"""

from __future__ import annotations

import html
import time

from tandem.drift_report import PAGE, WARN, ColumnDrift, VersionDrift

W, H, PAD_L, PAD_B, PAD_T = 640, 230, 44, 84, 12
COLOURS = {"reference": "#9aa5b1", "live": {"stable": "#2f9e44", "watch": "#f08c00", "drifted": "#e03131"}}

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:980px;color:#1f2933;padding:0 1rem}
h1{font-size:1.5rem}h2{margin-top:2.5rem;border-bottom:1px solid #d9e2ec}h3{margin:1.5rem 0 .3rem}
table{border-collapse:collapse}td,th{padding:.2rem .8rem;text-align:left;border-bottom:1px solid #eef1f4}
.band{border-radius:3px;padding:0 .4rem;color:#fff}.stable{background:#2f9e44}.watch{background:#f08c00}
.drifted{background:#e03131}.note{color:#8a4b08}.legend span{display:inline-block;width:.8rem;height:.8rem;
margin:0 .3rem 0 1rem;vertical-align:middle}svg text{font:11px system-ui,sans-serif;fill:#52606d}
"""


def chart(c: ColumnDrift) -> str:
    """Grouped bars: each bin's reference share (grey) and live share (coloured by the PSI band)."""
    n = len(c.labels)
    top = max([*c.reference, *c.live, 1e-9])
    slot = (W - PAD_L - 8) / n
    bar = max(slot * 0.38, 1.0)
    y = lambda share: PAD_T + (H - PAD_T - PAD_B) * (1 - share / top)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" role="img" '
             f'aria-label="{html.escape(c.name)}: reference and live share per bin">']  # fmt: skip
    for frac in (0.0, 0.5, 1.0):
        yy = y(top * frac)
        parts.append(f'<line x1="{PAD_L}" x2="{W - 4}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#e4e7eb"/>')
        parts.append(f'<text x="{PAD_L - 6}" y="{yy + 4:.1f}" text-anchor="end">{top * frac:.0%}</text>')
    live_colour = COLOURS["live"][c.band]
    for i, (label, ref, live) in enumerate(zip(c.labels, c.reference, c.live, strict=True)):
        x = PAD_L + i * slot + slot * 0.1
        for j, (share, colour, what) in enumerate(
            ((ref, COLOURS["reference"], "reference"), (live, live_colour, "live"))
        ):
            top_y = y(share)
            parts.append(
                f'<rect x="{x + j * bar:.1f}" y="{top_y:.1f}" width="{bar:.1f}" height="{H - PAD_B - top_y:.1f}" '
                f'fill="{colour}"><title>{html.escape(label)}: {what} {share:.1%}</title></rect>'
            )
        lx, ly = x + bar, H - PAD_B + 10
        parts.append(
            f'<text x="{lx:.1f}" y="{ly}" text-anchor="end" transform="rotate(-35 {lx:.1f} {ly})">'
            f"{html.escape(label)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _badge(c: ColumnDrift) -> str:
    return f'<span class="band {c.band}">{c.band}</span>'


def _section(c: ColumnDrift) -> str:
    return (f'<section class="column" data-feature="{html.escape(c.name)}" data-psi="{c.psi:.4f}">'
            f"<h3>{html.escape(c.name)} &middot; PSI {c.psi:.3f} {_badge(c)}</h3>{chart(c)}</section>")  # fmt: skip


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def version_html(v: VersionDrift) -> str:
    head = (f"<h2>{html.escape(v.model)} version {html.escape(v.version)}</h2>"
            f"<p>{v.rows} logged instances, {_when(v.first)} to {_when(v.last)}</p>")  # fmt: skip
    if v.note:
        return head + f'<p class="note">No comparison: {html.escape(v.note)}</p>'
    rows = [f"<tr><td>{html.escape(c.name)}</td><td>{c.psi:.3f}</td><td>{_badge(c)}</td></tr>" for c in v.features]
    if v.prediction is not None:
        p = v.prediction
        rows.insert(0, f"<tr><th>predictions</th><th>{p.psi:.3f}</th><th>{_badge(p)}</th></tr>")
    table = f'<table class="summary"><tr><th>feature</th><th>PSI</th><th></th></tr>{"".join(rows)}</table>'
    legend = ('<p class="legend">bars:<span style="background:#9aa5b1"></span>reference (training data)'
              '<span style="background:#2f9e44"></span>live (coloured by PSI band)</p>')  # fmt: skip
    pred = f"<h3>Predictions</h3>{_section(v.prediction)}" if v.prediction is not None else ""
    features = "".join(_section(c) for c in v.features)
    return head + table + legend + pred + "<h3>Features, most drifted first</h3>" + features


def render(model: str, versions: list[VersionDrift], source: str) -> str:
    body = "".join(version_html(v) for v in versions) or "<p>No logged requests of this model in that window.</p>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Drift report: {html.escape(model)}</title>
<style>{CSS}</style></head><body>
<h1>Drift report: {html.escape(model)}</h1>
<p>Live requests from the payload log ({html.escape(source)}) against each version's reference profile.
Population stability index: under {WARN} stable, {WARN} to {PAGE} worth a look, over {PAGE} drifted.
Generated {_when(time.time())}.</p>
{body}
</body></html>
"""
