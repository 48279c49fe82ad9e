"""Real English prose that works offline: the paragraphs of the Python reference documentation that CPython ships
as `pydoc_data.topics` (what `help("topics")` shows), about 27,000 words once code samples are dropped.

The text is that of the running interpreter, so the same seed gives the same passages on the same Python version;
the report records the version.
"""

from __future__ import annotations

import functools
import platform
import re


class CorpusUnavailableError(RuntimeError):
    """This Python was installed without its pydoc data (some distributions split it out)."""


def corpus_name() -> str:
    return f"pydoc_data.topics (Python {platform.python_version()})"


def _is_prose(paragraph: str) -> bool:
    # Code samples are indented past the text's two-space margin or full of brackets and operators; short
    # paragraphs are headings and list items.
    lines = paragraph.splitlines()
    return (
        all(len(line) - len(line.lstrip()) <= 2 for line in lines)
        and len(paragraph.split()) >= 15
        and not set("{}[]=>") & set(paragraph)
    )


@functools.cache
def prose_words() -> tuple[str, ...]:
    """Every word of the prose paragraphs, in topic-name order then document order.

    Raises CorpusUnavailableError when pydoc_data is missing.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise CorpusUnavailableError(
            "the python-docs and multi-turn datasets read pydoc_data, which this Python lacks (on Debian: "
            "apt-get install libpython3-stdlib); use --dataset random-text"
        ) from None
    paragraphs = (p for name in sorted(topics) for p in re.split(r"\n\s*\n", topics[name]))
    return tuple(word for p in paragraphs if _is_prose(p) for word in p.split())
