"""The files `docker build` (and podman's, and buildah's) sends for a directory:
all of them but those its .dockerignore excludes, by the engines' own rules
(moby's patternmatcher, which containers/storage's fileutils repeats):

- each line is a pattern; a line starting with `#` is a comment and blank
  lines are skipped; `!` makes an exception; the pattern is trimmed, cleaned
  as a path (filepath.Clean) and a leading `/` dropped;
- `*` matches within one path element, `?` one character of one, `**` any
  number of whole elements, none too; `[...]` is a class and `\\` escapes;
- a path is excluded when it, or any directory above it, matches a pattern,
  the last matching pattern deciding (an exception includes it again).

So `__pycache__` leaves out the top directory's only: nested ones need
`**/__pycache__`, which is the mistake this module lets the tests catch.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

IGNORE_FILE = ".dockerignore"
REGEX_SPECIAL = ".+()|{}$"
"""Characters filepath.Match takes literally that a regular expression does not."""


@dataclass(frozen=True)
class Pattern:
    regex: re.Pattern[str]
    exception: bool


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """A cleaned pattern as the regular expression moby's Pattern.compile() builds."""
    regex, i = "^", 0
    while i < len(pattern):
        ch = pattern[i]
        i += 1
        if ch == "*" and pattern[i:i + 1] == "*":
            i += 1
            if pattern[i:i + 1] == "/":
                i += 1
            regex += ".*" if i == len(pattern) else "(.*/)?"
        elif ch == "*":
            regex += "[^/]*"
        elif ch == "?":
            regex += "[^/]"
        elif ch in REGEX_SPECIAL:
            regex += "\\" + ch
        elif ch == "\\" and i < len(pattern):
            regex += "\\" + pattern[i]
            i += 1
        elif ch == "\\":
            regex += "\\\\"
        else:
            regex += ch
    return re.compile(regex + "$")


def read_patterns(ignore_file: Path) -> list[Pattern]:
    """The patterns of a .dockerignore, as moby's dockerignore.ReadAll() reads them."""
    patterns = []
    for line in ignore_file.read_text().splitlines():
        if line.startswith("#"):
            continue
        line = line.strip()
        if not line:
            continue
        exception = line.startswith("!")
        if exception:
            line = line[1:].strip()
        cleaned = posixpath.normpath(line).lstrip("/") or "/"
        patterns.append(Pattern(compile_pattern(cleaned), exception))
    return patterns


def excluded(patterns: list[Pattern], path: str) -> bool:
    """MatchesOrParentMatches(): whether `path` (relative, with `/`) is left out."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    matched = False
    for pattern in patterns:
        if pattern.exception != matched:
            continue  # nothing this pattern could change
        if any(pattern.regex.match(candidate) for candidate in candidates):
            matched = not pattern.exception
    return matched


def context_files(root: Path) -> set[str]:
    """The relative paths of the files (and symlinks) sent for `root`."""
    ignore_file = root / IGNORE_FILE
    patterns = read_patterns(ignore_file) if ignore_file.exists() else []
    can_reinclude = any(pattern.exception for pattern in patterns)
    files = set()
    for directory, dirnames, filenames in os.walk(root):
        relative = Path(directory).relative_to(root).as_posix()
        prefix = "" if relative == "." else relative + "/"
        for name in list(dirnames):
            if os.path.islink(os.path.join(directory, name)):
                dirnames.remove(name)
                filenames.append(name)
            elif not can_reinclude and excluded(patterns, prefix + name):
                dirnames.remove(name)  # nothing below it can be sent
        files |= {prefix + name for name in filenames if not excluded(patterns, prefix + name)}
    return files
