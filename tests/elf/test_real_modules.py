"""Real kernel modules, built by kbuild against Debian's 6.1 headers, loaded into klpfs.

The .ko files (tests/elf/conftest.py) are what a real 6.1.0-50-amd64 kernel
loads; these tests hold klpfs to what that kernel does with them (the 6.1
observations in the shared spec, obs #N below): the /sys/kernel/livepatch
tree, /proc/cmdline after the transition, the kernel log of enabling, a
failing pre_patch callback, atomic replace, a patch of two objects with an
old_sympos -- and kmod's own modinfo on the same files.

Most tests drive the control operations directly under MockClock (as the
profile tests do); one goes through a real `klpfs run`.
"""

from __future__ import annotations

import errno
import importlib.util
import shlex
import subprocess
from pathlib import Path

import pytest
import trio

from elf import build
from elf.conftest import CMDLINE_TEXT, MEMINFO_TEXT, module_name
from fusemount import DEADLINE, KLPFS, require_fuse
from profiles.conftest import Machine, make_machine, settle
from profiles.conftest import autojump_clock  # noqa: F401  (the mock clock fixture)

KMOD_MODINFO = "/sbin/modinfo"

LOADER = "klpfs.elf.kmod"
"""The .ko loader (klpfs/elf/kmod.py: build_ko_module); tests that load wait for it."""


def loader_missing() -> bool:
    try:
        return importlib.util.find_spec(LOADER) is None
    except ModuleNotFoundError:
        return True


needs_loader = pytest.mark.skipif(
    loader_missing(),
    reason=f"the .ko loader ({LOADER}.build_ko_module, `insmod X.ko` through the control ops "
           "and shims) does not exist yet")


# ---------------------------------------------------------------------------
# The files themselves: kbuild made what a 6.1.0-50-amd64 kernel expects
# ---------------------------------------------------------------------------

