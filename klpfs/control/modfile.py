"""Module files: the TOML that `klpfs insmod` loads in place of a .ko.

Parsing validates everything before anything touches the emulated kernel,
and every error names the file, the key and the problem.  The format is
documented in docs/modules.md.
"""

from __future__ import annotations

import re
import string
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from klpfs.kernel.module import MODULE_NAME_LEN
from klpfs.kernel.params import INT_RANGES
from klpfs.kernel.printk import KERN_ERR, KERN_INFO, KERN_NOTICE, KERN_WARNING, LOG_LINE_MAX
from klpfs.kernel.sched import TASK_INTERRUPTIBLE, TASK_UNINTERRUPTIBLE
from klpfs.kernel.timers import time_problem
from klpfs.modules import program as p
from klpfs.modules.livepatch_module import CALLBACK_NAMES

PARAM_PYTHON_TYPES = {"int": int, "bool": bool, "charp": str}
LEVELS = {"err": KERN_ERR, "warn": KERN_WARNING, "notice": KERN_NOTICE, "info": KERN_INFO}
STEP_VERBS = ("log", "output", "sleep", "new", "call", "for_each", "shadow_alloc",
              "shadow_get_or_alloc", "shadow_free", "shadow_free_all", "if_shadow", "if_prev_state")
STEP_MODIFIERS = {"log": {"level"}, "sleep": {"state"}, "new": {"expires"}, "for_each": {"expired", "do"},
                  "shadow_alloc": {"ctor_ret"}, "shadow_get_or_alloc": {"ctor_ret"},
                  "shadow_free": {"dtor_log"}, "shadow_free_all": {"dtor_log"}, "if_shadow": {"then", "else"},
                  "if_prev_state": {"then", "else"}}
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
MAX_STEP_DEPTH = 32
"""How deep steps may nest (for_each, if_shadow, if_prev_state in one another): the
interpreter walks them recursively, and no module needs more than a few levels."""
TEMPLATE_WIDTH_MAX = LOG_LINE_MAX - 1
"""The widest a template's format spec may make a field: the longest text a log record keeps."""


class ModuleFileError(ValueError):
    """A module file that cannot be loaded; the message names file, key and problem."""


@dataclass
class Param:
    type: str
    default: int | bool | str
    perm: int
    description: str = ""


@dataclass
class Callback:
    steps: tuple[p.Step, ...]
    ret: p.Value = 0


@dataclass
class FuncFile:
    old_name: str
    new_func: str
    old_sympos: int = 0
    immediate: bool = False


@dataclass
class ObjectFile:
    name: str | None
    funcs: list[FuncFile]
    callbacks: dict[str, Callback]


@dataclass
class Work:
    func: str
    delay: p.Value = 0
    every: p.Value | None = None


@dataclass(frozen=True)
class ParamTime:
    """A time given by a parameter (`"{param}"`): checked again with the value insmod gives it."""

    key: str
    param: str
    positive: bool = False
    """`every`: 0 is no period."""


@dataclass
class Kthread:
    comm: str
    func: str


@dataclass
class Function:
    name: str
    size: int
    steps: tuple[p.Step, ...]
    notrace: bool = False


@dataclass
class ModuleFile:
    path: Path
    name: str
    description: str = ""
    license: str = "GPL"
    livepatch: bool = False
    out_of_tree: bool = False
    signed: bool = True
    params: dict[str, Param] = field(default_factory=dict)
    functions: list[Function] = field(default_factory=list)
    init_func: str = ""
    init_steps: tuple[p.Step, ...] = ()
    init_ret: p.Value = 0
    work: list[Work] = field(default_factory=list)
    kthreads: list[Kthread] = field(default_factory=list)
    exit_func: str = ""
    exit_steps: tuple[p.Step, ...] = ()
    objs: list[ObjectFile] | None = None
    immediate: bool = False
    replace: bool = False
    states: list[tuple[int, int]] = field(default_factory=list)
    """(id, version) of each klp_state the patch carries."""
    param_times: list[ParamTime] = field(default_factory=list)
    """The times that parameters give, for init to check with the values insmod set."""

    def all_steps(self) -> Iterator[p.Step]:
        """Every step of every function, init, exit and callback, nested ones included."""
        lists = [f.steps for f in self.functions] + [self.init_steps, self.exit_steps]
        lists += [cb.steps for obj in self.objs or () for cb in obj.callbacks.values()]
        for steps in lists:
            yield from p.walk(steps)


def module_name_from_path(path: Path) -> str:
    """What kbuild names a module: the file's stem with '-' turned into '_'."""
    return path.stem.replace("-", "_")


