"""What each tool says when the kernel refuses it: the one place where a refusal
(an errno, and what the daemon adds to it) becomes kmod's or busybox's words.

`klpfs insmod` and `klpfs rmmod` speak as kmod's insmod and rmmod, and so do
the insmod, rmmod and modprobe that `klpfs run` puts on PATH, unless the
namespace's own tools are busybox's: those speak busybox.
"""

from __future__ import annotations

import errno
import os

from klpfs.control.client import Refused

KMOD_WORDS = {errno.ENOEXEC: "Invalid module format", errno.ENOENT: "Unknown symbol in module",
              errno.ESRCH: "Module has wrong symbol version", errno.EINVAL: "Invalid parameters"}
"""kmod's mod_strerror() (tools/insmod.c): its own words for a few errnos, strerror() for the rest."""
BUSYBOX_WORDS = {errno.ENOEXEC: "invalid module format",
                 errno.ENOENT: "unknown symbol in module, or unknown parameter",
                 errno.ESRCH: "module has wrong symbol version",
                 errno.ENOSYS: "kernel does not support requested operation"}
"""busybox's moderror() (modutils/modutils.c), likewise."""


def mod_strerror(err: int) -> str:
    """What kmod's insmod says for a module the kernel refused with errno `err`."""
    return KMOD_WORDS.get(err, os.strerror(err))


def busybox_moderror(err: int) -> str:
    """What busybox's insmod says for a module the kernel refused with errno `err`."""
    return BUSYBOX_WORDS.get(err, os.strerror(err))


def module_errno(refusal: Refused) -> int:
    """The errno init_module() returned: a file that is no module is ENOEXEC, whatever
    the emulator found wrong with it."""
    return errno.ENOEXEC if refusal.file_error else refusal.errno


def kmod_missing(filename: str) -> str:
    """kmod insmod's line for a file it cannot open."""
    return f"insmod: ERROR: could not load module {filename}: No such file or directory"


def kmod_insert(filename: str, refusal: Refused) -> list[str]:
    """kmod insmod's line for a refused module, then the emulator's own explanation
    where it has one (what the real kernel would have put in its log): what is wrong
    with the file, why init failed, or a message saying more than strerror()."""
    lines = [f"insmod: ERROR: could not insert module {filename}: {mod_strerror(module_errno(refusal))}"]
    if refusal.detail:
        lines.append(refusal.detail)
    elif refusal.file_error or not refusal.plain:
        lines.append(str(refusal))
    return lines


def kmod_remove(name: str, refusal: Refused, stem: str) -> str:
    """kmod rmmod's line for `rmmod NAME` refused; `stem` is the module's name."""
    if refusal.not_loaded:
        return f"rmmod: ERROR: Module {stem} is not currently loaded"
    if refusal.in_use:
        return f"rmmod: ERROR: Module {stem} is in use"
    return f"rmmod: ERROR: could not remove module {name}: {refusal}"


def modprobe_remove(stem: str, refusal: Refused) -> str:
    """modprobe -r's line for a refused removal."""
    if refusal.in_use:
        return f"modprobe: FATAL: Module {stem} is in use."
    if refusal.not_loaded:
        return f"modprobe: FATAL: Module {stem} is not currently loaded"
    return f"modprobe: FATAL: could not remove '{stem}': {refusal}"


def modprobe_insert(stem: str, refusal: Refused) -> str:
    """modprobe's line for a refused module: strerror() of what init_module() returned."""
    return f"modprobe: ERROR: could not insert '{stem}': {refusal}"


def busybox_insert(filename: str, err: int) -> str:
    """busybox insmod's line (its exit status is the errno)."""
    return f"insmod: can't insert '{filename}': {busybox_moderror(err)}"


def busybox_remove(stem: str, refusal: Refused) -> str:
    """busybox rmmod's line: strerror() of what delete_module() returned."""
    return f"rmmod: can't unload module '{stem}': {os.strerror(refusal.errno)}"
