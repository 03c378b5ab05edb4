"""Dynamic debug (lib/dynamic_debug.c): every pr_debug() is a callsite with
flags, and only a callsite with `p` prints.

As with a distro kernel's CONFIG_DYNAMIC_DEBUG every callsite starts off.
The built-in code registers its callsites at boot (the livepatch core's
kernel/livepatch/transition.c), a module its own while it is loaded.
<debugfs>/dynamic_debug/control lists them and takes queries
(klpfs.kernel.dyndbg_query) that change their flags.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from klpfs.kernel.dyndbg_query import (
    _DPRINTK_FLAGS_INCL_FUNCNAME, _DPRINTK_FLAGS_INCL_LINENO, _DPRINTK_FLAGS_INCL_MODNAME,
    _DPRINTK_FLAGS_INCL_SOURCENAME, _DPRINTK_FLAGS_INCL_TID, _DPRINTK_FLAGS_PRINT, DYNDBG_6_1, DdebugFeatures,
    DdebugQuery, QueryError, ddebug_parse_flags, ddebug_parse_query, ddebug_tokenize, describe_flags, escape_format,
    match_wildcard)
from klpfs.kernel.module import ModuleState
from klpfs.kernel.printk import KERN_DEBUG

if TYPE_CHECKING:
    from klpfs.kernel.module import Module

USER_BUF_PAGE = 4096
"""ddebug_proc_write(): a write of USER_BUF_PAGE bytes or more is -E2BIG."""
CONTROL_HEADER = "# filename:lineno [module]function flags format\n"


@dataclass(eq=False)
class Ddebug:
    """struct _ddebug: one pr_debug() callsite."""

    modname: str
    function: str
    filename: str
    """As the control file shows it: relative to the kernel source tree for
    built-in code (trim_prefix()), the path it was built from for a module."""
    format: str
    """The format as written at the call, without pr_fmt()'s prefix."""
    lineno: int
    flags: int = 0

    @property
    def enabled(self) -> bool:
        """DYNAMIC_DEBUG_BRANCH(): the callsite prints."""
        return bool(self.flags & _DPRINTK_FLAGS_PRINT)


@dataclass(eq=False)
class DdebugTable:
    """struct ddebug_table: one module's callsites (the built-in ones under their KBUILD_MODNAME)."""

    mod_name: str
    ddebugs: list[Ddebug] = field(default_factory=list)


