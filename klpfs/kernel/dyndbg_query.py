"""The query language of <debugfs>/dynamic_debug/control (lib/dynamic_debug.c).

A write holds queries separated by `;` or newlines; each is pairs of
match-spec keyword and value (`file`, `func`, `line`, `module`, `format`,
from 6.1 `class`) and ends with a flags spec (`+p`, `-p`, `=_`, ...).  This
module turns one query's text into a DdebugQuery and the (flags, mask) pair
the matched callsites take, failing with QueryError (-EINVAL) where the
kernel's parser does.  Matching and applying live with the callsite table
(klpfs.kernel.dyndbg).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from klpfs.kernel.kstrtox import KstrtoxError, kstrtoull

# struct _ddebug's flags (include/linux/dynamic_debug.h).
_DPRINTK_FLAGS_NONE = 0
_DPRINTK_FLAGS_PRINT = 1 << 0
_DPRINTK_FLAGS_INCL_MODNAME = 1 << 1
_DPRINTK_FLAGS_INCL_FUNCNAME = 1 << 2
_DPRINTK_FLAGS_INCL_LINENO = 1 << 3
_DPRINTK_FLAGS_INCL_TID = 1 << 4
_DPRINTK_FLAGS_INCL_SOURCENAME = 1 << 5

OPT_ARRAY: tuple[tuple[int, str], ...] = (
    (_DPRINTK_FLAGS_PRINT, "p"), (_DPRINTK_FLAGS_INCL_MODNAME, "m"), (_DPRINTK_FLAGS_INCL_FUNCNAME, "f"),
    (_DPRINTK_FLAGS_INCL_LINENO, "l"), (_DPRINTK_FLAGS_INCL_TID, "t"), (_DPRINTK_FLAGS_NONE, "_"))
"""opt_array[]: the flag letters, in the order the control file shows them."""
OPT_ARRAY_SOURCENAME = OPT_ARRAY[:3] + ((_DPRINTK_FLAGS_INCL_SOURCENAME, "s"),) + OPT_ARRAY[3:]
"""opt_array[] once `s` (the source file name in the message prefix) exists (6.12 has it, 6.1 not)."""

MAXWORDS = 9
"""ddebug_exec_query()'s words[]: four match-specs and the flags."""
UINT_MAX = 0xFFFFFFFF
SPACES = " \t\n\v\f\r\xa0"
"""isspace() of the kernel's ctype table, which counts 0xa0 (latin-1 NBSP) as a space."""


@dataclass(frozen=True)
class DdebugFeatures:
    """What one generation of lib/dynamic_debug.c accepts and shows."""

    opt_array: tuple[tuple[int, str], ...]
    escape_space: bool
    """`cat control` writes a newline in a format as \\n (seq_escape_str with ESCAPE_SPACE),
    before 6.1 as \\012 (seq_escape, octal)."""
    query_extensions: bool
    """`file foo.c:func`, `file foo.c:N-M` and `format ^anchored` are understood (added after 5.1; 6.1 has them)."""
    class_keyword: bool
    """`class NAME` is a match-spec (6.1 on); before it is an unknown keyword."""
    prefix_size: int
    """PREFIX_SIZE: the bytes of the message prefix the m/f/l/t flags add, with its NUL."""
    procfs_control: bool
    """/proc/dynamic_debug/control exists beside the debugfs one (added after 5.1; 6.1 has it)."""


DYNDBG_4_15 = DdebugFeatures(OPT_ARRAY, escape_space=False, query_extensions=False, class_keyword=False,
                             prefix_size=64, procfs_control=False)
"""4.15's, which the 4.16 and 5.1 profiles follow."""
DYNDBG_6_1 = DdebugFeatures(OPT_ARRAY, escape_space=True, query_extensions=True, class_keyword=True,
                            prefix_size=64, procfs_control=True)
DYNDBG_6_12 = DdebugFeatures(OPT_ARRAY_SOURCENAME, escape_space=True, query_extensions=True, class_keyword=True,
                             prefix_size=128, procfs_control=True)
