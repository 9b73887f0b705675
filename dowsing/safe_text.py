"""User text made safe for the places it is shown or exported.

Domain names and facts come from the user, from imported files and from
shared links, so they are data, never markup: Markdown rendering would turn
`![x](http://...)` into an outside request and `[a](javascript:...)` into a
link, and a spreadsheet opens a CSV cell that starts with `=` as a formula.
"""
from __future__ import annotations

import re

# CommonMark lets a backslash escape any ASCII punctuation character; these are the
# ones that start Markdown, HTML, LaTeX ($) or Streamlit's own directives (:red[...],
# :material/icon:) in the text Streamlit renders.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$:&=\"'@])")
# Streamlit turns some text into markup after the Markdown is parsed, so past any
# backslash escape: `:material_icon:`, `:streamlit:` and emoji shortcodes between
# colons, and GFM's bare links (http://..., www...., a@b.c). A word joiner
# (U+2060, invisible, zero width) on both sides of each ':', after each '@' and
# inside 'www.' breaks every one of them (and any scheme such as "javascript:")
# and leaves the text as it reads.
_WORD_JOINER = "\u2060"
_AFTER_MARKUP = re.compile(r"(\\[:@]|(?<![A-Za-z0-9])www(?=\\\.))", re.IGNORECASE)


def _joined(match: re.Match) -> str:
    text = match.group(0)
    return _WORD_JOINER + text + _WORD_JOINER if text == "\\:" else text + _WORD_JOINER
# A cell a spreadsheet reads as a formula (OWASP's CSV injection list).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")


def md_escape(text) -> str:
    """`text` as literal Markdown: every special character backslash-escaped,
    line breaks folded to spaces, and a word joiner where Streamlit would
    still make an icon, an emoji or a link of it, so it renders as the
    characters it holds."""
    flat = " ".join(str(text).split())
    escaped = _MARKDOWN_SPECIAL.sub(r"\\\1", flat)
    return _AFTER_MARKUP.sub(_joined, escaped)


def md_lines(text) -> str:
    """Several lines of user text (a message listing problems, one a line) as
    literal Markdown, each escaped by `md_escape`, kept on lines of their own."""
    return "  \n".join(md_escape(line) for line in str(text).splitlines() if line.strip())


def chart_text(text) -> str:
    """User text as a Plotly chart shows it, character for character.
    Plotly reads its own markup in every label, legend entry, tick and hover
    line (<b>, <br>, <a href=...>; an entity such as &lt; turns into < before
    that), and %{...} in a hover template pulls in a value: a domain's name
    could bold, break, link or rewrite the chart a stakeholder is shown. A
    word joiner after each <, & and % breaks those patterns and shows
    nothing."""
    text = str(text)
    for special in ("&", "<", "%"):  # "&" first: the others add no "&"
        text = text.replace(special, special + _WORD_JOINER)
    return text


def csv_cell(value):
    """A CSV cell a spreadsheet will not run: text that starts like a formula gets a
    leading apostrophe (shown as text by Excel, LibreOffice and Sheets); numbers and
    other text pass unchanged. Text of apostrophes before a formula start gets one
    more, so `csv_value` gives every text back as it was."""
    if isinstance(value, str) and value.lstrip("'").startswith(_FORMULA_START):
        return "'" + value
    return value


def csv_value(cell: str) -> str:
    """The text `csv_cell` was given for `cell`: the apostrophe it added comes
    off (only where the rest starts like a formula); any other cell is as read."""
    if cell.startswith("'") and cell.lstrip("'").startswith(_FORMULA_START):
        return cell[1:]
    return cell
