"""One renderer for every report table: Markdown, LaTeX and HTML from the same `ReportTable`.

Usage (any pandas DataFrame works; the index becomes the first column, named by `frame.index.name`)::

    from benchmark.render import Cell, ReportTable

    frame = pd.DataFrame({"GANomaly": [Cell("0.9012", ref="0.9890", bold=True), 0.5], "MemAE": ["0.8 ± 0.1", None]},
                         index=pd.Index(["0", "mean"], name="normal class"))
    table = ReportTable(caption="AUROC on MNIST, ours (paper)", label="table1_mnist_auroc", frame=frame,
                        notes="Bold: best complete mean.")
    table.to_markdown(); table.to_latex(); table.to_html()

Cells may be `Cell` (a value with an optional reference value shown "(ref)", a note shown "[note]" and a
bold flag), plain strings (a "±" becomes `$\\pm$` in LaTeX, a leading minus `$-$`), numbers (printed
with `digits` decimals) or None / NaN (an en dash). `bold` is an optional boolean frame (same index and
columns) that bolds cells besides `Cell.bold`. `column_groups` [(title, n_columns), ...] puts a
spanning header over consecutive columns (a flattened "title: column" header in Markdown). Every name
and note is escaped for LaTeX (`_ % & # $ { } ~ ^ \\`) and HTML.

The LaTeX output is a complete `table` float (centred, `\\caption`, `\\label{tab:<label>}`, booktabs
rules, notes below). Its first lines are comments naming what it needs: only `booktabs` on top of a
plain `article`, plus `graphicx` in the rare case a table is too wide to fit at `\\scriptsize` and is
scaled with `\\resizebox`. The font size (`\\small`, `\\footnotesize` or `\\scriptsize`) and the column
separation are chosen from an estimate of the table's width so it fits the 345 pt text width of a
one-column 10 pt article. A header wider than its column's cells may be set on two lines, broken at a
space only: a method name ("Mem_GANomaly", "f-AnoGAN") always stays whole.

Report files: a `Section` is one report file (its tables, `Figure`s and footer) and one part of the HTML
page; a `Producer` makes the sections of one kind from a `ReportContext` (one profile's records, read
once) and names the file stems it can write. `benchmark.reports.write_reports` writes them all.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import pandas as pd

DASH = "–"
TEXT_WIDTH_PT = 345.0  # \textwidth of a one-column article at 10 pt (letter and A4 alike)
# (command, \tabcolsep in pt, the smaller size of a stacked cell's reference / note lines), tried from
# the largest down, each with the width of 1 em of cmr10 metrics at that size: Computer Modern's small
# optical sizes are relatively wider (a digit is 4.6 pt in cmr9, 4.25 in cmr8, 4.0 in cmr7, 3.4 in cmr5).
_SIZES = (
    ("\\small", 9.25, 4.0, "\\scriptsize", 7.97),
    ("\\footnotesize", 8.5, 3.0, "\\scriptsize", 7.97),
    # Before shrinking the text, narrower gaps: a paper-sized table whose headers are whole method names
    # ("Mem_GANomaly" is never broken) then still fits at \footnotesize.
    ("\\footnotesize", 8.5, 2.0, "\\scriptsize", 7.97),
    ("\\scriptsize", 7.97, 2.5, "\\tiny", 6.8),
)
_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "--": "-{}-",  # an option such as --val-fraction, not an en dash
    DASH: "--",
    "—": "---",
    "±": r"$\pm$",
    "−": "$-$",
    "≥": r"$\geq$",
    "≤": r"$\leq$",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    "|": r"\textbar{}",
}
_LATEX_RE = re.compile("|".join(re.escape(k) for k in _LATEX_SPECIALS))


@dataclass(frozen=True)
class Cell:
    """One table cell: `text` (the value as printed), `ref` (a reference value, e.g. the paper's,
    shown in parentheses; None = no reference column, "" or DASH = reference missing), `note`
    (a short qualifier such as "2/10 classes", shown in brackets) and `bold`."""

    text: str
    ref: Optional[str] = None
    note: str = ""
    bold: bool = False


@dataclass
class ReportTable:
    """A table with everything its renderings need.

    Parameters
    ----------
    caption : str
        The caption, without a "Table N:" prefix (LaTeX numbers tables itself).
    label : str
        A key for `\\label{tab:<label>}` and the HTML anchor; letters, digits, `_`, `-`, `:`.
    frame : pandas.DataFrame
        The cells (see the module docstring); the index is the first column, `frame.index.name`
        its header.
    notes : str, optional
        Text printed under the table (legend of the marks used).
    bold : pandas.DataFrame of bool, optional
        Cells to print in bold, in addition to `Cell.bold` (by position: same shape as `frame`).
    column_groups : list of (str, int), optional
        Spanning headers over consecutive columns; the counts must add up to the column count.
    digits : int
        Decimals of float cells.
    """

    caption: str
    label: str
    frame: pd.DataFrame
    notes: str = ""
    bold: Optional[pd.DataFrame] = None
    column_groups: Optional[list[tuple[str, int]]] = None
    digits: int = 4
    _cells: list[list[Cell]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_:.\-]+", self.label):
            raise ValueError(f"table label {self.label!r}: use letters, digits, '_', '-', ':' or '.' only")
        if self.column_groups is not None and sum(n for _, n in self.column_groups) != self.frame.shape[1]:
            raise ValueError(
                f"column_groups span {sum(n for _, n in self.column_groups)} columns, "
                f"the frame has {self.frame.shape[1]}"
            )
        if self.bold is not None and self.bold.shape != self.frame.shape:
            raise ValueError(f"the bold mask has shape {self.bold.shape}, the frame {self.frame.shape}")
        self._cells = [[self._cell(i, j) for j in range(self.frame.shape[1])] for i in range(self.frame.shape[0])]

    def _cell(self, i: int, j: int) -> Cell:
        value = self.frame.iat[i, j]
        bold = bool(self.bold.iat[i, j]) if self.bold is not None else False
        if isinstance(value, Cell):
            return Cell(value.text, value.ref, value.note, value.bold or bold)
        return Cell(format_value(value, self.digits), None, "", bold)

    @property
    def index_name(self) -> str:
        """The index's name as text ("" when it has none)."""
        return "" if self.frame.index.name is None else str(self.frame.index.name)

    # ---- Markdown ----
    def to_markdown(self) -> str:
        """A GitHub-flavoured Markdown table: a bold caption line, the table, the notes."""
        headers = [str(c) for c in self.frame.columns]
        if self.column_groups:
            groups = [title for title, n in self.column_groups for _ in range(n)]
            headers = [f"{g}: {h}" if g else h for g, h in zip(groups, headers)]
        lines = [
            f"**{_md(self.caption)}**",
            "",
            "| " + " | ".join([_md(self.index_name)] + [_md(h) for h in headers]) + " |",
            "| " + " | ".join(["---"] + ["---:"] * len(headers)) + " |",
        ]
        for row, cells in zip(self.frame.index, self._cells):
            lines.append("| " + " | ".join([_md(str(row))] + [_md_cell(c) for c in cells]) + " |")
        if self.notes:  # below the table, so its line breaks (e.g. a list) can stay
            lines += ["", str(self.notes).replace("|", "\\|")]
        return "\n".join(lines) + "\n"

    # ---- LaTeX ----
    def to_latex(self) -> str:
        """A complete `table` float (see the module docstring for what it needs)."""
        size, small, colsep, index_lines, headers, groups, scale = self._latex_size()
        ncol = self.frame.shape[1]
        lines = [
            f"% {latex_escape(self.caption)}",
            "% Needs \\usepackage{booktabs}"
            + (" and \\usepackage{graphicx}" if scale else "")
            + " in a one-column article; nothing else.",
            "\\begin{table}[htbp]",
            "\\centering",
            f"\\caption{{{latex_escape(self.caption)}}}",
            f"\\label{{tab:{self.label}}}",
            size,
            f"\\setlength{{\\tabcolsep}}{{{colsep:g}pt}}",
        ]
        if scale:
            lines.append("\\resizebox{\\textwidth}{!}{%")
        lines += [f"\\begin{{tabular}}{{l{'r' * ncol}}}", "\\toprule"]
        if self.column_groups:
            spans, rules, start = [""], [], 2
            for (title, n), title_lines in zip(self.column_groups, groups):
                spans.append(f"\\multicolumn{{{n}}}{{c}}{{{_latex_lines(title_lines, 'c')}}}")
                if title:
                    rules.append(f"\\cmidrule(lr){{{start}-{start + n - 1}}}")
                start += n
            lines.append(" & ".join(spans) + " \\\\")
            lines.append(" ".join(rules))
        lines.append(" & ".join([_latex_lines(index_lines, "l")] + [_latex_lines(h, "r") for h in headers]) + " \\\\")
        lines.append("\\midrule")
        for i, (row, cells) in enumerate(zip(self.frame.index, self._cells)):
            if str(row) == "mean" and i > 0:
                lines.append("\\midrule")
            lines.append(" & ".join([latex_escape(str(row))] + [_latex_cell(c, small) for c in cells]) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}" + ("}" if scale else "")]
        if self.notes:
            lines.append(
                f"\\par\\smallskip\\parbox{{\\linewidth}}{{\\footnotesize\\raggedright {latex_escape(self.notes)}}}"
            )
        lines.append("\\end{table}")
        return "\n".join(lines) + "\n"

    def _layout(
        self, points: float, colsep: float, small_points: float
    ) -> tuple[list[str], list[list[str]], list[list[str]], float]:
        """(index header lines, column header lines, group title lines, table width in pt) at one
        font size. A header much wider than its column's cells, or a group title wider than its
        columns, is broken in two at a space only ("false-alarm" over "rate"), so a name such as
        "Mem_GANomaly", "f-AnoGAN" or "pyod:knn" always stays whole on one line."""

        def split(text: str, room: float) -> list[str]:
            breaks = [i + 1 for i, ch in enumerate(text[:-1]) if ch == " " and 3 <= i and len(text) - i >= 4]
            if not breaks or _width_em(text) * points <= room:
                return [text]
            cut = min(breaks, key=lambda i: max(_width_em(text[:i].rstrip()), _width_em(text[i:])))
            return [text[:cut].rstrip(), text[cut:]]

        def width(lines: list[str]) -> float:
            return max(_width_em(line) for line in lines) * points

        rows = max([_width_em(str(r)) * points for r in self.frame.index] or [0.0])
        index_lines = split(self.index_name, 1.3 * rows)
        spans = [max(rows, width(index_lines)) + 2 * colsep]
        headers = []
        for j, col in enumerate(self.frame.columns):
            cells = max([_cell_width_pt(cells[j], points, small_points) for cells in self._cells] or [0.0])
            headers.append(split(str(col), 1.3 * cells))
            spans.append(max(cells, width(headers[-1])) + 2 * colsep)
        groups = []
        for (title, n), start in zip(self.column_groups or [], _starts(self.column_groups or [])):
            inside = sum(spans[1 + start : 1 + start + n]) - 2 * colsep
            groups.append(split(title, inside))
            spans[start + n] += max(0.0, width(groups[-1]) - inside)  # a wider title widens the last column
        return index_lines, headers, groups, sum(spans)

    def _latex_size(self) -> tuple[str, str, float, list[str], list[list[str]], list[list[str]], bool]:
        """(size command, stacked-line size command, \\tabcolsep, index header, column headers,
        group titles, scale to \\textwidth?) for the largest size that fits."""
        for command, points, colsep, small, small_points in _SIZES:
            index_lines, headers, groups, total = self._layout(points, colsep, small_points)
            if total <= TEXT_WIDTH_PT * 0.97:
                return command, small, colsep, index_lines, headers, groups, False
        return command, small, colsep, index_lines, headers, groups, True

    # ---- HTML ----
    def to_html(self) -> str:
        """A `<figure>` holding the caption and an HTML `<table>` (classes for the page's CSS)."""
        esc = html.escape
        out = [
            f'<figure class="table" id="tab-{esc(self.label)}">',
            f"<figcaption>{esc(self.caption)}</figcaption>",
            "<table>",
            "<thead>",
        ]
        if self.column_groups:
            out.append(
                "<tr><th></th>"
                + "".join(f'<th colspan="{n}" class="group">{esc(t)}</th>' for t, n in self.column_groups)
                + "</tr>"
            )
        out.append(
            f"<tr><th>{esc(self.index_name)}</th>"
            + "".join(f"<th>{esc(str(c))}</th>" for c in self.frame.columns)
            + "</tr>"
        )
        out += ["</thead>", "<tbody>"]
        for row, cells in zip(self.frame.index, self._cells):
            cls = ' class="mean"' if str(row) == "mean" else ""
            out.append(
                f"<tr{cls}><th>{esc(str(row))}</th>" + "".join(f"<td>{_html_cell(c)}</td>" for c in cells) + "</tr>"
            )
        out += ["</tbody>", "</table>"]
        if self.notes:
            out.append('<p class="notes">' + esc(self.notes).replace("\n", "<br>\n") + "</p>")
        out.append("</figure>")
        return "\n".join(out) + "\n"