"""6.12's, which the 6.11 and 6.14 profiles follow (the `s` flag came in between 6.1 and them)."""
GENERATIONS = {"4.15": DYNDBG_4_15, "6.1": DYNDBG_6_1, "6.12": DYNDBG_6_12}


class QueryError(ValueError):
    """A query the kernel's parser refuses: the write fails with -EINVAL."""

    errno = errno.EINVAL


@dataclass
class DdebugQuery:
    """struct ddebug_query: None (or 0 for the line numbers) means "any"."""

    filename: str | None = None
    module: str | None = None
    function: str | None = None
    format: str | None = None
    class_string: str | None = None
    first_lineno: int = 0
    last_lineno: int = 0


def ddebug_tokenize(buf: str) -> list[str]:
    """ddebug_tokenize(): whitespace-separated words, "..." or '...' quoting
    without escapes, and `#` starting a comment where a word would start."""
    words: list[str] = []
    i, n = 0, len(buf)
    while i < n:
        while i < n and buf[i] in SPACES:
            i += 1
        if i == n or buf[i] == "#":
            break
        if buf[i] in "\"'":
            quote = buf[i]
            start = i + 1
            end = buf.find(quote, start)
            if end < 0:
                raise QueryError(f"unclosed quote: {buf[start:]}")
        else:
            start = end = i
            while end < n and buf[end] not in SPACES:
                end += 1
        if len(words) == MAXWORDS:
            raise QueryError(f"too many words, legal max <={MAXWORDS}")
        words.append(buf[start:end])
        i = end + 1  # past the closing quote or the space that ended the word
    return words


def _parse_lineno(text: str) -> int:
    """parse_lineno(): "" is 0 ("don't care"), else kstrtouint(text, 10)."""
    if not text:
        return 0
    try:
        value = kstrtoull(text.encode("latin-1"), 10)
    except (KstrtoxError, UnicodeEncodeError):
        raise QueryError(f"bad line-number: {text}") from None
    if value > UINT_MAX:
        raise QueryError(f"bad line-number: {text}")
    return value


def parse_linerange(query: DdebugQuery, first: str) -> None:
    """parse_linerange(): N, N-M, N- (to the end) or -M; a second `line` is refused."""
    if query.first_lineno or query.last_lineno:
        raise QueryError("match-spec: line used 2x")
    first, dash, last = first.partition("-")
    query.first_lineno = _parse_lineno(first)
    if dash:
        query.last_lineno = _parse_lineno(last) or UINT_MAX
        if query.last_lineno < query.first_lineno:
            raise QueryError(f"last-line:{query.last_lineno} < 1st-line:{query.first_lineno}")
    else:
        query.last_lineno = query.first_lineno


def _check_set(query: DdebugQuery, field: str, value: str) -> None:
    """check_set(): each match-spec at most once."""
    if getattr(query, field) is not None:
        raise QueryError(f"match-spec:{field} val:{getattr(query, field)} overridden by {value}")
    setattr(query, field, value)


def ddebug_parse_query(words: list[str], features: DdebugFeatures, modname: str | None = None) -> DdebugQuery:
    """ddebug_parse_query(): (keyword, value) pairs into a query."""
    if len(words) % 2:
        raise QueryError("expecting pairs of match-spec <value>")
    query = DdebugQuery()
    for keyword, arg in zip(words[::2], words[1::2]):
        if keyword == "func":
            _check_set(query, "function", arg)
        elif keyword == "file":
            _check_set(query, "filename", arg)
            name, colon, fline = arg.partition(":")
            if not (colon and features.query_extensions):
                continue
            # The tail after ':' is a function (it starts like one) or a line range.
            query.filename = name
            if fline[:1].isalpha() or fline[:1] in ("*", "?"):
                _check_set(query, "function", fline)
            else:
                parse_linerange(query, fline)
        elif keyword == "module":
            _check_set(query, "module", arg)
        elif keyword == "format":
            _check_set(query, "format", string_unescape(arg))
        elif keyword == "line":
            parse_linerange(query, arg)
        elif keyword == "class" and features.class_keyword:
            _check_set(query, "class_string", arg)
        else:
            raise QueryError(f'unknown keyword "{keyword}"')
    if query.module is None and modname is not None:
        # $modname.dyndbg=<queries> at module load: the module is implied.
        query.module = modname
    return query


