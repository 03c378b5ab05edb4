"""Loading generated .ko files through the control operations under MockClock: the
livepatch tree, /proc/cmdline (the "call" op), lsmod and /proc/modules, dmesg,
and the kernel's refusals (bad files, vermagic, module_layout, unknown symbols,
.klp.rela symbols, old_name), with nothing loaded half-way."""

from __future__ import annotations

import base64
import errno

import pytest
import trio

from elf.elfgen import Patch, livepatch_ko
from klpfs.elf.kmod import KoError, build_ko_module
from klpfs.sysfs.kernfs import Kernfs
from profiles.conftest import Machine, make_machine, settle
from profiles.conftest import autojump_clock  # noqa: F401

TEXT = "this has been live patched by a test .ko"
NAME = "test_ko_patch"
PROFILE_RELEASE = {"4.15": "4.15.0-213-generic", "4.16": "4.16.0-2-amd64", "5.1": "5.1.20-300.fc30.x86_64",
                   "6.1": "6.1.0-50-amd64", "6.11": "6.11.10-amd64"}


def patch_for(version: str, **kw: object) -> Patch:
    flags = "SMP preempt mod_unload modversions " if version.startswith("6") else "SMP mod_unload modversions "
    defaults: dict = {"crc": 0xBCE1A965 if version == "6.1" else None, "register": version in ("4.15", "4.16")}
    return Patch(release=PROFILE_RELEASE[version], vermagic_flags=flags, **{**defaults, **kw})


async def insmod(m: Machine, data: bytes, *params: str, path: str = f"/tmp/{NAME}.ko", b64: bool = False,
                 behaviour: dict | None = None) -> dict:
    args: dict = {"path": path, "data": base64.b64encode(data).decode() if b64 else data, "params": list(params)}
    if behaviour is not None:
        args["behaviour"] = behaviour
    return await m.ctl("insmod", **args)


def nothing_loaded(m: Machine) -> bool:
    return m.kernel.modules.modules == {} and m.ls() == [] and m.kernel.kallsyms.symbols(NAME) == []


@pytest.mark.parametrize("version", ["4.15", "4.16", "5.1", "6.1", "6.11"])
async def test_livepatch_ko_on_every_profile(version: str, autojump_clock) -> None:
    """The generated sample-like patch loads on its own release: tree, output, log, size."""
    async with trio.open_nursery() as nursery:
        m = make_machine(nursery, version)
        original = m.control.call("cmdline_proc_show", None)["output"]
        reply = await insmod(m, livepatch_ko(patch_for(version)), b64=True)
        assert reply == {"ok": True, "name": NAME}
        await settle(3.5)
        assert m.read(f"{NAME}/enabled") == b"1\n" and m.read(f"{NAME}/transition") == b"0\n"
        assert "vmlinux/cmdline_proc_show,1/" in m.tree(NAME)
        called = m.control.call("cmdline_proc_show", None)
        assert (called["impl"], called["impl_module"], called["output"]) == ("patched_show", NAME, TEXT + "\n")
        assert called["output"] != original
        lines = m.lines()
        assert f"livepatch: enabling patch '{NAME}'" in lines
        assert f"livepatch: '{NAME}': patching complete" in lines
        assert f"{NAME}: tainting kernel with TAINT_LIVEPATCH" in lines
        # lsmod and /proc/modules: the kernel's layout size, 4 pages; 3 with 6.4's module_memory,
        # where this small object's few symbols share the data's page.
        size = 12288 if version == "6.11" else 16384
        assert m.control.lsmod()["modules"] == [{"name": NAME, "size": size, "refcnt": 1}]
        proc_modules = Kernfs.read(m.kernfs.walk("proc/modules"), 0, 4096)
        assert isinstance(proc_modules, bytes) and proc_modules.startswith(f"{NAME} {size} 1 ".encode())
        # The functions are in kallsyms with their real sizes.
        sizes = {s.name: s.size for s in m.kernel.kallsyms.symbols(NAME)}
        assert sizes["patched_show"] == 27 and "init_module" not in sizes
        nursery.cancel_scope.cancel()


