"""Hypothesis strategies for module files, from the schema klpfs/control/modfile.py
parses (docs/modules.md describes it): valid files for a given profile, and
those files mutated one key at a time.

Left out on purpose, each covered by its own test case instead: times that are
no time (NaN, infinities, negative, huge), log lines past printk's bounds,
nesting deeper than a few levels, and call cycles (a function reaching itself
recurses until the kernel stack overflows).  Calls only go to functions
declared earlier, and a patch never replaces one of its own module's
functions, so no generated call path is a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from klpfs.control.modfile import LEVELS
from klpfs.kernel.image import load_image
from klpfs.modules.livepatch_module import CALLBACK_NAMES
from klpfs.profiles import Profile, get_profile

from .tomlgen import dumps

NAME = st.from_regex(r"[a-z_][a-z0-9_]{0,11}", fullmatch=True)
TEXT = st.text(st.characters(exclude_characters="{}", exclude_categories=["Cs"]), max_size=24)
SECONDS = st.integers(0, 5)
RETURNS = st.sampled_from([0, 0, 0, -1, -2, -12, -16, -19, -22, -95])
"""0 mostly, else a negative errno an init or pre_patch callback may return (never -EIO:
that one must mean a klpfs failure in these tests)."""
STEP_DEPTH = 2
FUNCTIONS = 4
PROFILES = ("4.15", "4.16", "5.1", "6.1", "6.14")


@dataclass(frozen=True)
class VmlinuxFunction:
    name: str
    sympos: int
    """Which occurrence of the name this is (1 for the first)."""


def vmlinux_functions() -> list[VmlinuxFunction]:
    """The emulated vmlinux's functions, notrace ones included, each duplicate name counted."""
    seen: dict[str, int] = {}
    out = []
    for func in load_image("").functions:
        seen[func.name] = seen.get(func.name, 0) + 1
        out.append(VmlinuxFunction(func.name, seen[func.name]))
    return out


VMLINUX = vmlinux_functions()


@st.composite
def templates(draw: st.DrawFn, params: list[str]) -> str:
    """Literal text and {names}: the module's parameters and the context names."""
    names = [*params, "__func__", "obj", "jiffies", "expires", "target", "data", "prev_version"]
    parts = draw(st.lists(st.one_of(TEXT, st.sampled_from(names).map(lambda n: "{" + n + "}")), max_size=4))
    return "".join(parts)


@st.composite
def steps(draw: st.DrawFn, ctx: _Context, may_sleep: bool, depth: int = 0) -> list[dict[str, Any]]:
    verbs = ["log", "output", "new", "call", "for_each", "shadow_alloc", "shadow_free", "if_shadow"]
    if may_sleep:
        verbs.append("sleep")
    if ctx.profile.shadow_ctor_dtor:
        verbs.append("shadow_get_or_alloc")
    if ctx.profile.system_states:
        verbs.append("if_prev_state")
    if depth >= STEP_DEPTH:
        verbs = [v for v in verbs if v not in ("for_each", "if_shadow", "if_prev_state")]
    out = []
    for verb in draw(st.lists(st.sampled_from(verbs), max_size=3)):
        out.append(draw(step(ctx, verb, depth)))
    return out


@st.composite
def step(draw: st.DrawFn, ctx: _Context, verb: str, depth: int) -> dict[str, Any]:
    shadow_id = st.integers(0, 3)
    if verb == "log":
        return {"log": draw(templates(ctx.params)), "level": draw(st.sampled_from(list(LEVELS)))}
    if verb == "output":
        return {"output": draw(templates(ctx.params))}
    if verb == "sleep":
        return {"sleep": draw(SECONDS), "state": draw(st.sampled_from(["D", "S"]))}
    if verb == "new":
        return {"new": draw(st.sampled_from(["items", "other"])), "expires": draw(SECONDS)}
    if verb == "call":
        callee = draw(st.sampled_from(ctx.callable)) if ctx.callable else "cmdline_proc_show"
        return {"call": callee}
    if verb == "for_each":
        return {"for_each": draw(st.sampled_from(["items", "other"])), "expired": draw(st.booleans()),
                "do": draw(steps(ctx.without_calls_to_sleepers(), False, depth + 1))}
    out: dict[str, Any]
    if verb in ("shadow_alloc", "shadow_get_or_alloc"):
        out = {verb: draw(shadow_id)}
        if ctx.profile.shadow_ctor_dtor and draw(st.booleans()):
            out["ctor_ret"] = draw(RETURNS)
        return out
    if verb == "shadow_free":
        out = {draw(st.sampled_from(["shadow_free", "shadow_free_all"])): draw(shadow_id)}
        if ctx.profile.shadow_ctor_dtor and draw(st.booleans()):
            out["dtor_log"] = draw(templates(ctx.params))
        return out
    inner = ctx.without_calls_to_sleepers()
    return {verb: draw(shadow_id), "then": draw(steps(inner, False, depth + 1)),
            "else": draw(steps(inner, False, depth + 1))}


