"""reports/<profile>/index.html: every table and figure of a profile on one self-contained page
(figures embedded as data URIs, no scripts, no external files), readable on a laptop screen and
in print (tables never split across pages when they fit, figures scaled to the page width)."""

from __future__ import annotations

import base64
import html
import re

from benchmark.render import ReportTable

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 1rem 1.5rem; color: #1a1a1a; line-height: 1.4; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ccc; }
nav ul { columns: 2; font-size: 0.9rem; }
figure { margin: 1rem 0; overflow-x: auto; }
figure.table figcaption, figure.figure figcaption { font-weight: 600; margin-bottom: 0.4rem; }
table { border-collapse: collapse; font-size: 0.85rem; font-variant-numeric: tabular-nums; }
thead tr:first-child th { border-top: 2px solid #333; }
thead tr:last-child th { border-bottom: 1px solid #333; }
tbody tr:last-child th, tbody tr:last-child td { border-bottom: 2px solid #333; }
th, td { padding: 0.2rem 0.55rem; text-align: right; vertical-align: top; }
th:first-child { text-align: left; }
th.group { text-align: center; border-bottom: 1px solid #999; }
tr.mean th, tr.mean td { border-top: 1px solid #999; }
.ref, .note { color: #666; font-size: 0.8em; }
p.notes { font-size: 0.8rem; color: #444; max-width: 70rem; }
img { max-width: 100%; height: auto; }
.footer { font-size: 0.8rem; color: #444; white-space: pre-wrap; }
@media print {
  body { max-width: none; padding: 0; font-size: 10pt; }
  nav { display: none; }
  figure { break-inside: avoid; overflow: visible; }
  h2 { break-after: avoid; }
  table { font-size: 8pt; }
}
"""


def html_page(
    title: str,
    sections: list[tuple[str, list[ReportTable], list[tuple[str, str, bytes]]]],
    footer: str,
    records_csv: str,
) -> str:
    """The whole page.

    Parameters
    ----------
    title : str
        Page title.
    sections : list of (heading, tables, figures)
        One section per report table file; figures are (file name, caption, PNG bytes) or (file name,
        caption, PNG bytes, reading), the reading a line of plain words shown under the image.
    footer : str
        Provenance text (Markdown-ish: `code` spans and "- " list lines are converted).
    records_csv : str
        Name of the records CSV beside the page, linked from it.

    Returns
    -------
    str
        The HTML document.
    """
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title>",
        f"<style>{CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{esc(title)}</h1>",
    ]
    if not sections:
        parts.append("<p>No records: nothing to report.</p>")
    parts.append(
        "<nav><ul>"
        + "".join(f'<li><a href="#sec-{i}">{esc(heading)}</a></li>' for i, (heading, _, _) in enumerate(sections))
        + "</ul></nav>"
    )
    for i, (heading, tables, figures) in enumerate(sections):
        parts.append(f'<section id="sec-{i}"><h2>{esc(heading)}</h2>')
        parts += [table.to_html() for table in tables]
        for name, caption, png, *reading in figures:
            data = base64.b64encode(png).decode("ascii")
            text = reading[0] if reading else ""
            below = f'<p class="reading"><strong>Reading:</strong> {esc(text)}</p>' if text else ""
            parts.append(
                f'<figure class="figure"><figcaption>{esc(caption)} <a href="{esc(name)}">{esc(name)}</a>'
                f'</figcaption><img alt="{esc(caption)}" src="data:image/png;base64,{data}">{below}</figure>'
            )
        parts.append("</section>")
    parts.append(f'<h2>Provenance</h2><div class="footer">{_inline(footer)}</div>')
    parts.append(
        f'<p class="footer">Every record, one row each: <a href="{esc(records_csv)}">{esc(records_csv)}</a></p>'
    )
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"


def _inline(text: str) -> str:
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text.strip()))
