"""Python modules: a kernel module written against klpfs.kapi, loaded into the
emulated kernel the way a .ko is.

Loading reads the source as the build and the module loader would:

- Every top-level `def` is a function of the module, as every C function is
  a symbol: it enters kallsyms (sized from its source) and calling it, from
  anywhere, goes through the ftrace call path, so a patch can replace it
  and a task sleeping inside it has it on its stack.
- `__func__` is the enclosing function's name, as in C.
- `if LINUX_VERSION_CODE >= KERNEL_VERSION(5, 1, 0):` is decided when the
  module is built for the running profile, as `#if` is: the other branch is
  dropped, and the symbols it uses are not needed.
- The kernel symbols the module uses must exist in the running profile:
  a missing one fails the load with "Unknown symbol", one whose signature
  changed with "disagrees about version of symbol", as a kernel refuses a
  module built against other headers.

The source then runs once in a namespace of its own (the module's static
data), which declares parameters, structures, init and exit.
"""

from __future__ import annotations

import ast
import errno
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from klpfs.kernel.kallsyms import FuncDef, KSym
from klpfs.kernel.module import MODULE_NAME_LEN, Module
from klpfs.kernel.printk import KERN_WARNING
from klpfs.modules.pydebug import scan_callsites

if TYPE_CHECKING:
    from klpfs.profiles import Profile
    from klpfs.system import System

KAPI = "klpfs.kapi"
VERSION_OPS = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
               ast.Eq: operator.eq, ast.NotEq: operator.ne}
BYTES_PER_LINE = 0x10
MAX_AST_DEPTH = 100
"""How deeply a module's syntax tree may nest (CPython itself stops blocks at 100
levels of indentation): the build walks the tree recursively (the #if transform,
the pr_debug scan, the compiler), and no kernel module transliterates deeper."""


class PyModuleError(ValueError):
    """A Python module that cannot be loaded; the message names file, line and problem."""

    def __init__(self, message: str, err: int = errno.ENOEXEC):
        super().__init__(message)
        self.errno = err


def kernel_version(a: int, b: int, c: int = 0) -> int:
    """KERNEL_VERSION(a, b, c)."""
    return (a << 16) + (b << 8) + min(c, 255)


def profile_version_code(profile: Profile) -> int:
    major, minor = (int(x) for x in profile.version.split(".")[:2])
    return kernel_version(major, minor)


class KFunc:
    """A module function as module code sees it: calling it goes through
    the emulated call path as the current task."""

    __slots__ = ("name", "body", "_sym", "_module", "_kernel")

    def __init__(self, name: str, module: Module, kernel: Any):
        self.name = name
        self.body: Callable[..., Any] | None = None
        self._sym: KSym | None = None
        self._module = module
        self._kernel = kernel

    @property
    def sym(self) -> KSym | None:
        """The function's symbol, once the loader has laid the module out."""
        if self._sym is None:
            self._sym = next((s for s in self._module.symbols if s.name == self.name), None)
        return self._sym

    @property
    def addr(self) -> int:
        """The function's address (what a function pointer holds)."""
        sym = self.sym
        if sym is None:
            raise RuntimeError(f"{self.name}: the module is not loaded yet")
        return sym.addr

    def __call__(self, *args: Any) -> Any:
        sym = self.sym
        if sym is None:
            raise RuntimeError(f"{self.name}() called while the module is not loaded")
        return self._kernel.invoke(sym, self._kernel.current, args)

    def __repr__(self) -> str:
        return f"<function {self.name}>"


@dataclass
class PyModuleInfo:
    """What the module declared about itself while its source ran."""

    license: str = ""
    description: str = ""
    authors: list[str] = field(default_factory=list)
    info: dict[str, str] = field(default_factory=dict)
    init: KFunc | None = None
    exit: KFunc | None = None