@dataclass(frozen=True)
class _Context:
    """What the steps being generated may refer to."""

    profile: Profile
    params: list[str]
    callable: list[str]
    """Functions a call may reach: declared earlier, and for code that must not sleep,
    ones that never sleep."""
    sleepers: frozenset[str] = frozenset()

    def without_calls_to_sleepers(self) -> _Context:
        return _Context(self.profile, self.params, [f for f in self.callable if f not in self.sleepers],
                        self.sleepers)


def _sleeps(body: list[dict[str, Any]], sleepers: frozenset[str]) -> bool:
    return any("sleep" in s or s.get("call") in sleepers for s in body)


@st.composite
def module_documents(draw: st.DrawFn, profile: Profile) -> dict[str, Any]:
    """A module file this profile loads (or refuses only for what the kernel refuses at load)."""
    doc: dict[str, Any] = {}
    module: dict[str, Any] = {"name": "gen_" + draw(NAME)}
    for key, values in (("out_of_tree", st.booleans()), ("signed", st.booleans()),
                        ("description", TEXT), ("license", st.sampled_from(["GPL", "GPL v2", "MIT"]))):
        if draw(st.booleans()):
            module[key] = draw(values)
    doc["module"] = module
    params = draw(st.dictionaries(NAME.map(lambda n: "p_" + n), st.sampled_from(["int", "bool", "charp"]),
                                  max_size=3))
    if params:
        doc["params"] = {name: _param(draw, ptype) for name, ptype in params.items()}
    int_params = [name for name, ptype in params.items() if ptype == "int"]
    ctx = _Context(profile, list(params), [])
    functions: list[dict[str, Any]] = []
    sleepers: set[str] = set()
    for i in range(draw(st.integers(0, FUNCTIONS))):
        name = f"{module['name']}_fn{i}"
        body = draw(steps(_Context(profile, list(params), [f["name"] for f in functions], frozenset(sleepers)),
                          True))
        func: dict[str, Any] = {"name": name, "run": body}
        if draw(st.booleans()):
            func["size"] = draw(st.integers(1, 0x200))
        if draw(st.booleans()):
            func["notrace"] = draw(st.booleans())
        if _sleeps(body, frozenset(sleepers)):
            sleepers.add(name)
        functions.append(func)
    if functions:
        doc["function"] = functions
    own = [f["name"] for f in functions]
    ctx = _Context(profile, list(params), own, frozenset(sleepers)).without_calls_to_sleepers()
    init: dict[str, Any] = {"run": draw(steps(ctx, False))}
    if draw(st.booleans()):
        names = st.sampled_from(int_params).map(lambda name: "{" + name + "}") if int_params else RETURNS
        init["ret"] = draw(st.one_of(RETURNS, names))
    with_work, with_kthreads = draw(st.booleans()), draw(st.booleans())
    if own and with_work:
        init["work"] = draw(st.lists(st.fixed_dictionaries(
            {"func": st.sampled_from(own), "delay": SECONDS},
            optional={"every": st.integers(1, 5)}), max_size=2))
    if own and with_kthreads:
        init["kthreads"] = draw(st.lists(st.fixed_dictionaries(
            {"comm": st.from_regex(r"[a-z][a-z0-9_/]{0,14}", fullmatch=True), "func": st.sampled_from(own)}),
            max_size=2))
    doc["init"] = init
    doc["exit"] = {"run": draw(steps(ctx, False))}
    if draw(st.integers(0, 9)) < 6:
        doc["patch"] = draw(patches(ctx, own))
    return doc