async def test_callback_prints_and_returns_its_parameter(autojump_clock) -> None:
    async with trio.open_nursery() as nursery:
        m = make_machine(nursery, "6.1")
        data = livepatch_ko(patch_for("6.1", param="pre_patch_ret"))
        reply = await insmod(m, data, f"pre_patch_ret={-errno.ENODEV}")
        assert reply["errno"] == errno.ENODEV
        assert m.take()[-4:] == [f"{NAME}: pre_patch_callback: returning -19",
                                 "livepatch: pre-patch callback failed for object 'vmlinux'",
                                 f"livepatch: failed to enable patch '{NAME}'",
                                 f"livepatch: '{NAME}': unpatching complete"]
        assert nothing_loaded(m)
        assert (await insmod(m, data, "pre_patch_ret=0"))["ok"]
        assert f"{NAME}: pre_patch_callback: returning 0" in m.take()
        param = m.kernfs.walk(f"sys/module/{NAME}/parameters/pre_patch_ret")
        assert param is not None and Kernfs.read(param, 0, 4096) == b"0\n"
        nursery.cancel_scope.cancel()


async def test_module_of_another_release_is_refused_with_vermagic(autojump_clock) -> None:
    async with trio.open_nursery() as nursery:
        m = make_machine(nursery, "6.1")
        p = patch_for("6.1")
        p.vermagic_flags = "SMP mod_unload modversions "
        p.release = "5.10.0-28-amd64"
        reply = await insmod(m, livepatch_ko(p))
        assert reply["errno"] == errno.ENOEXEC and reply["file_error"]
        assert m.take() == [f"{NAME}: version magic '5.10.0-28-amd64 SMP mod_unload modversions ' should be "
                            "'6.1.0-50-amd64 SMP preempt mod_unload modversions '"]
        assert nothing_loaded(m)
        # With CRCs the release word is not compared (same_magic): another 6.1 ABI loads.
        other_abi = patch_for("6.1")
        other_abi.release = "6.1.0-47-amd64"
        assert (await insmod(m, livepatch_ko(other_abi)))["ok"]
        nursery.cancel_scope.cancel()


async def test_module_layout_crc_mismatch(autojump_clock) -> None:
    async with trio.open_nursery() as nursery:
        m = make_machine(nursery, "6.1")
        reply = await insmod(m, livepatch_ko(patch_for("6.1", crc=0x12345678)))
        assert reply["errno"] == errno.ENOEXEC
        assert m.take() == [f"{NAME}: disagrees about version of symbol module_layout"]
        assert nothing_loaded(m)
        nursery.cancel_scope.cancel()


BAD_FILES = {
    "not ELF": (b"this is not a kernel module\n" * 4, "Invalid ELF header magic: != \x7fELF"),
    "truncated": (None, "Invalid ELF section header overflow"),
    "32-bit": (b"\x7fELF\x01\x01\x01" + bytes(9) + b"\x01\x00\x03\x00" + bytes(48),
               "Invalid architecture in ELF header: 3"),
    "arm64": (None, "Invalid architecture in ELF header: 183"),
}


