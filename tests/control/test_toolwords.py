"""The one table of each tool's words for a refused module request: kmod's insmod,
rmmod and modprobe, and busybox's, as `klpfs insmod`/`rmmod` and the shims print them."""

from __future__ import annotations

import errno
import os

import pytest

from klpfs.control.client import Refused
from klpfs.control.toolwords import (
    busybox_insert, busybox_remove, kmod_insert, kmod_missing, kmod_remove, mod_strerror, modprobe_insert,
    modprobe_remove)


def refused(err: int, error: str = "", **fields: object) -> Refused:
    return Refused({"ok": False, "errno": err, "error": error or os.strerror(err), **fields})


@pytest.mark.parametrize(("err", "words"), [
    (errno.ENOEXEC, "Invalid module format"), (errno.ENOENT, "Unknown symbol in module"),
    (errno.ESRCH, "Module has wrong symbol version"), (errno.EINVAL, "Invalid parameters"),
    (errno.EBUSY, "Device or resource busy")])
def test_kmod_words(err: int, words: str) -> None:
    assert mod_strerror(err) == words
    assert kmod_insert("m.ko", refused(err)) == [f"insmod: ERROR: could not insert module m.ko: {words}"]


def test_kmod_insert_explains_what_strerror_cannot() -> None:
    assert kmod_insert("x.toml", refused(errno.ENOEXEC, "x.toml: module.name: must be a str", file_error=True)) == [
        "insmod: ERROR: could not insert module x.toml: Invalid module format", "x.toml: module.name: must be a str"]
    assert kmod_insert("b", refused(errno.EFAULT, detail="b.py: init faulted: oops")) == [
        "insmod: ERROR: could not insert module b: Bad address", "b.py: init faulted: oops"]
    assert kmod_insert("s.ko", refused(errno.EBADMSG, "the module signature is malformed")) == [
        "insmod: ERROR: could not insert module s.ko: Bad message", "the module signature is malformed"]
    assert kmod_missing("nope") == "insmod: ERROR: could not load module nope: No such file or directory"


def test_removal_words() -> None:
    in_use = refused(errno.EAGAIN, in_use=True, name="lp")
    gone = refused(errno.ENOENT, not_loaded=True, name="lp")
    busy = refused(errno.EBUSY, name="lp")
    assert [kmod_remove("lp.ko", r, "lp") for r in (in_use, gone, busy)] == [
        "rmmod: ERROR: Module lp is in use", "rmmod: ERROR: Module lp is not currently loaded",
        "rmmod: ERROR: could not remove module lp.ko: Device or resource busy"]
    assert [modprobe_remove("lp", r) for r in (in_use, gone, busy)] == [
        "modprobe: FATAL: Module lp is in use.", "modprobe: FATAL: Module lp is not currently loaded",
        "modprobe: FATAL: could not remove 'lp': Device or resource busy"]
    assert modprobe_insert("lp", refused(errno.ENODEV)) == "modprobe: ERROR: could not insert 'lp': No such device"


def test_busybox_words() -> None:
    assert busybox_insert("m.ko", errno.ENOENT) == (
        "insmod: can't insert 'm.ko': unknown symbol in module, or unknown parameter")
    assert busybox_insert("m.ko", errno.ENOSYS) == (
        "insmod: can't insert 'm.ko': kernel does not support requested operation")
    assert busybox_insert("m.ko", errno.EEXIST) == "insmod: can't insert 'm.ko': File exists"
    assert busybox_remove("lp", refused(errno.EAGAIN, in_use=True)) == (
        "rmmod: can't unload module 'lp': Resource temporarily unavailable")
