"""A Python module's pr_debug() callsites, as the compiler emits a C module's
__dyndbg section: one per call, with the module's name, its file, the line
of the call, the enclosing function and the format as written.

The build finds the calls whose format is a string literal, so the control
file lists them as soon as the module is loaded; a call whose format is
computed joins the list the first time it runs.
"""

from __future__ import annotations

import ast

from klpfs.kernel.dyndbg import Ddebug
from klpfs.kernel.module import Module

PR_DEBUG = "pr_debug"
MODULE_LEVEL = "<module>"
"""The function of a call outside any def, as Python names that code."""


def scan_callsites(tree: ast.Module, modname: str, filename: str) -> list[Ddebug]:
    """The `pr_debug("literal", ...)` calls of the module as built (inside the
    #if branches kept), in source order."""
    sites: list[Ddebug] = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = function
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = child.name
            elif isinstance(child, ast.Lambda):
                inner = "<lambda>"
            elif (isinstance(child, ast.Call) and isinstance(child.func, ast.Name) and child.func.id == PR_DEBUG
                  and child.args and isinstance(child.args[0], ast.Constant) and isinstance(child.args[0].value, str)):
                sites.append(Ddebug(modname, function, filename, child.args[0].value, child.lineno))
            visit(child, inner)

    visit(tree, MODULE_LEVEL)
    sites.sort(key=lambda dp: dp.lineno)
    return sites


def module_callsite(mod: Module, filename: str, function: str, lineno: int, fmt: str) -> Ddebug:
    """The callsite of the pr_debug() at `lineno` with format `fmt`: found in the
    module's list, or added to it (and so to its table) on first use."""
    for dp in mod.dyndbg:
        if dp.lineno == lineno and dp.format == fmt:
            return dp
    dp = Ddebug(mod.name, function, filename, fmt, lineno)
    mod.dyndbg.append(dp)
    return dp
