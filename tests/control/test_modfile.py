"""Module files: every shipped TOML module and every TOML example parses; bad
files are refused with the file, the key and the problem named, before
anything is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from klpfs.control.modfile import ModuleFileError, load_module_file, parse_module_file
from klpfs.control.samples import find_module_file, list_samples, module_stem
from klpfs.modules import program as p

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
"""The TOML versions of the kernel's samples, kept as examples of the format."""


@pytest.mark.parametrize("path", [p for p in list_samples() if p.suffix == ".toml"] + sorted(EXAMPLES.glob("*.toml")),
                         ids=lambda path: path.stem)
def test_every_sample_parses(path: Path) -> None:
    mf = load_module_file(path)
    assert mf.name == path.stem.replace("-", "_")


def test_sample_structure() -> None:
    mf = load_module_file(EXAMPLES / "livepatch-callbacks-demo.toml")
    assert mf.livepatch and mf.objs is not None
    assert [o.name for o in mf.objs] == [None, "livepatch_callbacks_mod", "livepatch_callbacks_busymod"]
    assert sorted(mf.objs[0].callbacks) == ["post_patch", "post_unpatch", "pre_patch", "pre_unpatch"]
    assert mf.objs[0].callbacks["pre_patch"].ret == "{pre_patch_ret}"
    assert mf.params["pre_patch_ret"].perm == 0o644
    busy = load_module_file(EXAMPLES / "livepatch-callbacks-busymod.toml")
    assert not busy.livepatch and busy.objs is None
    assert busy.functions[0].steps[1] == p.Sleep("{sleep_secs}", "D")


@pytest.mark.parametrize("name", ["livepatch_sample", "livepatch-sample", "livepatch-sample.ko",
                                  "/lib/modules/x/livepatch-sample.ko", "livepatch-sample.toml"])
def test_find_module_file_by_name(name: str) -> None:
    assert find_module_file(name).name == "livepatch-sample.py"
    assert module_stem(name) == "livepatch_sample"


def test_unknown_module_name() -> None:
    assert find_module_file("no-such-module") is None


GOOD_PATCH = """
[[function]]
name = "new_show"
output = "x"
[[patch.object]]
name = "vmlinux"
[[patch.object.func]]
old_name = "cmdline_proc_show"
new_func = "new_show"
"""


@pytest.mark.parametrize("text, message", [
    ("[module\n", "not valid TOML"),
    ("bogus = 1\n", "bogus: unknown key (expected one of: exit, function, init, module, params, patch)"),
    ("[module]\nname = 3\n", "module.name: must be a str, not 3"),
    ("[module]\nname = 'a-b'\n", "module.name: 'a-b' is not a valid symbol name"),
    ("[module]\nname = '" + "m" * 56 + "'\n", "module.name: must be shorter than 56 characters"),
    ("[module]\nlivepatch = 'yes'\n", "module.livepatch: must be a bool, not 'yes'"),
    ("[params.x]\ntype = 'float'\n", "params.x.type: must be one of int, bool, charp"),
    ("[params.x]\ntype = 'int'\ndefault = 'a'\n", "params.x.default: must be an int, not 'a'"),
    ("[params.x]\nperm = 0o7777\n", "params.x.perm: must be a file mode such as 0o644"),
    ("[[function]]\nname = 'f'\nsize = 0\n", "function[0].size: must be positive"),
    ("[[function]]\nname = 'f'\n[[function]]\nname = 'f'\n", "function: 'f' is defined twice"),
    ("[[function]]\nsize = 16\n", "function[0].name: is required"),
    ("[[function]]\nname = 'f'\nrun = [{ log = '{nope}' }]\n", "function[0].run[0].log: unknown name {nope}"),
    ("[[function]]\nname = 'f'\nrun = [{ jump = 1 }]\n", "function[0].run[0]: a step needs exactly one of"),
    ("[[function]]\nname = 'f'\nrun = [{ log = 'a', output = 'b' }]\n",
     "function[0].run[0]: a step needs exactly one of"),
    ("[[function]]\nname = 'f'\nrun = [{ sleep = 'long' }]\n",
     "function[0].run[0].sleep: 'long' is neither a number nor"),
    ("[[function]]\nname = 'f'\nrun = [{ sleep = 1, state = 'R' }]\n", "function[0].run[0].state: must be \"D\""),
    ("[init]\nrun = [{ sleep = 1 }]\n", "init.run[0].sleep: only a [[function]] body may sleep"),
    ("[init]\nwork = [{ func = 'nowhere' }]\n", "init.work[0].func: 'nowhere' is not one of this module's functions"),
    ("[init]\nkthreads = [{ comm = 'a_name_far_too_long', func = 'f' }]\n",
     "init.kthreads[0].comm: must be 1 to 15 characters"),
    ("[init]\nret = '{missing}'\n", "init.ret: '{missing}' is neither a number nor"),
    ("[params.s]\ntype = 'charp'\n[init]\nret = '{s}'\n", "init.ret: parameter 's' is not an int"),
    ("[patch]\nimmediate = true\n", "patch.object: a patch needs at least one [[patch.object]]"),
    (GOOD_PATCH.replace('new_func = "new_show"', 'new_func = "other"'),
     "patch.object[0].func[0].new_func: 'other' is not one of this module's functions"),
    (GOOD_PATCH + "old_sympos = -1\n", "patch.object[0].func[0].old_sympos: must not be negative"),
    (GOOD_PATCH.replace('old_name = "cmdline_proc_show"\n', ""), "patch.object[0].func[0].old_name: is required"),
    (GOOD_PATCH + "[patch.object.callbacks]\npre_unpatch = { ret = 1 }\n",
     "patch.object[0].callbacks.pre_unpatch.ret: unknown key"),
    (GOOD_PATCH + "[patch.object.callbacks]\nlate = { run = [] }\n", "patch.object[0].callbacks.late: unknown key"),
])
def test_bad_module_file(text: str, message: str) -> None:
    with pytest.raises(ModuleFileError) as info:
        parse_module_file("/tmp/bad-mod.toml", text)
    assert str(info.value).startswith("/tmp/bad-mod.toml: ")
    assert message in str(info.value)


def test_defaults() -> None:
    mf = parse_module_file("/x/my-patch.toml", GOOD_PATCH)
    assert mf.name == "my_patch"
    assert mf.livepatch
    assert mf.init_func == "my_patch_init"
    assert mf.objs[0].name is None
    assert mf.objs[0].funcs[0].old_sympos == 0
