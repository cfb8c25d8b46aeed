"""Full-text search: the query language, and the database objects that keep an index.

The database maintains the index itself, so every write path (single, bulk, COPY,
upsert, hand-written SQL) keeps it current:

- PostgreSQL: a stored generated ``tsvector`` column ``dataflow_search_<hash>`` with a
  GIN index; ranking with ``ts_rank``.
- SQLite: an FTS5 external-content table ``<table>_fts_<hash>`` over the model's table,
  kept in step by three triggers; ranking with ``bm25``.

The hash covers the searchable fields and the text-search configuration, so changing
either makes the migration build a new index (and drop the old one, which is derived
data only).

A query is parsed here, never handed to the engine as written: words, ``"phrases"``,
``-word`` / ``-"phrase"`` to exclude, ``word*`` for a prefix. Every word is split into
letter/digit tokens the way both engines split text (so ``ada@example.com`` is the
phrase ``"ada example com"``), and each engine gets a query made of quoted tokens only.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from ._errors import ValidationError
from ._model import ModelInfo

__all__ = [
    "MAX_QUERY_CHARS",
    "MAX_QUERY_TERMS",
    "SearchSpec",
    "Term",
    "fts5_query",
    "parse_query",
    "search_spec",
    "tsquery_text",
]

#: The longest query accepted (characters), and the most terms in one.
MAX_QUERY_CHARS = 1000
MAX_QUERY_TERMS = 32

_TOKEN = re.compile(r"[^\W_]+")
# a phrase in quotes (optionally negated, optionally a prefix), or a bare word
_PART = re.compile(r'(-?)"([^"]*)"(\*?)|(\S+)')


@dataclass(frozen=True)
class Term:
    """One term of a query: its tokens in order (several tokens make a phrase), whether
    it excludes, and whether its last token is a prefix."""

    tokens: tuple[str, ...]
    negated: bool = False
    prefix: bool = False


def _bad(reason: str) -> ValidationError:
    return ValidationError("query", reason)


def parse_query(text: object) -> list[Term]:
    """A search query as terms, all of which a record must match (excluded terms: must
    not match).

    Raises:
        ValidationError: on ``query``: not text, too long, an unclosed quote, no word
            to look for, or only excluded terms.
    """
    if not isinstance(text, str):
        raise _bad("expects text")
    if len(text) > MAX_QUERY_CHARS:
        raise _bad(f"at most {MAX_QUERY_CHARS} characters")
    if text.count('"') % 2:
        raise _bad('has an unclosed quote (a phrase is written "like this")')
    terms: list[Term] = []
    for m in _PART.finditer(text):
        if m.group(4) is not None:
            word = m.group(4)
            negated = word.startswith("-")
            body = word[1:] if negated else word
            prefix = body.endswith("*")
            body = body.rstrip("*")
        else:
            negated, body, prefix = m.group(1) == "-", m.group(2), m.group(3) == "*"
        tokens = tuple(t.lower() for t in _TOKEN.findall(body))
        if not tokens:
            continue  # punctuation only: nothing either engine indexes
        terms.append(Term(tokens, negated, prefix))
    if len(terms) > MAX_QUERY_TERMS:
        raise _bad(f"at most {MAX_QUERY_TERMS} terms")
    if not terms:
        raise _bad("has no word to search for (words are letters and digits)")
    if all(t.negated for t in terms):
        raise _bad("needs at least one word that is not excluded with '-'")
    return terms


def fts5_query(terms: list[Term]) -> str:
    """The FTS5 MATCH expression of `terms`: quoted phrases, ``NOT`` for exclusions."""

    def phrase(t: Term) -> str:
        return '"' + " ".join(t.tokens) + '"' + ("*" if t.prefix else "")

    include = " AND ".join(phrase(t) for t in terms if not t.negated)
    exclude = "".join(f" NOT {phrase(t)}" for t in terms if t.negated)
    return f"({include}){exclude}" if exclude else include


def tsquery_text(terms: list[Term]) -> str:
    """The ``to_tsquery`` text of `terms`: quoted lexemes, ``<->`` within a phrase,
    ``:*`` for a prefix, ``!`` for exclusions, all joined with ``&``."""

    def phrase(t: Term) -> str:
        lex = [_quote(tok) for tok in t.tokens]
        if t.prefix:
            lex[-1] += ":*"
        body = " <-> ".join(lex)
        if t.negated:
            return f"!({body})"
        return f"({body})" if len(lex) > 1 else body

    return " & ".join(phrase(t) for t in terms)


def _quote(token: str) -> str:
    return "'" + token.replace("\\", "\\\\").replace("'", "''") + "'"


@dataclass(frozen=True)
class SearchSpec:
    """A model's search index: its fields, configuration, and object names."""

    table: str
    fields: tuple[str, ...]
    config: str
    digest: str

    @property
    def column(self) -> str:
        """PostgreSQL: the generated tsvector column."""
        return f"{COLUMN_PREFIX}{self.digest}"

    @property
    def index(self) -> str:
        """PostgreSQL: the GIN index on that column."""
        return f"fts_{self.table[:40]}_{self.digest}"

    @property
    def fts_table(self) -> str:
        """SQLite: the FTS5 table."""
        return f"{self.table}_fts_{self.digest}"

    def describe(self) -> str:
        """One line for a migration plan."""
        return f"create search index of {self.table} ({', '.join(self.fields)}; {self.config})"


#: Columns named so are DataFlow's search columns (never a model's: a field name cannot
#: start with ``dataflow_search_`` and still be the model's, see `search_spec`).
COLUMN_PREFIX = "dataflow_search_"


def search_spec(model: ModelInfo) -> SearchSpec | None:
    """The search index of `model`, or None when no field is searchable."""
    names = tuple(f.name for f in model.searchable_fields)
    if not names:
        return None
    text = f"{model.table}\n{','.join(names)}\n{model.search_config}"
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return SearchSpec(model.table, names, model.search_config, digest)