class _Transform(ast.NodeTransformer):
    """__func__ and #if LINUX_VERSION_CODE, resolved at build time."""

    def __init__(self, version_code: int):
        self.version_code = version_code
        self.func: list[str] = []

    def visit_FunctionDef(self, node: ast.FunctionDef) -> Any:
        if not self.func:
            # A top-level def binds the body of its symbol (applied last, after any notrace).
            node.decorator_list.insert(0, ast.Name("__klpfs_bind__", ast.Load()))
        self.func.append(node.name)
        self.generic_visit(node)
        self.func.pop()
        return node

    def visit_ClassDef(self, node: ast.ClassDef) -> Any:
        """A class (a struct with helpers) is not a function: its methods are not symbols."""
        self.func.append(node.name)
        self.generic_visit(node)
        self.func.pop()
        return node

    def visit_Name(self, node: ast.Name) -> Any:
        if node.id == "__func__" and self.func:
            return ast.copy_location(ast.Constant(self.func[-1]), node)
        return node

    def visit_If(self, node: ast.If) -> Any:
        decided = self._version_test(node.test)
        if decided is None:
            self.generic_visit(node)
            return node
        body = node.body if decided else node.orelse
        kept: list[ast.stmt] = []
        for stmt in body:
            # A nested #if comes back as a list of its kept statements.
            new = self.visit(stmt)
            kept.extend(new if isinstance(new, list) else [new])
        return kept or ast.copy_location(ast.Pass(), node)

    def _version_test(self, test: ast.expr) -> bool | None:
        if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and type(test.ops[0]) in VERSION_OPS):
            return None
        left, right = test.left, test.comparators[0]
        a, b = self._version_value(left), self._version_value(right)
        if a is None or b is None:
            return None
        return bool(VERSION_OPS[type(test.ops[0])](a, b))

    def _version_value(self, node: ast.expr) -> int | None:
        if isinstance(node, ast.Name) and node.id == "LINUX_VERSION_CODE":
            return self.version_code
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "KERNEL_VERSION"
                and all(isinstance(a, ast.Constant) and isinstance(a.value, int) for a in node.args)):
            return kernel_version(*(cast(int, cast(ast.Constant, a).value) for a in node.args))
        return None


def _parse(text: str, filename: str) -> ast.Module:
    """The source's syntax tree; PyModuleError when it has none, or one nested too
    deeply to build (CPython's parser runs out of stack or memory first, or the
    tree is deeper than MAX_AST_DEPTH)."""
    try:
        tree = ast.parse(text, filename)
    except SyntaxError as e:
        raise PyModuleError(f"{filename}:{e.lineno}: syntax error: {e.msg}") from None
    except ValueError as e:
        raise PyModuleError(f"{filename}: {e}") from None
    except (RecursionError, MemoryError):
        raise PyModuleError(f"{filename}: nested too deeply to parse") from None
    stack: list[tuple[ast.AST, int, int]] = [(tree, 1, 1)]
    while stack:
        node, depth, line = stack.pop()
        line = getattr(node, "lineno", line)  # a context (Load, Store) has the line of its expression
        if depth > MAX_AST_DEPTH:
            raise PyModuleError(f"{filename}:{line}: nested more than {MAX_AST_DEPTH} levels deep")
        stack.extend((child, depth + 1, line) for child in ast.iter_child_nodes(node))
    return tree


def _functions(tree: ast.Module) -> list[tuple[str, int, bool]]:
    """(name, size, notrace) of every top-level def, in source order."""
    funcs = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            notrace = any(isinstance(d, ast.Name) and d.id == "notrace" for d in node.decorator_list)
            funcs.append((node.name, BYTES_PER_LINE * (lines + 1), notrace))
    return funcs


def _names_used(tree: ast.Module) -> set[str]:
    return {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}


