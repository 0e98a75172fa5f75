"""One report document, rendered as Markdown (report.md, the console) and as HTML (report.html).

A document is a list of blocks: `Heading`, `Text` (with `code` spans in backticks), `Table` and
`Image` (a PNG beside the document, referenced by relative path). The HTML is self-contained: its
style is inline and it loads nothing but those PNGs.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Text:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    css_class: str = ""


@dataclass
class Image:
    file: str  # relative to the document
    caption: str

    @property
    def alt(self) -> str:
        return self.file.rsplit(".", 1)[0].replace("_", " ")


Block = Heading | Text | Table | Image

_STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1400px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.3em 0.6em; text-align: left; }
th { background: #eee; }
td.num { font-variant-numeric: tabular-nums; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #555; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def table_markdown(t: Table) -> str:
    rows = [t.header, *t.rows]
    lines = ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * len(t.header))
    return "\n".join(lines)


def to_markdown(blocks: list[Block]) -> str:
    out = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + b.text)
        elif isinstance(b, Text):
            out.append(b.text)
        elif isinstance(b, Table):
            out.append(table_markdown(b))
        else:
            out.append(f"![{b.alt}]({b.file})\n\n{b.caption}")
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    """Escaped text with `code` spans."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))


def _table_html(t: Table) -> str:
    cls = f' class="{html.escape(t.css_class)}"' if t.css_class else ""
    head = "".join(f"<th>{_inline(c)}</th>" for c in t.header)
    body = "".join("<tr>" + "".join(f'<td class="num">{_inline(c)}</td>' for c in row) + "</tr>"
                   for row in t.rows)
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _block_html(b: Block) -> str:
    if isinstance(b, Heading):
        return f"<h{b.level}>{_inline(b.text)}</h{b.level}>"
    if isinstance(b, Text):
        return f"<p>{_inline(b.text)}</p>"
    if isinstance(b, Table):
        return _table_html(b)
    return (f'<figure><img src="{html.escape(b.file)}" alt="{html.escape(b.alt)}">'
            f"<figcaption>{_inline(b.caption)}</figcaption></figure>")


def to_html(blocks: list[Block], title: str) -> str:
    body = "\n".join(_block_html(b) for b in blocks)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n"
            f"<body>\n{body}\n</body></html>\n")
