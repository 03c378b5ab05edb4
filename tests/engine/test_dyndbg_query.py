"""The pieces of dynamic debug's query language, against lib/dynamic_debug.c,
lib/parser.c (match_wildcard) and lib/string_helpers.c (string_unescape)."""

from __future__ import annotations

import pytest

from klpfs.kernel.dyndbg_query import (
    DYNDBG_4_15, DYNDBG_6_1, UINT_MAX, DdebugQuery, QueryError, ddebug_parse_flags, ddebug_parse_query,
    ddebug_tokenize, escape_format, match_wildcard, string_unescape)


@pytest.mark.parametrize("pattern, string, matches", [
    ("klp_*", "klp_init_transition", True),
    ("*transition", "klp_init_transition", True),
    ("*_i*_t*", "klp_init_transition", True),
    ("*_t*_t*", "klp_init_transition", False),
    ("klp_?nit*", "klp_init_transition", True),
    ("klp_init", "klp_init_transition", False),
    ("*", "", True),
    ("", "", True),
    ("a*", "", False),
    ("**", "x", True),
    ("a*b", "aXbYb", True),
    ("a*b", "aXbY", False),
])
def test_match_wildcard(pattern: str, string: str, matches: bool) -> None:
    assert match_wildcard(pattern, string) is matches


@pytest.mark.parametrize("escaped, value", [
    ("a\\nb", "a\nb"),
    ("\\040x", " x"),
    ("\\0", "\0"),
    ("\\1234", "S4"),          # three octal digits at most
    ("\\400", "\x20" + "0"),     # num < 32 stops a fourth shift: \40 then "0"
    ('\\"q\\"', '"q"'),
    ("\\\\", "\\"),
    ("\\e\\a", "\x1b\x07"),
    ("\\q", "\\q"),            # not an escape: the backslash stays
    ("end\\", "end\\"),
])
def test_string_unescape(escaped: str, value: str) -> None:
    assert string_unescape(escaped) == value


def test_tokenize() -> None:
    assert ddebug_tokenize("  func 'a b'  \"c d\"e +p # rest") == ["func", "a b", "c d", "e", "+p"]
    assert ddebug_tokenize("#only a comment") == []
    with pytest.raises(QueryError):
        ddebug_tokenize("format 'open")
    with pytest.raises(QueryError):
        ddebug_tokenize("1 2 3 4 5 6 7 8 9 10")


def test_parse_query_and_flags() -> None:
    assert ddebug_parse_query(["file", "t.c:10-", "module", "livepatch"], DYNDBG_6_1) == DdebugQuery(
        filename="t.c", module="livepatch", first_lineno=10, last_lineno=UINT_MAX)
    assert ddebug_parse_query(["file", "t.c:klp_*"], DYNDBG_6_1) == DdebugQuery(filename="t.c", function="klp_*")
    assert ddebug_parse_query(["file", "t.c:klp_*"], DYNDBG_4_15) == DdebugQuery(filename="t.c:klp_*")
    assert ddebug_parse_query(["func", "f"], DYNDBG_6_1, modname="mod") == DdebugQuery(function="f", module="mod")
    with pytest.raises(QueryError):
        ddebug_parse_query(["file", "t.c:5", "line", "7"], DYNDBG_6_1)
    assert ddebug_parse_flags("+pm", DYNDBG_6_1) == (0b11, ~0)
    assert ddebug_parse_flags("-p", DYNDBG_6_1) == (0, ~1)
    assert ddebug_parse_flags("=", DYNDBG_6_1) == (0, 0)
    assert ddebug_parse_flags("=_", DYNDBG_6_1) == (0, 0)


def test_escape_format() -> None:
    fmt = "a\t\"b\"\r\n\v"
    assert escape_format(fmt, DYNDBG_6_1) == "a\\t\"b\"\\r\\n\v"
    assert escape_format(fmt, DYNDBG_4_15) == "a\\011\\042b\\042\\015\\012\v"