def kmod_modinfo(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    if not Path(KMOD_MODINFO).exists():
        pytest.skip(f"{KMOD_MODINFO} (Debian's kmod package) is not installed")
    return subprocess.run([KMOD_MODINFO, *args, str(path)], capture_output=True, text=True, check=True)


def test_the_fixtures_are_modules_for_the_emulated_release(kos: dict[str, Path]) -> None:
    """Every module built, with the vermagic, name and livepatch tag kbuild gives
    such a module: proof the headers and compiler were the right ones."""
    assert set(kos) == {"klpfs-ko-cmdline", "klpfs-ko-callbacks", "klpfs-ko-replace",
                        "klpfs-ko-target", "klpfs-ko-twoobj"}
    for stem, path in kos.items():
        data = path.read_bytes()
        # ELF64, little endian, ET_REL, EM_X86_64
        assert data[:6] == b"\x7fELF\x02\x01", stem
        assert int.from_bytes(data[16:18], "little") == 1 and int.from_bytes(data[18:20], "little") == 62
        assert kmod_modinfo(path, "-F", "vermagic").stdout == \
            f"{build.RELEASE} SMP preempt mod_unload modversions \n"
        assert kmod_modinfo(path, "-F", "name").stdout == module_name(stem) + "\n"
        livepatch = kmod_modinfo(path, "-F", "livepatch").stdout
        assert livepatch == ("" if stem == "klpfs-ko-target" else "Y\n"), stem
    assert kmod_modinfo(kos["klpfs-ko-callbacks"], "-F", "parm").stdout == \
        "pre_patch_ret:What the pre_patch callback returns (default 0) (int)\n"


# ---------------------------------------------------------------------------
# Loading through the control operations (MockClock)
# ---------------------------------------------------------------------------

async def insmod_ko(m: Machine, path: Path, *params: str) -> dict:
    """`insmod path params...` as the control socket receives it from a shim."""
    return await m.ctl("insmod", path=str(path), data=path.read_bytes(), params=list(params))


def call(m: Machine, func: str) -> dict:
    """The "call" op: run an emulated vmlinux function as the console task (its
    reply names the implementation that answered and what it printed)."""
    reply = m.control.call(func, None)
    assert reply["ok"], reply
    return reply


def call_in(m: Machine, func: str, module: str | None, pos: int = 1) -> dict:
    """Like call(), for the pos-th `func` of `module` (None: vmlinux), which the op
    cannot name (it calls the first function of that name)."""
    sym = m.sym(func, module, pos)
    result = m.kernel.call(sym, m.kernel.console)
    return {"impl": result.impl.name, "impl_module": result.impl.module, "output": result.output}


def taint_lines(name: str) -> list[str]:
    """obs #22: the first out-of-tree, unsigned livepatch module of a boot."""
    return [f"{name}: loading out-of-tree module taints kernel.",
            f"{name}: tainting kernel with TAINT_LIVEPATCH",
            f"{name}: module verification failed: signature and/or required key missing - tainting kernel"]


@needs_loader
async def test_cmdline_patch_tree_proc_cmdline_and_log(kos: dict[str, Path], autojump_clock) -> None:
    """obs #1-5, #22 and the enabling lines: a real patch of cmdline_proc_show."""
    async with trio.open_nursery() as nursery:
        m = make_machine(nursery, "6.1")
        original = call(m, "cmdline_proc_show")["output"]
        name = module_name("klpfs-ko-cmdline")
        reply = await insmod_ko(m, kos["klpfs-ko-cmdline"])
        assert reply == {"ok": True, "name": name}
        assert m.ls() == [name]
        assert m.tree(name) == ["enabled", "force", "transition", "vmlinux/",
                                "vmlinux/cmdline_proc_show,1/", "vmlinux/patched"]
        assert (m.mode(name), m.mode(f"{name}/enabled"), m.mode(f"{name}/transition"),
                m.mode(f"{name}/force"), m.mode(f"{name}/vmlinux/cmdline_proc_show,1")) == \
            (0o755, 0o644, 0o444, 0o200, 0o755)
        assert m.read(f"{name}/enabled") == b"1\n"
        await settle(2.5)
        assert m.read(f"{name}/transition") == b"0\n"
        assert m.read(f"{name}/vmlinux/patched") == b"1\n"
        patched = call(m, "cmdline_proc_show")
        assert patched["impl_module"] == name
        assert patched["output"] == CMDLINE_TEXT + "\n" != original
        assert [ln for ln in m.lines() if name in ln] == [
            *taint_lines(name),
            f"livepatch: enabling patch '{name}'",
            f"livepatch: '{name}': starting patching transition",
            f"livepatch: '{name}': patching complete"]
        # Disable and unload: the original again, the directory gone (obs #8, #20).
        assert m.write(f"{name}/enabled", b"0") == 1
        await settle(2.5)
        assert not m.exists(name)
        assert (await m.rmmod_ctl(name))["ok"]
        assert call(m, "cmdline_proc_show")["output"] == original
        nursery.cancel_scope.cancel()


@needs_loader
async def test_callbacks_pre_patch_returns_the_parameter(kos: dict[str, Path], autojump_clock) -> None:
    """obs #16: pre_patch returning -ENODEV (given as a module parameter) fails the load."""
    async with trio.open_nursery() as nursery:
        m = make_machine(nursery, "6.1")
        name = module_name("klpfs-ko-callbacks")
        reply = await insmod_ko(m, kos["klpfs-ko-callbacks"], f"pre_patch_ret={-errno.ENODEV}")
        assert not reply["ok"] and reply["errno"] == errno.ENODEV, reply
        lines = m.take()
        assert [ln for ln in lines if "livepatch:" in ln or name in ln][-4:] == [
            f"{name}: pre_patch_callback: returning -19",
            "livepatch: pre-patch callback failed for object 'vmlinux'",
            f"livepatch: failed to enable patch '{name}'",
            f"livepatch: '{name}': unpatching complete"]
        assert not any("post_unpatch_callback" in ln for ln in lines)
        assert m.ls() == [] and m.module(name) is None
        # The default (0) lets it through: the callbacks run in the observed order (obs #15).
        assert (await insmod_ko(m, kos["klpfs-ko-callbacks"]))["ok"]
        await settle(2.5)
        assert [ln for ln in m.take() if "livepatch:" in ln or name in ln] == [
            f"livepatch: enabling patch '{name}'",
            f"{name}: pre_patch_callback: returning 0",
            f"livepatch: '{name}': starting patching transition",
            f"{name}: post_patch_callback",
            f"livepatch: '{name}': patching complete"]
        assert m.tree(name) == ["enabled", "force", "transition", "vmlinux/",
                                "vmlinux/patched", "vmlinux/version_proc_show,1/"]
        nursery.cancel_scope.cancel()


@needs_loader
async def test_replace_patch_takes_over(kos: dict[str, Path], autojump_clock) -> None:
    """obs #19: a .replace patch loaded over the cmdline patch."""
    async with trio.open_nursery() as nursery:
        m = make_machine(nursery, "6.1")
        original_cmdline = call(m, "cmdline_proc_show")["output"]
        first, repl = module_name("klpfs-ko-cmdline"), module_name("klpfs-ko-replace")
        assert (await insmod_ko(m, kos["klpfs-ko-cmdline"]))["ok"]
        await settle(2.5)
        m.take()
        assert (await insmod_ko(m, kos["klpfs-ko-replace"]))["ok"]
        # Right after insmod both trees coexist; the replace patch has a nop for cmdline_proc_show.
        assert m.ls() == sorted([first, repl])
        assert m.tree(repl) == ["enabled", "force", "transition", "vmlinux/",
                                "vmlinux/cmdline_proc_show,1/", "vmlinux/meminfo_proc_show,1/",
                                "vmlinux/patched"]
        await settle(2.5)
        assert m.ls() == [repl]
        assert m.tree(repl) == ["enabled", "force", "transition", "vmlinux/",
                                "vmlinux/meminfo_proc_show,1/", "vmlinux/patched"]
        assert [ln for ln in m.take() if "livepatch:" in ln] == [
            f"livepatch: enabling patch '{repl}'",
            f"livepatch: '{repl}': starting patching transition",
            f"livepatch: '{repl}': patching complete"]
        assert call(m, "cmdline_proc_show")["output"] == original_cmdline
        assert call(m, "meminfo_proc_show")["output"] == MEMINFO_TEXT + "\n"
        # The replaced module stays loaded with no reference and can go.
        assert m.refcnt(first) == 0
        assert (await m.rmmod_ctl(first))["ok"]
        nursery.cancel_scope.cancel()


@needs_loader
@pytest.mark.parametrize("target_first", [True, False], ids=["target-first", "patch-first"])
async def test_two_object_patch_with_sympos(kos: dict[str, Path], autojump_clock, target_first: bool) -> None:
    """obs #3, #17: vmlinux's second type_show and a module's function in one patch."""
    async with trio.open_nursery() as nursery:
        m = make_machine(nursery, "6.1")
        patch, target = module_name("klpfs-ko-twoobj"), module_name("klpfs-ko-target")
        if target_first:
            assert (await insmod_ko(m, kos["klpfs-ko-target"]))["ok"]
        assert (await insmod_ko(m, kos["klpfs-ko-twoobj"]))["ok"]
        await settle(2.5)
        assert m.tree(patch) == ["enabled", "force", "klpfs_ko_target/",
                                 "klpfs_ko_target/klpfs_target_message,1/", "klpfs_ko_target/patched",
                                 "transition", "vmlinux/", "vmlinux/patched", "vmlinux/type_show,2/"]
        assert m.read(f"{patch}/klpfs_ko_target/patched") == (b"1\n" if target_first else b"0\n")
        if not target_first:
            m.take()
            assert (await insmod_ko(m, kos["klpfs-ko-target"]))["ok"]
            assert f"livepatch: applying patch '{patch}' to loading module '{target}'" in m.take()
            assert m.read(f"{patch}/klpfs_ko_target/patched") == b"1\n"
        # Only the second of the three type_show functions is redirected.
        assert [call_in(m, "type_show", None, pos)["impl_module"] for pos in (1, 2, 3)] == [None, patch, None]
        assert call_in(m, "klpfs_target_message", target)["impl_module"] == patch
        # Unloading the target reverts its object; the patch stays enabled (obs #17).
        m.take()
        assert (await m.rmmod_ctl(target))["ok"]
        assert f"livepatch: reverting patch '{patch}' on unloading module '{target}'" in m.take()
        assert m.read(f"{patch}/enabled") == b"1\n"
        assert m.read(f"{patch}/klpfs_ko_target/patched") == b"0\n"
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------
# Through `klpfs run`: the shims, the mounted tree, /proc and kmod's modinfo
# ---------------------------------------------------------------------------

def klpfs_run(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KLPFS, "run", "--kernel", "6.1", "--", "sh", "-c", script],
                          capture_output=True, text=True, timeout=6 * DEADLINE)


