"""kobject_add for the livepatch tree: a directory plus its default attributes.

A name clash prints what sysfs and the kobject core print (sysfs_warn_dup() in
fs/sysfs/dir.c, kobject_add_internal() in lib/kobject.c) and fails with -EEXIST,
creating nothing.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from klpfs.kernel.printk import KERN_ERR, KERN_WARNING
from klpfs.sysfs.kernfs import Kernfs, KernfsNode, Show, Store

SYSFS_MOUNT = "/sys"

# Attribute modes as the kernel's __ATTR_RW/__ATTR_RO/__ATTR_WO make them.
MODE_RW = 0o644
MODE_RO = 0o444
MODE_WO = 0o200


@dataclass(frozen=True, slots=True)
class Attribute:
    name: str
    mode: int
    show: Show | None = None
    store: Store | None = None


def kobject_add(kernfs: Kernfs, parent: KernfsNode, name: str, printk: Callable[[int, str], None],
                attrs: Iterable[Attribute] = ()) -> KernfsNode | int:
    """The new directory with its attributes, or -EEXIST."""
    try:
        node = kernfs.create_dir(parent, name)
    except FileExistsError:
        path = f"{parent.path}/{name}".removeprefix(SYSFS_MOUNT)
        printk(KERN_WARNING, f"sysfs: cannot create duplicate filename '{path}'")
        printk(KERN_ERR, f"kobject_add_internal failed for {name} with -EEXIST, "
                         "don't try to register things with the same name in the same directory.")
        return -errno.EEXIST
    for attr in attrs:
        kernfs.create_file(node, attr.name, attr.mode, attr.show, attr.store)
    return node
