"""A control request's arguments, checked against the annotations of the operation.

A request is JSON from another process: any field may hold any JSON value.
The operations trust their annotations (a comm is a str, a pid an int), so a
list where a str belongs would be stored in the emulated kernel and break
every later reader of it.  Each field is therefore checked here, once, before
the operation runs, against the type its parameter is annotated with:
exactly that type (a bool is no int, though an int is a float), None only
where the annotation allows it, and the items of lists and dicts too.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

SCALARS: dict[object, str] = {str: "str", int: "int", float: "float", bool: "bool", bytes: "bytes",
                              type(None): "null"}
"""The types a parameter may be made of, as the refusal names them (None: JSON's null)."""


class UncheckableParameter(TypeError):
    """An operation's parameter has no annotation this module can check a value against."""


def describe(hint: object) -> str:
    """The type as a refusal names it: "int or null", "list[str]"; UncheckableParameter
    for an annotation outside SCALARS, lists, dicts and unions of those."""
    if hint in SCALARS:
        return SCALARS[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        names = [describe(arm) for arm in args]
        return ", ".join(names[:-1]) + " or " + names[-1]
    if origin is list and len(args) == 1:
        return f"list[{describe(args[0])}]"
    if origin is dict and len(args) == 2:
        return f"dict[{describe(args[0])}, {describe(args[1])}]"
    raise UncheckableParameter(f"cannot check a request field against {hint!r}")


def matches(value: object, hint: object) -> bool:
    """Whether value is of the annotated type (an annotation `describe` accepts)."""
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint in SCALARS:
        return isinstance(value, hint)  # type: ignore[arg-type]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, arm) for arm in args)
    if origin is list:
        return isinstance(value, list) and all(matches(item, args[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict) and all(matches(k, args[0]) and matches(v, args[1])
                                               for k, v in value.items())
    raise UncheckableParameter(f"cannot check a request field against {hint!r}")


@functools.cache
def parameter_types(function: Callable[..., Any]) -> Mapping[str, object]:
    """Each parameter of function (an unbound method: `self` is left out) and its
    resolved annotation; UncheckableParameter if one has none, or one `describe` refuses."""
    hints = typing.get_type_hints(function)
    parameters = list(inspect.signature(function).parameters)[1:]
    for name in parameters:
        if name not in hints:
            raise UncheckableParameter(f"{function.__qualname__}: parameter {name} has no annotation")
        describe(hints[name])
    return types.MappingProxyType({name: hints[name] for name in parameters})


def wrong_argument(method: Callable[..., Any], args: Mapping[str, object]) -> str | None:
    """Why args (already bound to the method's signature) do not fit its annotations:
    "<field> must be <type>" for the first that does not; None if all do."""
    hints = parameter_types(getattr(method, "__func__", method))
    for name, value in args.items():
        if not matches(value, hints[name]):
            return f"{name} must be {describe(hints[name])}"
    return None