@needs_loader
def test_insmod_of_a_real_ko_under_klpfs_run(kos: dict[str, Path]) -> None:
    """A tool's script, unmodified: insmod the .ko, wait, read the tree, /proc/cmdline and dmesg."""
    require_fuse()
    name = module_name("klpfs-ko-cmdline")
    script = f"""
set -u
P=/sys/kernel/livepatch/{name}
insmod {kos['klpfs-ko-cmdline']} || exit 10
for _ in $(seq 100); do [ "$(cat $P/transition)" = 0 ] && break; sleep 0.1; done
echo "enabled=$(cat $P/enabled) transition=$(cat $P/transition)"
ls $P/vmlinux
cat /proc/cmdline
dmesg -t | grep "^livepatch: "
"""
    run = klpfs_run(script)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout == (f"enabled=1 transition=0\ncmdline_proc_show,1\npatched\n{CMDLINE_TEXT}\n"
                          f"livepatch: enabling patch '{name}'\n"
                          f"livepatch: '{name}': starting patching transition\n"
                          f"livepatch: '{name}': patching complete\n")


MODINFO_FIELDS = ("filename", "livepatch", "license", "author", "description", "depends",
                  "retpoline", "intree", "name", "vermagic", "parm", "nonexistent")
"""Every field `-F` is asked for: kmod's, plus ones these modules lack (empty output)."""