def load_module_file(path: str | Path) -> ModuleFile:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ModuleFileError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModuleFileError(f"{path}: cannot read: {e}") from None
    return parse_module_file(path, text)


def time_error(seconds: object, positive: bool = False) -> str | None:
    """Why `seconds` cannot be a module file's time (None if it can): what no
    jiffies value holds, or, for a period (`positive`), no time at all."""
    problem = time_problem(seconds)
    if problem is None and positive and seconds == 0:
        return "must be more than 0 (a work that re-arms itself at once would never let its kworker rest)"
    return problem


def parse_module_file(path: str | Path, text: str) -> ModuleFile:
    """Parse and validate a module file's text; `path` names it in errors and gives its default name."""
    path = Path(path)
    try:
        raw = tomllib.loads(text)
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively.
        raise ModuleFileError(f"{path}: nested too deeply to parse") from None
    except MemoryError:
        raise ModuleFileError(f"{path}: too large to parse") from None
    except ValueError as e:  # TOMLDecodeError, or an integer past int()'s digit limit
        raise ModuleFileError(f"{path}: not valid TOML: {e}") from None
    return _Parser(path).parse(raw)


class _Parser:
    def __init__(self, path: Path):
        self.path = path
        self.params: dict[str, Param] = {}
        self.param_times: list[ParamTime] = []

    def error(self, key: str, problem: str) -> ModuleFileError:
        return ModuleFileError(f"{self.path}: {key}: {problem}")

    # -- typed getters ----------------------------------------------------------

    def table(self, raw: dict[str, Any], key: str, where: str, allowed: set[str]) -> dict[str, Any]:
        value = raw.get(key, {})
        if not isinstance(value, dict):
            raise self.error(where, "must be a table")
        self.keys(value, where, allowed)
        return value

    def keys(self, raw: dict[str, Any], where: str, allowed: set[str]) -> None:
        for key in raw:
            if key not in allowed:
                raise self.error(f"{where}.{key}" if where else key,
                                 f"unknown key (expected one of: {', '.join(sorted(allowed))})")

    def get(self, raw: dict[str, Any], key: str, where: str, kind: type | tuple[type, ...], default: Any = None,
            required: bool = False) -> Any:
        if key not in raw:
            if required:
                raise self.error(f"{where}.{key}" if where else key, "is required")
            return default
        value = raw[key]
        bad_bool = isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))
        if not isinstance(value, kind) or bad_bool:
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise self.error(f"{where}.{key}" if where else key, f"must be {_article(names)}, not {value!r}")
        return value

    def name(self, raw: dict[str, Any], key: str, where: str, required: bool = True) -> str:
        value = self.get(raw, key, where, str, required=required)
        if value is not None and not NAME_RE.match(value):
            raise self.error(f"{where}.{key}", f"{value!r} is not a valid symbol name")
        name: str = value
        return name

    def own_function(self, raw: dict[str, Any], key: str, where: str, own: set[str]) -> str:
        """A required name that must be one of the module's own [[function]]s."""
        name = self.name(raw, key, where)
        if name not in own:
            raise self.error(f"{where}.{key}", f"{name!r} is not one of this module's functions")
        return name

    def value(self, raw: Any, where: str) -> p.Value:
        """A number or a "{param}" naming an int parameter."""
        if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
            raise self.error(where, f"must be a number or \"{{param}}\", not {raw!r}")
        if isinstance(raw, str):
            m = re.fullmatch(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", raw)
            if m is None or m.group(1) not in self.params:
                raise self.error(where, f"{raw!r} is neither a number nor a \"{{param}}\" naming a parameter")
            if self.params[m.group(1)].type != "int":
                raise self.error(where, f"parameter {m.group(1)!r} is not an int")
        return raw

    def ret(self, raw: Any, where: str) -> p.Value:
        """What a C function returns: an int, or a "{param}" naming an int parameter (a
        C int too), within the range of C's int."""
        value = self.value(raw, where)
        low, high = INT_RANGES["int"]
        if isinstance(value, float) or (isinstance(value, int) and not low <= value <= high):
            raise self.error(where, f"must be an int from {low} to {high} (a C function's int), not {raw!r}")
        return value

    def time(self, raw: Any, where: str, positive: bool = False) -> p.Value:
        """A time in seconds, or a "{param}" naming an int parameter whose default is one.
        Times become jiffies in the kernel; see time_error()."""
        value = self.value(raw, where)
        if isinstance(value, str):
            param = value.strip("{}")
            problem = time_error(self.params[param].default, positive)
            if problem is not None:
                raise self.error(where, f"parameter {param!r} defaults to {self.params[param].default!r}, "
                                        f"not a time: {problem}")
            self.param_times.append(ParamTime(where, param, positive))
            return value
        problem = time_error(value, positive)
        if problem is not None:
            raise self.error(where, problem)
        return value

    def template(self, raw: Any, where: str) -> str:
        if not isinstance(raw, str):
            raise self.error(where, f"must be a string, not {raw!r}")
        try:
            parsed = [(f, spec) for _, f, spec, _ in string.Formatter().parse(raw) if f is not None]
        except ValueError as e:
            raise self.error(where, f"bad template: {e}") from None
        for _, spec in parsed:
            # str.format builds a field as wide as its spec asks before printk cuts the line.
            if "{" in (spec or ""):
                raise self.error(where, f"format spec {spec!r}: a spec cannot hold {{fields}}")
            if any(int(n) > TEMPLATE_WIDTH_MAX for n in re.findall(r"\d+", spec or "")):
                raise self.error(where, f"format spec {spec!r}: wider than a log line ({TEMPLATE_WIDTH_MAX} bytes)")
        fields = [f for f, _ in parsed]
        for f in fields:
            if f.split(".")[0].split("[")[0] not in (*self.params, *p.CONTEXT_NAMES):
                raise self.error(where, f"unknown name {{{f}}} (parameters: {', '.join(self.params) or 'none'}; "
                                        f"also {', '.join('{' + n + '}' for n in p.CONTEXT_NAMES)})")
        return raw

    # -- steps ---------------------------------------------------------------------

    def steps(self, raw: Any, where: str, may_sleep: bool, depth: int = 1) -> tuple[p.Step, ...]:
        if not isinstance(raw, list):
            raise self.error(where, "must be an array of steps")
        if depth > MAX_STEP_DEPTH:
            raise self.error(where, f"steps nested more than {MAX_STEP_DEPTH} deep")
        return tuple(self.step(s, f"{where}[{i}]", may_sleep, depth) for i, s in enumerate(raw))

    def step(self, raw: Any, where: str, may_sleep: bool, depth: int) -> p.Step:
        if not isinstance(raw, dict):
            raise self.error(where, "a step must be a table such as { log = \"...\" }")
        verbs = [k for k in raw if k in STEP_VERBS]
        if len(verbs) != 1:
            raise self.error(where, f"a step needs exactly one of: {', '.join(STEP_VERBS)}")
        verb = verbs[0]
        self.keys(raw, where, {verb, *STEP_MODIFIERS.get(verb, ())})
        arg = raw[verb]
        at = f"{where}.{verb}"
        if verb == "log":
            level = self.get(raw, "level", where, str, "info")
            if level not in LEVELS:
                raise self.error(f"{where}.level", f"must be one of {', '.join(LEVELS)}")
            return p.Log(self.template(arg, at), LEVELS[level])
        if verb == "output":
            return p.Output(self.template(arg, at))
        if verb == "sleep":
            if not may_sleep:
                raise self.error(at, "only a [[function]] body may sleep")
            state = self.get(raw, "state", where, str, TASK_UNINTERRUPTIBLE)
            if state not in (TASK_UNINTERRUPTIBLE, TASK_INTERRUPTIBLE):
                raise self.error(f"{where}.state", "must be \"D\" (uninterruptible) or \"S\" (interruptible)")
            return p.Sleep(None if arg == "forever" else self.time(arg, at), state)
        if verb == "new":
            if not isinstance(arg, str) or not NAME_RE.match(arg):
                raise self.error(at, "must name a list")
            return p.New(arg, self.time(raw.get("expires", 0), f"{where}.expires"))
        if verb == "call":
            if not isinstance(arg, str) or not NAME_RE.match(arg):
                raise self.error(at, "must name a function")
            return p.Call(arg)
        if verb == "for_each":
            if not isinstance(arg, str) or not NAME_RE.match(arg):
                raise self.error(at, "must name a list")
            return p.ForEach(arg, self.get(raw, "expired", where, bool, False),
                             self.steps(raw.get("do", []), f"{where}.do", False, depth + 1))
        shadow_id = self.get(raw, verb, where, int)
        if verb in ("shadow_alloc", "shadow_get_or_alloc"):
            ctor_ret = raw.get("ctor_ret")
            return p.ShadowAlloc(shadow_id, verb == "shadow_get_or_alloc",
                                 None if ctor_ret is None else self.ret(ctor_ret, f"{where}.ctor_ret"))
        if verb in ("shadow_free", "shadow_free_all"):
            dtor_log = raw.get("dtor_log")
            return p.ShadowFree(shadow_id, verb == "shadow_free_all",
                                None if dtor_log is None else self.template(dtor_log, f"{where}.dtor_log"))
        branch = p.IfShadow if verb == "if_shadow" else p.IfPrevState
        return branch(shadow_id, self.steps(raw.get("then", []), f"{where}.then", False, depth + 1),
                      self.steps(raw.get("else", []), f"{where}.else", False, depth + 1))

    # -- sections ----------------------------------------------------------------------

    def parse(self, raw: dict[str, Any]) -> ModuleFile:
        self.keys(raw, "", {"module", "params", "function", "init", "exit", "patch"})
        module = self.table(raw, "module", "module", {"name", "description", "license", "livepatch",
                                                        "out_of_tree", "signed"})
        name = self.name(module, "name", "module", required=False) or module_name_from_path(self.path)
        if not NAME_RE.match(name) or "." in name:
            raise self.error("module.name", f"{name!r} is not a valid module name")
        if len(name) >= MODULE_NAME_LEN:
            raise self.error("module.name", f"must be shorter than {MODULE_NAME_LEN} characters")
        mf = ModuleFile(self.path, name,
                        description=self.get(module, "description", "module", str, ""),
                        license=self.get(module, "license", "module", str, "GPL"),
                        out_of_tree=self.get(module, "out_of_tree", "module", bool, False),
                        signed=self.get(module, "signed", "module", bool, True))
        self.parse_params(raw.get("params", {}))
        mf.params = self.params
        mf.functions = self.parse_functions(raw.get("function", []))
        self.parse_init_exit(raw, mf)
        if "patch" in raw:
            self.parse_patch(raw["patch"], mf)
        mf.livepatch = self.get(module, "livepatch", "module", bool, mf.objs is not None)
        mf.param_times = self.param_times
        return mf

    def parse_params(self, raw: Any) -> None:
        if not isinstance(raw, dict):
            raise self.error("params", "must be a table of parameter tables")
        for pname, spec in raw.items():
            where = f"params.{pname}"
            if not NAME_RE.match(pname) or pname in p.CONTEXT_NAMES:
                raise self.error(where, "is not a valid parameter name")
            if not isinstance(spec, dict):
                raise self.error(where, "must be a table")
            self.keys(spec, where, {"type", "default", "perm", "description"})
            ptype = self.get(spec, "type", where, str, "int")
            if ptype not in PARAM_PYTHON_TYPES:
                raise self.error(f"{where}.type", f"must be one of {', '.join(PARAM_PYTHON_TYPES)}")
            default = self.get(spec, "default", where, PARAM_PYTHON_TYPES[ptype], PARAM_PYTHON_TYPES[ptype]())
            low, high = INT_RANGES["int"]
            if ptype == "int" and not low <= default <= high:
                raise self.error(f"{where}.default", f"must fit a C int ({low} to {high})")
            perm = self.get(spec, "perm", where, int, 0o644)
            if perm & ~0o777:
                raise self.error(f"{where}.perm", "must be a file mode such as 0o644")
            self.params[pname] = Param(ptype, default, perm, self.get(spec, "description", where, str, ""))

    def parse_functions(self, raw: Any) -> list[Function]:
        if not isinstance(raw, list):
            raise self.error("function", "must be an array of tables ([[function]])")
        functions = []
        for i, spec in enumerate(raw):
            where = f"function[{i}]"
            if not isinstance(spec, dict):
                raise self.error(where, "must be a table")
            self.keys(spec, where, {"name", "size", "output", "run", "notrace"})
            size = self.get(spec, "size", where, int, 0x100)
            if size <= 0:
                raise self.error(f"{where}.size", "must be positive")
            steps = self.steps(spec.get("run", []), f"{where}.run", True)
            if "output" in spec:
                steps += (p.Output(self.template(spec["output"], f"{where}.output")),)
            functions.append(Function(self.name(spec, "name", where), size, steps,
                                      self.get(spec, "notrace", where, bool, False)))
        names = [f.name for f in functions]
        for fname in names:
            if names.count(fname) > 1:
                raise self.error("function", f"{fname!r} is defined twice")
        return functions

    def parse_init_exit(self, raw: dict[str, Any], mf: ModuleFile) -> None:
        init = self.table(raw, "init", "init", {"function", "run", "ret", "work", "kthreads"})
        mf.init_func = self.name(init, "function", "init", required=False) or f"{mf.name}_init"
        mf.init_steps = self.steps(init.get("run", []), "init.run", False)
        mf.init_ret = self.ret(init.get("ret", 0), "init.ret")
        own = {f.name for f in mf.functions}
        for i, w in enumerate(self.get(init, "work", "init", list, [])):
            where = f"init.work[{i}]"
            if not isinstance(w, dict):
                raise self.error(where, "must be a table such as { func = \"...\", delay = 0 }")
            self.keys(w, where, {"func", "delay", "every"})
            func = self.own_function(w, "func", where, own)
            every = w.get("every")
            mf.work.append(Work(func, self.time(w.get("delay", 0), f"{where}.delay"),
                                None if every is None else self.time(every, f"{where}.every", positive=True)))
        for i, k in enumerate(self.get(init, "kthreads", "init", list, [])):
            where = f"init.kthreads[{i}]"
            if not isinstance(k, dict):
                raise self.error(where, "must be a table such as { comm = \"...\", func = \"...\" }")
            self.keys(k, where, {"comm", "func"})
            comm = self.get(k, "comm", where, str, required=True)
            if not 0 < len(comm) < 16:
                raise self.error(f"{where}.comm", "must be 1 to 15 characters")
            func = self.own_function(k, "func", where, own)
            mf.kthreads.append(Kthread(comm, func))
        exit_ = self.table(raw, "exit", "exit", {"function", "run"})
        mf.exit_func = self.name(exit_, "function", "exit", required=False) or f"{mf.name}_exit"
        mf.exit_steps = self.steps(exit_.get("run", []), "exit.run", False)

    def parse_patch(self, raw: Any, mf: ModuleFile) -> None:
        if not isinstance(raw, dict):
            raise self.error("patch", "must be a table")
        self.keys(raw, "patch", {"immediate", "replace", "object", "state"})
        mf.immediate = self.get(raw, "immediate", "patch", bool, False)
        mf.replace = self.get(raw, "replace", "patch", bool, False)
        for i, state in enumerate(self.get(raw, "state", "patch", list, [])):
            where = f"patch.state[{i}]"
            if not isinstance(state, dict):
                raise self.error(where, "must be a table such as { id = 1, version = 1 }")
            self.keys(state, where, {"id", "version"})
            state_id = self.get(state, "id", where, int, required=True)
            if state_id <= 0:
                raise self.error(f"{where}.id", "must be positive (0 ends the kernel's states array)")
            if any(sid == state_id for sid, _ in mf.states):
                raise self.error(f"{where}.id", f"state {state_id} is listed twice")
            version = self.get(state, "version", where, int, 0)
            if version < 0:
                raise self.error(f"{where}.version", "must not be negative")
            mf.states.append((state_id, version))
        objects = self.get(raw, "object", "patch", list, [])
        if not objects:
            raise self.error("patch.object", "a patch needs at least one [[patch.object]]")
        own = {f.name for f in mf.functions}
        mf.objs = []
        for i, o in enumerate(objects):
            where = f"patch.object[{i}]"
            if not isinstance(o, dict):
                raise self.error(where, "must be a table")
            self.keys(o, where, {"name", "func", "callbacks"})
            oname = self.name(o, "name", where)
            if len(oname) >= MODULE_NAME_LEN:
                raise self.error(f"{where}.name", f"must be shorter than {MODULE_NAME_LEN} characters")
            funcs = []
            for j, f in enumerate(self.get(o, "func", where, list, [])):
                fwhere = f"{where}.func[{j}]"
                if not isinstance(f, dict):
                    raise self.error(fwhere, "must be a table")
                self.keys(f, fwhere, {"old_name", "new_func", "old_sympos", "immediate"})
                new_func = self.own_function(f, "new_func", fwhere, own)
                sympos = self.get(f, "old_sympos", fwhere, int, 0)
                if sympos < 0:
                    raise self.error(f"{fwhere}.old_sympos", "must not be negative")
                funcs.append(FuncFile(self.name(f, "old_name", fwhere), new_func, sympos,
                                      self.get(f, "immediate", fwhere, bool, False)))
            callbacks = {}
            for cb_name, cb in self.table(o, "callbacks", f"{where}.callbacks", set(CALLBACK_NAMES)).items():
                cwhere = f"{where}.callbacks.{cb_name}"
                if not isinstance(cb, dict):
                    raise self.error(cwhere, "must be a table such as { run = [...], ret = 0 }")
                self.keys(cb, cwhere, {"run", "ret"} if cb_name == "pre_patch" else {"run"})
                callbacks[cb_name] = Callback(self.steps(cb.get("run", []), f"{cwhere}.run", False),
                                              self.ret(cb.get("ret", 0), f"{cwhere}.ret"))
            mf.objs.append(ObjectFile(None if oname == "vmlinux" else oname, funcs, callbacks))


def _article(names: str) -> str:
    return ("an " if names[0] in "aeiou" else "a ") + names