class DynamicDebug:
    """The callsite tables and what the control file does with them."""

    def __init__(self, printk: Callable[[int, str], None], current_pid: Callable[[], int],
                 features: DdebugFeatures = DYNDBG_6_1):
        self._printk = printk
        self._current_pid = current_pid
        self.features = features
        self.tables: list[DdebugTable] = []
        """ddebug_tables, in registration order: built-in code first, then modules as they load."""

    # -- the tables (ddebug_add_module(), ddebug_remove_module()) ------------------------

    def add_module(self, mod_name: str, ddebugs: list[Ddebug]) -> DdebugTable:
        """Register a module's callsites.  The table keeps the list itself, so a
        callsite appended to it later (a Python module's pr_debug() met only
        when it runs) is listed and switchable from then on."""
        table = DdebugTable(mod_name, ddebugs)
        self.tables.append(table)
        return table

    def remove_module(self, mod_name: str) -> None:
        self.tables = [t for t in self.tables if t.mod_name != mod_name]

    def module_notify(self, state: ModuleState, mod: Module) -> None:
        """ddebug_module_notify(): a module's callsites come with it and go with it."""
        if state is ModuleState.COMING:
            self.add_module(mod.name, mod.dyndbg)
        elif state is ModuleState.GOING:
            self.remove_module(mod.name)

    def sites(self) -> Iterable[tuple[DdebugTable, Ddebug]]:
        for table in self.tables:
            for dp in table.ddebugs:
                yield table, dp

    # -- printing --------------------------------------------------------------------

    def pr_debug(self, dp: Ddebug, text: str) -> None:
        """__dynamic_pr_debug(): text is the message with pr_fmt() applied; it is
        printed, after the prefix the site's m/f/s/l/t flags ask for, only
        while the site has `p`."""
        if dp.enabled:
            self._printk(KERN_DEBUG, self.emit_prefix(dp) + text)

    def emit_prefix(self, dp: Ddebug) -> str:
        """__dynamic_emit_prefix(): "[tid] module:function:file:line: ", cut to PREFIX_SIZE - 1."""
        tid = f"[{self._current_pid()}] " if dp.flags & _DPRINTK_FLAGS_INCL_TID else ""
        parts = [f"{value}:" for bit, value in ((_DPRINTK_FLAGS_INCL_MODNAME, dp.modname),
                                                 (_DPRINTK_FLAGS_INCL_FUNCNAME, dp.function),
                                                 (_DPRINTK_FLAGS_INCL_SOURCENAME, dp.filename),
                                                 (_DPRINTK_FLAGS_INCL_LINENO, dp.lineno))
                 if dp.flags & bit]
        prefix = tid + "".join(parts) + (" " if parts else "")
        return prefix[: self.features.prefix_size - 1]

    # -- queries -----------------------------------------------------------------------

    def ddebug_change(self, query: DdebugQuery, flags: int, mask: int) -> int:
        """ddebug_change(): apply to every matching callsite; the number matched."""
        nfound = 0
        for table in self.tables:
            if query.module is not None and not match_wildcard(query.module, table.mod_name):
                continue
            if query.class_string is not None:
                # No emulated module declares classes (DECLARE_DYNDBG_CLASSMAP).
                continue
            for dp in table.ddebugs:
                if not _matches(query, dp, self.features.query_extensions):
                    continue
                nfound += 1
                dp.flags = (dp.flags & mask) | flags
        return nfound

    def exec_query(self, text: str, modname: str | None = None) -> int:
        """ddebug_exec_query(): the number of callsites matched, or -EINVAL."""
        try:
            words = ddebug_tokenize(text)
            if not words:
                raise QueryError("tokenize failed")
            # The flags come last, so what precedes them is pairs of spec and value.
            flags, mask = ddebug_parse_flags(words[-1], self.features)
            query = ddebug_parse_query(words[:-1], self.features, modname)
        except QueryError as e:
            return -e.errno
        return self.ddebug_change(query, flags, mask)

    def exec_queries(self, text: str, modname: str | None = None) -> int:
        """ddebug_exec_queries(): queries separated by `;` or newlines, each run
        even after one fails; the last failure's -errno, else the total matched
        (a query matching nothing is no error)."""
        exitcode = nfound = 0
        for query in text.replace(";", "\n").split("\n"):
            query = query.lstrip(" \t\v\f\r\xa0")
            if not query or query.startswith("#"):
                continue
            rc = self.exec_query(query, modname)
            if rc < 0:
                exitcode = rc
            else:
                nfound += rc
        return exitcode or nfound

    # -- the control file ----------------------------------------------------------------

    def proc_show(self) -> str:
        """`cat control`: ddebug_proc_show() for the header and every callsite."""
        lines = [CONTROL_HEADER]
        for table, dp in self.sites():
            lines.append(f"{dp.filename}:{dp.lineno} [{table.mod_name}]{dp.function} "
                         f"={describe_flags(dp.flags, self.features)} "
                         f"\"{escape_format(dp.format, self.features)}\"\n")
        return "".join(lines)

    def proc_write(self, data: bytes) -> int:
        """ddebug_proc_write(): the bytes consumed, or the queries' -errno."""
        if not data:
            return 0
        if len(data) > USER_BUF_PAGE - 1:
            return -errno.E2BIG
        # memdup_user_nul(): the queries end at the first NUL.
        text = data.split(b"\0", 1)[0].decode("latin-1")
        ret = self.exec_queries(text)
        return ret if ret < 0 else len(data)


def _kbasename(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _matches(query: DdebugQuery, dp: Ddebug, anchors: bool) -> bool:
    """The per-callsite tests of ddebug_change(): file (the path, its base name),
    function, format (a substring, or where `anchors` a prefix after `^`), line range."""
    if query.filename is not None and not (match_wildcard(query.filename, dp.filename)
                                           or match_wildcard(query.filename, _kbasename(dp.filename))):
        return False
    if query.function is not None and not match_wildcard(query.function, dp.function):
        return False
    if query.format is not None:
        fmt = query.format
        if anchors and fmt.startswith("^"):
            if not dp.format.startswith(fmt[1:]):
                return False
        elif fmt not in dp.format:
            return False
    if query.first_lineno and dp.lineno < query.first_lineno:
        return False
    if query.last_lineno and dp.lineno > query.last_lineno:
        return False
    return True

