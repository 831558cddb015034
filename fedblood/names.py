"""Center names (folder names, i.e. anything) made safe for file names, markdown and figures.

- :func:`slug` for file and directory names (figures, checkpoint stages): a name that is
  already safe (letters, digits, ``_ . -``) is kept as it is, so existing outputs keep their
  paths; any other name gets its unsafe characters replaced and a short digest of the original,
  so two names never share a slug.
- :func:`md` for markdown text and table cells: HTML-escaped (nothing raw reaches a renderer),
  newlines folded, and the characters that end a cell or start a link or emphasis escaped.
- :func:`code` for an inline code span, :func:`plot` for matplotlib text (no mathtext).
"""

import hashlib
import html
import re

_SAFE = re.compile(r'[A-Za-z0-9_][A-Za-z0-9_.-]*')


def slug(name: str) -> str:
  """A file-name-safe form of ``name``: ``name`` itself if safe, else a sanitised + digest one."""
  name = str(name)
  if _SAFE.fullmatch(name) and len(name) <= 100:
    return name
  digest = hashlib.sha256(name.encode()).hexdigest()[:8]
  return f'{re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60].strip("._")}-{digest}'


def _one_line(name) -> str:
  return re.sub(r'\s*[\r\n\t\v\f]+\s*', ' ', str(name))


def md(name) -> str:
  """``name`` as literal markdown text (safe in a table cell, a heading, an image's alt text)."""
  text = html.escape(_one_line(name), quote=False)
  return re.sub(r'([\\`*\[\]|])', r'\\\1', text)


def code(name) -> str:
  """``name`` as a markdown inline code span (its backticks and line breaks replaced)."""
  return '`' + _one_line(name).replace('`', "'") + '`'


def plot(name) -> str:
  """``name`` for matplotlib text: one line, ``$`` escaped (no mathtext)."""
  return _one_line(name).replace('$', r'\$')
