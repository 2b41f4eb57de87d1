"""A report as sections of text, tables and images, written as one self-contained HTML page
(PNG images inlined as base64, CSS inline, no scripts, no external resources) or as
Markdown with the images as files beside it."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field

import pandas as pd
from matplotlib.figure import Figure

from vfx_ray.report.tables import markdown_table

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto;
       max-width: 1150px; padding: 1.5em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
nav ol { columns: 2; } dl.meta { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dl.meta dt { font-weight: 600; } dl.meta dd { margin: 0; font-family: ui-monospace, monospace; word-break: break-all; }
table.data { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
table.data th, table.data td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
table.data th { background: #f2f4f7; } table.data tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption, .caption { color: #555; font-size: 0.9em; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.5em 0.8em; margin: 0.8em 0; }
"""


@dataclass
class Image:
    name: str  # file stem of the Markdown copy; unique in a report
    png: bytes
    caption: str


@dataclass
class Section:
    id: str
    title: str
    text: list[str] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    images: list[Image] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def png(fig: Figure, dpi: int = 96) -> bytes:
    """The figure as PNG bytes (Agg, no pyplot, no display needed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _html_section(s: Section) -> str:
    parts = [f'<section id="{html.escape(s.id)}">', f"<h2>{html.escape(s.title)}</h2>"]
    parts += [f'<p class="note">{html.escape(n)}</p>' for n in s.notes]
    parts += [f"<p>{html.escape(t)}</p>" for t in s.text]
    for caption, frame in s.tables:
        parts.append(f'<p class="caption">{html.escape(caption)}</p>')
        parts.append(frame.to_html(index=False, escape=True, border=0, classes="data", na_rep="—"))
    for im in s.images:
        data = base64.b64encode(im.png).decode("ascii")
        parts.append(f'<figure id="fig-{html.escape(im.name)}"><img src="data:image/png;base64,{data}" '
                     f'alt="{html.escape(im.caption)}"><figcaption>{html.escape(im.caption)}</figcaption></figure>')
    parts.append("</section>")
    return "\n".join(parts)


def to_html(title: str, meta: list[tuple[str, str]], sections: list[Section]) -> str:
    """One HTML page that needs nothing else: open it from disk, mail it, archive it."""
    toc = "".join(f'<li><a href="#{html.escape(s.id)}">{html.escape(s.title)}</a></li>' for s in sections)
    dl = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in meta)
    body = "\n".join(_html_section(s) for s in sections)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f'<header id="top"><h1>{html.escape(title)}</h1><dl class="meta">{dl}</dl></header>\n'
            f"<nav><ol>{toc}</ol></nav>\n<main>\n{body}\n</main>\n</body>\n</html>\n")


def to_markdown(title: str, meta: list[tuple[str, str]], sections: list[Section], figure_dir: str = "figures") -> str:
    """Markdown summary; images are referenced as ``figure_dir/<name>.png`` (written by the caller)."""
    out = [f"# {title}", ""] + [f"- **{k}**: `{v}`" for k, v in meta] + [""]
    for s in sections:
        out += [f'<a id="{s.id}"></a>', "", f"## {s.title}", ""]
        out += [f"> **Note:** {n}\n" for n in s.notes]
        out += [t + "\n" for t in s.text]
        for caption, frame in s.tables:
            out += [f"*{caption}*", "", markdown_table(frame.fillna("—")), ""]
        out += [f"![{im.caption}]({figure_dir}/{im.name}.png)\n\n*{im.caption}*\n" for im in s.images]
    return "\n".join(out)