def _arities(tree: ast.Module) -> dict[str, set[int | None]]:
    """For each name, the argument counts of the calls to it, None for any other use
    (which form of an API whose signature changed the module was written for)."""
    called: dict[int, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            called[id(node.func)] = len(node.args) + len(node.keywords)
    arities: dict[str, set[int | None]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            arities.setdefault(node.id, set()).add(called.get(id(node)))
    return arities


def build_pymodule(path: str | Path, text: str, system: System) -> Module:
    """Build the module from its source for the running profile: check,
    run its top level, and return the Module ready for the loader.
    PyModuleError (naming file and line) for anything the kernel would refuse."""
    from klpfs import kapi

    path = Path(path)
    filename = str(path)
    name = path.stem.replace("-", "_")
    if not name.isidentifier() or len(name) >= MODULE_NAME_LEN:
        raise PyModuleError(f"{path}: {name!r} is not a valid module name")
    tree = _parse(text, filename)
    tree = ast.fix_missing_locations(_Transform(profile_version_code(system.profile)).visit(tree))
    refusal = kapi.check_symbols(_names_used(tree), system.profile, name, _arities(tree))
    try:
        code = compile(tree, filename, "exec")
    except SyntaxError as e:  # what only the compiler checks: `return` outside a function, ...
        raise PyModuleError(f"{filename}:{e.lineno}: syntax error: {e.msg}") from None
    except (RecursionError, MemoryError):
        raise PyModuleError(f"{filename}: nested too deeply to compile") from None

    kernel = system.kernel
    mod = Module(name, livepatch=False)
    mod.dyndbg = scan_callsites(tree, name, filename)
    funcs = {fname: KFunc(fname, mod, kernel) for fname, _, _ in _functions(tree)}
    ctx = kapi.ModuleContext(system, mod, filename, funcs)
    ns: dict[str, Any] = {"__name__": f"klpfs.modules.loaded.{name}", "__file__": filename,
                          "__builtins__": __builtins__, **funcs}
    ns.update(__klpfs__=ctx, __klpfs_bind__=ctx.bind, THIS_MODULE=mod, KBUILD_MODNAME=name)
    ctx.ns = ns
    mod.params = ns
    kernel.code.sources.add(filename)
    try:
        kernel.code.traced(exec, code, ns)
    except BaseException as e:  # noqa: BLE001 - a faulty top level is a bad module, not a daemon crash
        raise PyModuleError(f"{filename}: {kapi.describe_fault(e, kernel.code.sources)}") from None
    missing = [fname for fname, kf in funcs.items() if kf.body is None]
    if missing:
        raise PyModuleError(f"{filename}: {', '.join(missing)}: defined but not bound (redefined?)")
    mod.funcs = [FuncDef(fname, size, _bound(funcs[fname]), not notrace) for fname, size, notrace in _functions(tree)]
    info = ctx.info
    mod.livepatch = info.info.get("livepatch") == "Y"
    mod.data["file"] = path
    mod.data["context"] = ctx
    if info.init is not None:
        init = info.init
        mod.init = lambda m: init()
    if info.exit is not None:
        exit_fn = info.exit
        mod.exit = lambda m: exit_fn()
    mod.release = ctx.release
    if refusal is not None:
        mod.check_symbols = lambda: _refuse(kernel, *refusal)
    return mod


def _refuse(kernel: Any, message: str, err: int) -> int:
    kernel.printk(KERN_WARNING, message)
    return -err


def _bound(kf: KFunc) -> Callable[..., Any]:
    body = kf.body
    assert body is not None
    return body


@dataclass
class StaticModInfo:
    """What modinfo shows of a Python module, read from its source without running it."""

    name: str
    license: str = ""
    description: str = ""
    authors: list[str] = field(default_factory=list)
    info: dict[str, str] = field(default_factory=dict)
    params: list[tuple[str, str, str]] = field(default_factory=list)
    """(name, description, type) of each parameter."""
    entries: list[tuple[str, str]] = field(default_factory=list)
    """The .modinfo entries the calls make, in source order: ("license", "GPL"),
    ("parmtype", "flag:int"), ("parm", "flag:its description"), ..."""
    init: str = ""
    exit: str = ""
    """The functions module_init() and module_exit() name."""


def read_modinfo(path: str | Path, text: str) -> StaticModInfo:
    """The MODULE_*() and module_param*() calls of the module's top level; PyModuleError if unparsable."""
    path = Path(path)
    tree = _parse(text, str(path))
    info = StaticModInfo(path.stem.replace("-", "_"))
    params: dict[str, list[str]] = {}
    for node in tree.body:
        if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Name)):
            continue
        args = [a.value if isinstance(a, ast.Constant) else None for a in node.value.args]
        call = node.value.func.id
        entry = _modinfo_entry(call, args)
        if entry is not None:
            info.entries.append(entry)
        if call in ("module_init", "module_exit") and node.value.args and isinstance(node.value.args[0], ast.Name):
            setattr(info, call.removeprefix("module_"), node.value.args[0].id)
        elif call == "MODULE_VERSION" and args:
            info.info["version"] = str(args[0])
        elif call == "MODULE_LICENSE" and args:
            info.license = str(args[0])
        elif call == "MODULE_DESCRIPTION" and args:
            info.description = str(args[0])
        elif call == "MODULE_AUTHOR" and args:
            info.authors.append(str(args[0]))
        elif call == "MODULE_INFO" and len(args) == 2:
            info.info[str(args[0])] = str(args[1])
        elif call in ("module_param", "module_param_named", "module_param_array") and len(args) >= 3:
            ptype = args[2] if call == "module_param_named" else args[1]
            kind = f"array of {str(ptype)}" if call == "module_param_array" else ptype
            params[str(args[0])] = ["", str(kind)]
        elif call == "MODULE_PARM_DESC" and len(args) == 2 and args[0] in params:
            params[str(args[0])][0] = str(args[1])
    info.params = [(name, desc, ptype) for name, (desc, ptype) in params.items()]
    return info


def _modinfo_entry(call: str, args: list[Any]) -> tuple[str, str] | None:
    """The `key=value` a MODULE_*() or module_param*() call puts in .modinfo, as the C macro does."""
    if call in ("MODULE_LICENSE", "MODULE_AUTHOR", "MODULE_DESCRIPTION", "MODULE_VERSION") and args:
        return call.removeprefix("MODULE_").lower(), str(args[0])
    if call == "MODULE_INFO" and len(args) == 2:
        return str(args[0]), str(args[1])
    if call in ("module_param", "module_param_named", "module_param_array") and len(args) >= 3:
        ptype = args[2] if call == "module_param_named" else args[1]
        return "parmtype", f"{args[0]}:{'array of ' if call == 'module_param_array' else ''}{ptype}"
    if call == "MODULE_PARM_DESC" and len(args) == 2:
        return "parm", f"{args[0]}:{args[1]}"
    return None