def _param(draw: st.DrawFn, ptype: str) -> dict[str, Any]:
    default = {"int": st.one_of(RETURNS, st.integers(-(1 << 31), 0)), "bool": st.booleans(), "charp": TEXT}[ptype]
    spec: dict[str, Any] = {"type": ptype, "default": draw(default)}
    if draw(st.booleans()):
        spec["perm"] = draw(st.sampled_from([0, 0o644, 0o444, 0o600]))
    return spec


@st.composite
def patches(draw: st.DrawFn, ctx: _Context, own: list[str]) -> dict[str, Any]:
    profile = ctx.profile
    patch: dict[str, Any] = {}
    if profile.atomic_replace and draw(st.booleans()):
        patch["replace"] = draw(st.booleans())
    if profile.immediate and draw(st.booleans()):
        patch["immediate"] = draw(st.booleans())
    if profile.system_states and draw(st.booleans()):
        ids = draw(st.lists(st.integers(1, 4), unique=True, max_size=2))
        patch["state"] = [{"id": i, "version": draw(st.integers(0, 3))} for i in ids]
    objects = []
    for _ in range(draw(st.integers(1, 2))):
        obj: dict[str, Any] = {"name": draw(st.sampled_from(["vmlinux", "vmlinux", "gen_target"]))}
        if own:
            funcs = []
            for _ in range(draw(st.integers(0, 2))):
                old = draw(st.sampled_from(VMLINUX))
                func: dict[str, Any] = {"old_name": old.name, "new_func": draw(st.sampled_from(own))}
                if draw(st.booleans()):
                    func["old_sympos"] = draw(st.sampled_from([0, old.sympos, old.sympos + 1]))
                if profile.immediate and draw(st.booleans()):
                    func["immediate"] = draw(st.booleans())
                funcs.append(func)
            if funcs:
                obj["func"] = funcs
        callbacks: dict[str, dict[str, Any]] = {}
        for name in draw(st.lists(st.sampled_from(list(CALLBACK_NAMES)), unique=True, max_size=4)):
            callbacks[name] = {"run": draw(steps(ctx, False))}
            if name == "pre_patch" and draw(st.booleans()):
                callbacks[name]["ret"] = draw(RETURNS)
        if callbacks:
            obj["callbacks"] = callbacks
        objects.append(obj)
    patch["object"] = objects
    return patch


ODD_VALUES: st.SearchStrategy[Any] = st.one_of(st.integers(-(1 << 63), (1 << 63) - 1), st.booleans(), TEXT, st.just([]),
                       st.just({}), st.floats(-10, 10), st.just({"x": 1}), st.just(["a", 1]))
"""What a mutation puts in place of a value: anything TOML can hold, times aside."""
SAFE_FOR_TIMES: st.SearchStrategy[Any] = st.one_of(st.integers(0, 10), st.booleans(), TEXT, st.just([]),
                                                   st.floats(0, 10))
TIME_KEYS = {"sleep", "delay", "every", "expires"}


def paths(value: Any, prefix: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    """Every key path of a document, tables and arrays entered."""
    out = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        out.append((*prefix, key))
        out.extend(paths(inner, (*prefix, key)))
    return out


@st.composite
def mutated(draw: st.DrawFn, document: dict[str, Any]) -> dict[str, Any]:
    """The document with one change: a key dropped, a value replaced, or an unknown key added."""
    where = paths(document)
    if not where:
        return {**document, draw(NAME): draw(ODD_VALUES)}
    path = draw(st.sampled_from(where))
    parent: Any = document
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    kind = draw(st.sampled_from(["drop", "replace", "add"]))
    if kind == "drop":
        del parent[last]
    elif kind == "replace":
        parent[last] = draw(SAFE_FOR_TIMES if last in TIME_KEYS else ODD_VALUES)
    elif isinstance(parent, dict):
        parent["x_" + draw(NAME)] = draw(ODD_VALUES)
    else:
        parent.append(draw(ODD_VALUES))
    return document


@st.composite
def module_cases(draw: st.DrawFn) -> tuple[str, str]:
    """(profile, module file text): valid for the profile, one key mutated, or cut short."""
    version = draw(st.sampled_from(PROFILES))
    document = draw(module_documents(get_profile(version)))
    kind = draw(st.sampled_from(["valid", "mutated", "cut"]))
    if kind == "mutated":
        document = draw(mutated(document))
    text = dumps(document)
    if kind == "cut":
        text = text[:draw(st.integers(0, len(text)))]
    return version, text
