"""The report's text: values formatted for people, document blocks, Markdown and HTML.

Used by ``python -m finqa_exp.report study=NAME`` (finqa_exp/report/build.py). A report is a list
of blocks (headings, paragraphs, bullets, tables, images) rendered twice, by to_markdown
and to_html, so both files always say the same thing. Nothing here reads a store or
knows what a study is: finqa_exp/report/sections.py decides what the blocks say.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

NONE = "-"  # a value the stores do not have


# ----------------------------------------------------------------------------- values


def fmt_value(value: Any) -> str:
    """A param value as a person reads it: 3 significant digits, exponents for small floats."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.3g}"
    return f"{value:.2e}"


def fmt_num(value: float | None, digits: int = 4) -> str:
    return NONE if value is None else f"{value:.{digits}f}"


def fmt_interval(low: float | None, high: float | None) -> str:
    """A confidence interval, ``0.1303 to 0.1816``."""
    return NONE if low is None or high is None else f"{low:.4f} to {high:.4f}"


def fmt_pct(value: float | None) -> str:
    return NONE if value is None else f"{value:+.1f}%"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return NONE
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


# ----------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class Code:
    text: str


@dataclass(frozen=True)
class Strong:
    text: str


Inline = str | Code | Strong
Text = Inline | tuple[Inline, ...]


@dataclass(frozen=True)
class Heading:
    level: int
    text: Text


@dataclass(frozen=True)
class Para:
    text: Text


@dataclass(frozen=True)
class Bullets:
    items: tuple[Text, ...]


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[Text, ...], ...]
    numeric: tuple[bool, ...] = ()  # right-aligned columns

    def is_numeric(self, column: int) -> bool:
        return bool(self.numeric) and self.numeric[column]


@dataclass(frozen=True)
class Image:
    file: str
    alt: str


Block = Heading | Para | Bullets | Table | Image


# ----------------------------------------------------------------------------- rendering
# Text from the stores (answers, reasons) is escaped for each format.

_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|#])")


def md_escape(text: str) -> str:
    return _MD_SPECIAL.sub(r"\\\1", text)


def _inline(
    text: Text,
    plain: Callable[[str], str],
    code: Callable[[str], str],
    strong: Callable[[str], str],
) -> str:
    """Inline text in one format, each part written by its function. A line break would
    end a Markdown table row or list item, so both formats write it as <br>."""
    out = []
    for part in text if isinstance(text, tuple) else (text,):
        if isinstance(part, Code):
            out.append(code(part.text))
        elif isinstance(part, Strong):
            out.append(strong(part.text))
        else:
            out.append(plain(part))
    return "".join(out).replace("\r", "").replace("\n", "<br>")


def md_inline(text: Text) -> str:
    # Inside backticks Markdown shows every character as is: code is not escaped.
    return _inline(text, md_escape, lambda s: f"`{s}`", lambda s: f"**{md_escape(s)}**")


def html_inline(text: Text) -> str:
    return _inline(
        text,
        html.escape,
        lambda s: f"<code>{html.escape(s)}</code>",
        lambda s: f"<strong>{html.escape(s)}</strong>",
    )


def to_markdown(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {md_inline(b.text)}")
        elif isinstance(b, Para):
            out.append(md_inline(b.text))
        elif isinstance(b, Bullets):
            out.append("\n".join(f"- {md_inline(item)}" for item in b.items))
        elif isinstance(b, Table):
            align = [("---:" if b.is_numeric(i) else "---") for i in range(len(b.header))]
            lines = [
                "| " + " | ".join(md_inline(h) for h in b.header) + " |",
                "| " + " | ".join(align) + " |",
                # A line break inside a cell would end the table row: <br> keeps it.
                *(
                    "| " + " | ".join(md_inline(c).replace("\n", "<br>") for c in row) + " |"
                    for row in b.rows
                ),
            ]
            out.append("\n".join(lines))
        else:
            out.append(f"![{b.alt}]({b.file})")
    return "\n\n".join(out) + "\n"


CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #1f2328; line-height: 1.5; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.92em; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { background: #f6f8fa; padding: 1px 4px; border-radius: 4px; font-size: 0.9em;
       overflow-wrap: anywhere; }
img { max-width: 100%; border: 1px solid #eaeef2; margin: 0.4em 0 1em; }
h1, h2 { border-bottom: 1px solid #d0d7de; padding-bottom: 0.2em; }
"""


def to_html(blocks: Sequence[Block], title: str, images: Mapping[str, bytes]) -> str:
    """One self-contained page: styles inline, PNGs embedded as base64."""
    body: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{html_inline(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            body.append(f"<p>{html_inline(b.text)}</p>")
        elif isinstance(b, Bullets):
            items = "".join(f"<li>{html_inline(item)}</li>" for item in b.items)
            body.append(f"<ul>{items}</ul>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{html_inline(h)}</th>" for h in b.header)
            rows = []
            for row in b.rows:
                cells = "".join(
                    f"<td{' class=num' if b.is_numeric(i) else ''}>{html_inline(c)}</td>"
                    for i, c in enumerate(row)
                )
                rows.append(f"<tr>{cells}</tr>")
            body.append(
                f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
            )
        else:
            data = base64.b64encode(images[b.file]).decode("ascii")
            body.append(f'<img alt="{html.escape(b.alt)}" src="data:image/png;base64,{data}">')
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