def modinfo_commands(kos: dict[str, Path]) -> list[list[str]]:
    """modinfo argument lists: each file whole, then each field of all files at once
    (one command per field keeps the number of shim runs, each a Python start, small)."""
    paths = [str(kos[stem]) for stem in sorted(kos)]
    return [[path] for path in paths] + [["-F", field, *paths] for field in MODINFO_FIELDS]


@needs_loader
def test_modinfo_shim_matches_kmod(kos: dict[str, Path]) -> None:
    """`modinfo ...` of each .ko under klpfs run prints what kmod's modinfo prints on
    the same file, field by field and byte for byte, with the same exit status."""
    require_fuse()
    if not Path(KMOD_MODINFO).exists():
        pytest.skip(f"{KMOD_MODINFO} (Debian's kmod package) is not installed")
    commands = modinfo_commands(kos)
    marker = "=== klpfs-modinfo-status"
    # The shim, not kmod's binary, must be the `modinfo` the run finds first.
    script = 'case "$(command -v modinfo)" in */sbin/modinfo|"") exit 11;; esac\n'
    script += "".join(f"modinfo {shlex.join(argv)}; echo \"{marker} $?\"\n" for argv in commands)
    run = klpfs_run(script)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stderr == ""
    shim: list[tuple[str, int]] = []
    out: list[str] = []
    for line in run.stdout.splitlines(keepends=True):
        if line.startswith(marker):
            shim.append(("".join(out), int(line.split()[-1])))
            out = []
        else:
            out.append(line)
    assert len(shim) == len(commands)
    for argv, (ours, status) in zip(commands, shim):
        real = subprocess.run([KMOD_MODINFO, *argv], capture_output=True, text=True)
        if argv[0] != "-F":
            # Field by field first, so a difference names the field.
            assert modinfo_fields(ours) == modinfo_fields(real.stdout), argv
        assert (ours, status) == (real.stdout, real.returncode), argv


def modinfo_fields(text: str) -> list[tuple[str, str]]:
    """modinfo's output as (field, value) pairs, in its order."""
    pairs = []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        pairs.append((key, value.lstrip(" ")))
    return pairs