def ddebug_parse_flags(word: str, features: DdebugFeatures) -> tuple[int, int]:
    """ddebug_parse_flags(): `[-+=]flags` into (flags, mask): a matched site's
    flags become (flags & mask) | new flags."""
    op, letters = word[:1], word[1:]
    if op not in ("+", "-", "="):
        raise QueryError(f"bad flag-op {op}, at start of {word}")
    letter_bits = {letter: bit for bit, letter in features.opt_array}
    flags = 0
    for letter in letters:
        if letter not in letter_bits:
            raise QueryError(f"unknown flag '{letter}'")
        flags |= letter_bits[letter]
    if op == "=":
        return flags, 0
    if op == "+":
        return flags, ~0
    return 0, ~flags


def describe_flags(flags: int, features: DdebugFeatures) -> str:
    """ddebug_describe_flags(): the set flags' letters, `_` for none."""
    return "".join(letter for bit, letter in features.opt_array if flags & bit) or "_"


def match_wildcard(pattern: str, string: str) -> bool:
    """match_wildcard() (lib/parser.c): `*` any run, `?` any one character."""
    s = p = 0
    str_start, pat_start = 0, 0
    star = False
    while s < len(string):
        c = pattern[p] if p < len(pattern) else ""
        if c == "?":
            s += 1
            p += 1
        elif c == "*":
            star = True
            str_start = s
            p += 1
            if p == len(pattern):
                return True
            pat_start = p
        elif c == string[s]:
            s += 1
            p += 1
        else:
            if not star:
                return False
            str_start += 1
            s = str_start
            p = pat_start
    if pattern[p:p + 1] == "*":
        p += 1
    return p == len(pattern)


_UNESCAPE_SPACE = {"n": "\n", "r": "\r", "t": "\t", "v": "\v", "f": "\f"}
_UNESCAPE_SPECIAL = {'"': '"', "\\": "\\", "a": "\a", "e": "\x1b"}


def string_unescape(text: str) -> str:
    """string_unescape_inplace(..., UNESCAPE_SPACE | UNESCAPE_OCTAL | UNESCAPE_SPECIAL),
    as `format` values are unescaped: \\n, \\040, \\" and friends; any other
    backslash stays as it is."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] == "\\" and i + 1 < n:
            c = text[i + 1]
            if c in _UNESCAPE_SPACE:
                out.append(_UNESCAPE_SPACE[c])
                i += 2
                continue
            if c in "01234567":
                # unescape_octal(): up to three digits, the value kept in a byte.
                j, num = i + 2, int(c)
                while num < 32 and j < n and text[j] in "01234567" and j - (i + 1) < 3:
                    num = num * 8 + int(text[j])
                    j += 1
                out.append(chr(num & 0xFF))
                i = j
                continue
            if c in _UNESCAPE_SPECIAL:
                out.append(_UNESCAPE_SPECIAL[c])
                i += 2
                continue
            out.append("\\")
            i += 1
        out.append(text[i])
        i += 1
    return "".join(out)


_ESCAPED = "\t\r\n\""
_ESCAPE_SPACE = {"\t": "\\t", "\r": "\\r", "\n": "\\n"}


def escape_format(fmt: str, features: DdebugFeatures) -> str:
    """How ddebug_proc_show() writes a format between its quotes: the characters
    of "\\t\\r\\n\\"" escaped, octal before 6.1 (seq_escape), with ESCAPE_SPACE from 6.1
    (seq_escape_str), where a double quote has no space escape and stays as it is."""
    if features.escape_space:
        return "".join(_ESCAPE_SPACE.get(c, c) for c in fmt)
    return "".join(f"\\{ord(c):03o}" if c in _ESCAPED else c for c in fmt)