def format_value(value: Any, digits: int = 4) -> str:
    """A cell value as text.

    Parameters
    ----------
    value : Any
        The cell value.
    digits : int, default=4
        Decimals of floats.

    Returns
    -------
    str
        Floats with `digits` decimals, None / NaN as an en dash.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    try:
        if pd.isna(value):
            return DASH
    except (TypeError, ValueError):
        pass
    return str(value)


def latex_escape(text: str) -> str:
    """Text -> LaTeX source that prints it.

    Parameters
    ----------
    text : str
        Plain text.

    Returns
    -------
    str
        LaTeX source: specials escaped, en dash as `--`, a typed `--` kept as two hyphens (`-{}-`), ± as
        `$\\pm$`, a minus sign before a digit as `$-$`.
    """
    text = _LATEX_RE.sub(lambda m: _LATEX_SPECIALS[m.group(0)], str(text))
    return re.sub(r"(?<![\w)])-(?=\d|\.\d)", "$-$", text)


def _starts(groups: list[tuple[str, int]]) -> list[int]:
    starts, s = [], 0
    for _, n in groups:
        starts.append(s)
        s += n
    return starts


# Widths of Computer Modern Roman glyphs in em (cmr10's metrics, rounded); others count 0.75.
_CM_WIDTHS = dict(
    zip(
        "abcdefghijklmnopqrstuvwxyz",
        (
            0.5,
            0.556,
            0.444,
            0.556,
            0.444,
            0.306,
            0.5,
            0.556,
            0.278,
            0.306,
            0.528,
            0.278,
            0.833,
            0.556,
            0.5,
            0.556,
            0.528,
            0.392,
            0.394,
            0.389,
            0.556,
            0.528,
            0.722,
            0.528,
            0.528,
            0.444,
        ),
    )
)
_CM_WIDTHS.update(
    dict(
        zip(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
            (
                0.75,
                0.708,
                0.722,
                0.764,
                0.681,
                0.653,
                0.785,
                0.75,
                0.361,
                0.514,
                0.778,
                0.625,
                0.917,
                0.75,
                0.778,
                0.681,
                0.778,
                0.736,
                0.556,
                0.722,
                0.75,
                0.75,
                1.028,
                0.75,
                0.75,
                0.611,
            ),
        )
    )
)
_CM_WIDTHS.update(
    {
        **{d: 0.5 for d in "0123456789"},
        " ": 0.333,
        ".": 0.278,
        ",": 0.278,
        ":": 0.278,
        ";": 0.278,
        "(": 0.389,
        ")": 0.389,
        "[": 0.278,
        "]": 0.278,
        "/": 0.5,
        "-": 0.333,
        "+": 0.778,
        "_": 0.5,
        "'": 0.278,
        "%": 0.833,
        "±": 0.778,
        DASH: 0.5,
        "=": 0.778,
        "&": 0.778,
        "!": 0.278,
        "?": 0.472,
    }
)


def _width_em(text: str, bold: bool = False) -> float:
    """Width of `text` in em of Computer Modern Roman (bold about 15 % wider)."""
    return sum(_CM_WIDTHS.get(ch, 0.75) for ch in text) * (1.15 if bold else 1.0)


def _cell_width_pt(cell: Cell, points: float, small_points: float) -> float:
    widths = [_width_em(cell.text, cell.bold) * points]
    if cell.ref is not None:
        widths.append(_width_em(f"({cell.ref or DASH})") * small_points)
    if cell.note:
        widths.append(_width_em(f"[{cell.note}]") * small_points)
    return max(widths)


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_cell(cell: Cell) -> str:
    text = f"**{cell.text}**" if cell.bold and cell.text != DASH else cell.text
    if cell.note:
        text += f" [{cell.note}]"
    if cell.ref is not None:
        text += f" ({cell.ref or DASH})"
    return _md(text)


def _latex_lines(lines: list[str], align: str) -> str:
    """A header of one or two lines (two: a nested tabular aligned on its bottom line)."""
    if len(lines) == 1:
        return latex_escape(lines[0])
    return (
        f"\\begin{{tabular}}[b]{{@{{}}{align}@{{}}}}"
        + "\\\\".join(latex_escape(line) for line in lines)
        + "\\end{tabular}"
    )


def _latex_cell(cell: Cell, small: str = "\\scriptsize") -> str:
    text = latex_escape(cell.text)
    if cell.bold and cell.text != DASH:
        text = f"\\textbf{{{text}}}"
    lines = [text]
    if cell.note:
        lines.append(f"{{{small}[{latex_escape(cell.note)}]}}")
    if cell.ref is not None:
        lines.append(f"{{{small}({latex_escape(cell.ref or DASH)})}}")
    if len(lines) == 1:
        return text
    # A nested one-column tabular stacks ours over the reference: narrow columns, plain LaTeX.
    return "\\begin{tabular}[t]{@{}r@{}}" + "\\\\".join(lines) + "\\end{tabular}"


def _html_cell(cell: Cell) -> str:
    text = html.escape(cell.text)
    if cell.bold and cell.text != DASH:
        text = f"<strong>{text}</strong>"
    if cell.note:
        text += f' <span class="note">[{html.escape(cell.note)}]</span>'
    if cell.ref is not None:
        text += f'<br><span class="ref">({html.escape(cell.ref or DASH)})</span>'
    return text


# ---- report files ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Figure:
    """One figure of a report section: written to ``<stem><suffix>.png`` beside its Markdown file and
    embedded in index.html with its caption.

    Parameters
    ----------
    stem : str
        The file name without the protocol suffix and extension, e.g. ``"roc_mnist"``.
    caption : str
        The caption on the page.
    png : bytes
        The image.
    reading : str, optional
        A line in plain words shown under the image (e.g. what a test concludes); none by default.
    """

    stem: str
    caption: str
    png: bytes
    reading: str = ""

    def to_latex(self, suffix: str = "") -> str:
        """A `figure` float including ``<stem><suffix>.png`` (beside the .tex file), its caption and reading.

        Parameters
        ----------
        suffix : str, default=""
            The file names' protocol suffix (`ReportContext.suffix`).

        Returns
        -------
        str
            The float; it needs ``\\usepackage{graphicx}``.
        """
        caption = latex_escape(self.caption + (f" {self.reading}" if self.reading else ""))
        return "\n".join(["\\begin{figure}[htbp]", "\\centering",
                          f"\\includegraphics[width=\\linewidth]{{{self.stem}{suffix}.png}}",
                          f"\\caption{{{caption}}}", f"\\label{{fig:{self.stem}{suffix}}}",
                          "\\end{figure}"]) + "\n"


@dataclass
class Section:
    """One report file and one section of index.html: a title, its tables, its figures and a footer.

    Written as ``<stem><suffix>.md`` (plus ``<stem><suffix>.tex`` with every table when `latex`), each
    figure as ``<figure stem><suffix>.png``; `suffix` is the protocol's (`ReportContext.suffix`).

    Parameters
    ----------
    stem : str
        The file name without the protocol suffix and extension, e.g. ``"seeds_mnist"``.
    title : str
        The Markdown file's heading and the page section's.
    tables : list of ReportTable
        In order.
    footer : str
        The Markdown text after the tables (usually ends with `ReportContext.footer`, the provenance);
        not on the page, which shows the provenance once.
    figures : list of Figure
        In order, after the tables on the page.
    latex : bool
        Whether the tables are also written as a LaTeX file.
    latex_figures : bool
        Whether that LaTeX file also includes the figures (`Figure.to_latex`; it then needs graphicx and
        the PNG files beside it). Off by default: the other sections' LaTeX holds their tables only.
    """

    stem: str
    title: str
    tables: list[ReportTable] = field(default_factory=list)
    footer: str = ""
    figures: list[Figure] = field(default_factory=list)
    latex: bool = False
    latex_figures: bool = False

    def to_markdown(self, suffix: str = "") -> str:
        """The Markdown file: heading, tables, each figure with its reading (figures with a reading only:
        the others are shown on the page alone), footer.

        Parameters
        ----------
        suffix : str, default=""
            The file names' protocol suffix, for the figures' links.

        Returns
        -------
        str
            The Markdown text.
        """
        pictures = [f"![{_md(figure.caption)}]({figure.stem}{suffix}.png)\n\n{figure.reading}\n"
                    for figure in self.figures if figure.reading]
        return "\n".join([f"# {self.title}\n"] + [table.to_markdown() for table in self.tables] + pictures
                         + [self.footer])

    def to_latex(self, suffix: str = "") -> str:
        """The LaTeX file: one `table` float per table, then (with `latex_figures`) one `figure` float per
        figure, after a first line naming the packages it needs.

        Parameters
        ----------
        suffix : str, default=""
            The file names' protocol suffix, for the figures' file names.

        Returns
        -------
        str
            The LaTeX source.
        """
        tables = "\n".join(table.to_latex() for table in self.tables)
        if not (self.latex_figures and self.figures):
            return tables
        head = ("% Needs \\usepackage{booktabs} and \\usepackage{graphicx} in a one-column article, and the PNG "
                "files beside this one.\n")
        return head + tables + "\n" + "\n".join(figure.to_latex(suffix) for figure in self.figures)


@dataclass(frozen=True)
class ReportContext:
    """What every section producer reads: one profile's records of one protocol, read once.

    Parameters
    ----------
    results_dir : Path
        The results root (holding `profile`/).
    profile : str
        The profile folder's name, with any "+tag".
    protocol : str
        The records' protocol.
    frame : pandas.DataFrame
        The records, `benchmark.records.load_records(results_dir, profile, protocol)[0]`.
    footer : str
        The provenance text every Markdown file ends with.
    """

    results_dir: Path
    profile: str
    protocol: str
    frame: pd.DataFrame
    footer: str = ""

    @property
    def suffix(self) -> str:
        """The file names' protocol suffix: none for the paper's protocol, ``_<protocol>`` otherwise."""
        return "" if self.protocol == "paper" else f"_{self.protocol}"

    @property
    def where(self) -> str:
        """"<profile> profile, <protocol> protocol", for titles and captions."""
        return f"{self.profile} profile, {self.protocol} protocol"


@dataclass(frozen=True)
class Producer:
    """One kind of report section: how to make its sections, and every file stem it can write.

    `benchmark.reports.write_reports` runs its producers in order (the page shows their sections in
    that order) and removes the files of the listed stems that no producer wrote this time (tables of
    a dataset that no longer has records, say). A new kind of table or figure is one new producer.

    Parameters
    ----------
    name : str
        What it makes, for messages.
    sections : callable
        ``sections(context) -> list[Section]``; an empty list when the records give it nothing to show.
    stems : tuple of str
        Every `Section.stem` and `Figure.stem` it can produce, for any dataset; ``<stem><suffix>.md``,
        ``.tex`` and ``.png`` files not written in a run are removed as stale.
    """

    name: str
    sections: Callable[[ReportContext], list[Section]]
    stems: tuple[str, ...]
