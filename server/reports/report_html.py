"""``report.html``: the run report's Markdown rendered as one self-contained page.

markdown-it-py (CommonMark plus GFM tables; installed with rich) renders the same text
as ``report.md``; every plot it links is inlined as a base64 PNG, so the page opens from
disk in any browser, copied anywhere, with no server and no script.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable

from markdown_it import MarkdownIt
from markdown_it.token import Token

from fedcpt.runfolder.paths import RunFolder

STYLE = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f;
       margin: 0; background: #f6f7f9; }
main { max-width: 1000px; margin: 0 auto; padding: 24px 32px 48px; background: #fff; }
h1 { font-size: 26px; margin-top: 8px; } h2 { font-size: 20px; margin-top: 32px;
     border-bottom: 1px solid #e2e4e8; padding-bottom: 4px; }
table { border-collapse: collapse; margin: 12px 0; font-size: 13.5px; }
th, td { border: 1px solid #d9dce1; padding: 4px 9px; text-align: left; vertical-align: top; }
th { background: #eef1f5; } tr:nth-child(even) td { background: #fafbfc; }
img { width: 470px; max-width: 100%; height: auto; margin: 4px 6px 4px 0;
      border: 1px solid #e2e4e8; }
code { background: #f0f2f5; padding: 1px 4px; border-radius: 3px; }
"""


def _inline_images(tokens: Iterable[Token], folder: RunFolder) -> None:
    """Point each image at its PNG's bytes instead of its file beside the report."""
    for token in tokens:
        for child in token.children or []:
            if child.type == "image":
                png = folder.plot(str(child.attrs["src"])).read_bytes()
                child.attrs["src"] = "data:image/png;base64," + base64.b64encode(png).decode()


def markdown_to_html(markdown: str, folder: RunFolder, title: str) -> str:
    """The page for ``markdown`` (raw HTML in it is escaped, not passed through)."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(markdown)
    _inline_images(tokens, folder)
    body = md.renderer.render(tokens, md.options, {})
    return ("<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n"
            f"<body>\n<main>\n{body}</main>\n</body>\n</html>\n")