@pytest.mark.parametrize("case", BAD_FILES)
async def test_bad_files_are_invalid_module_format(case: str, autojump_clock) -> None:
    async with trio.open_nursery() as nursery:
        m = make_machine(nursery, "6.1")
        data, line = BAD_FILES[case]
        good = livepatch_ko(patch_for("6.1"))
        if case == "truncated":
            data = good[:len(good) // 2]
        elif case == "arm64":
            data = good[:18] + (183).to_bytes(2, "little") + good[20:]
        m.take()
        reply = await insmod(m, data)
        assert reply["errno"] == errno.ENOEXEC and reply["file_error"], reply
        assert m.take() == [line]
        assert nothing_loaded(m)
        nursery.cancel_scope.cancel()


async def test_old_name_the_image_lacks(autojump_clock) -> None:
    async with trio.open_nursery() as nursery:
        m = make_machine(nursery, "6.1")
        reply = await insmod(m, livepatch_ko(patch_for("6.1", funcs=[("no_such_function", "patched_show", 0)])))
        assert reply["errno"] == errno.EINVAL
        lines = m.take()
        assert "livepatch: symbol 'no_such_function' not found in symbol table" in lines
        assert nothing_loaded(m)
        nursery.cancel_scope.cancel()


async def test_klp_rela_symbols(autojump_clock) -> None:
    """.klp.rela.vmlinux.* symbols resolve at load; an unknown one refuses the module."""
    async with trio.open_nursery() as nursery:
        m = make_machine(nursery, "6.1")
        bad = patch_for("6.1", klp_relas=[".klp.sym.vmlinux.no_such_symbol,0"])
        reply = await insmod(m, livepatch_ko(bad))
        assert reply["errno"] == errno.EINVAL
        assert m.take()[-1] == "livepatch: symbol 'no_such_symbol' not found in symbol table"
        assert nothing_loaded(m)
        malformed = patch_for("6.1", klp_relas=[".klp.sym.vmlinux.cmdline_proc_show"])
        assert (await insmod(m, livepatch_ko(malformed)))["errno"] == errno.EINVAL
        assert m.take()[-1] == ("livepatch: symbol .klp.sym.vmlinux.cmdline_proc_show has an incorrectly "
                                "formatted name")
        good = patch_for("6.1", klp_relas=[".klp.sym.vmlinux.cmdline_proc_show,0"])
        assert (await insmod(m, livepatch_ko(good)))["ok"]
        nursery.cancel_scope.cancel()


async def test_module_specific_klp_rela_resolves_when_the_module_loads(autojump_clock) -> None:
    async with trio.open_nursery() as nursery:
        m = make_machine(nursery, "6.1")
        p = patch_for("6.1", objname="test_target", funcs=[("target_fn", "patched_show", 0)],
                      klp_relas=[".klp.sym.test_target.missing_fn,0"])
        assert (await insmod(m, livepatch_ko(p)))["ok"]  # the target is not loaded: nothing to resolve yet
        await settle(2.5)
        target = await m.insmod_text("test_target.py", "from klpfs.kapi import *\n\n\ndef target_fn(m, v):\n"
                                                       "    return 0\n\n\nMODULE_LICENSE('GPL')\n")
        assert target["errno"] == errno.EINVAL
        lines = m.take()
        assert "livepatch: symbol 'missing_fn' not found in symbol table" in lines
        assert "livepatch: patch 'test_ko_patch' failed for module 'test_target', refusing to load module " \
               "'test_target'" in lines
        nursery.cancel_scope.cancel()


async def test_unknown_symbol_for_this_kernel(autojump_clock) -> None:
    """A 6.1 module needing klp_register_patch (gone since 5.1): simplify_symbols refuses it."""
    async with trio.open_nursery() as nursery:
        m = make_machine(nursery, "6.1")
        reply = await insmod(m, livepatch_ko(patch_for("6.1", undefined=["klp_register_patch"])))
        assert reply["errno"] == errno.ENOENT
        assert m.take()[-1] == f"{NAME}: Unknown symbol klp_register_patch (err -2)"
        assert nothing_loaded(m)
        nursery.cancel_scope.cancel()


async def test_behaviour_module_beside_the_ko(autojump_clock) -> None:
    py = ("from klpfs.kapi import *\n\n\ndef patched_show(m, v):\n    seq_printf(m, '%s\\n', 'from python')\n"
          "    return 0\n\n\npatch = klp_patch(mod=THIS_MODULE, objs=[klp_object(name=None, funcs=[klp_func("
          "old_name='cmdline_proc_show', new_func=patched_show)])])\n\n\ndef test_ko_patch_init():\n"
          "    return klp_enable_patch(patch)\n\n\nmodule_init(test_ko_patch_init)\nMODULE_LICENSE('GPL')\n"
          "MODULE_INFO('livepatch', 'Y')\n")
    async with trio.open_nursery() as nursery:
        m = make_machine(nursery, "6.1")
        data = livepatch_ko(patch_for("6.1", register=False))
        wrong = py.replace("cmdline_proc_show", "version_proc_show")
        reply = await insmod(m, data, behaviour={"path": f"/tmp/{NAME}.py", "text": wrong})
        assert reply["errno"] == errno.ENOEXEC and "does not describe" in reply["error"]
        assert nothing_loaded(m)
        assert (await insmod(m, data, behaviour={"path": f"/tmp/{NAME}.py", "text": py}))["ok"]
        await settle(2.5)
        assert m.control.call("cmdline_proc_show", None)["output"] == "from python\n"
        sizes = {s.name: s.size for s in m.kernel.kallsyms.symbols(NAME)}
        assert sizes["patched_show"] == 27  # the .ko's function, with its real size
        nursery.cancel_scope.cancel()


def test_build_ko_module_raises_with_errno() -> None:
    """The API the real-module tests use: KoError carries errno and message."""
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            m = make_machine(nursery, "6.1")
            with pytest.raises(KoError) as info:
                build_ko_module("/tmp/x.ko", b"this is no module, and long enough for an ELF header" * 2,
                                m.system)
            assert info.value.errno == errno.ENOEXEC and "not an ELF file" in str(info.value)
            nursery.cancel_scope.cancel()
    trio.run(main)
