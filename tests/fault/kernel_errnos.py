"""The errno a write to or a read of each livepatch attribute may fail with, as
Linux 6.1 answers it: what its store and show functions return and what kernfs
adds around them.  Anything else (EIO above all) is a klpfs defect."""

from __future__ import annotations

import errno

GONE = frozenset({errno.ENOENT, errno.ENODEV})
"""The attribute's kobject went away: an open after its removal is ENOENT (the
dentry is gone); a handle opened before is ENODEV, as kernfs_get_active_of()
fails in kernfs_fop_write_iter() and kernfs_seq_start()."""

ENABLED_WRITE = GONE | {errno.EINVAL, errno.EBUSY}
"""enabled_store(): kstrtobool() fails, the patch is already in the requested
state, or a disabled patch would be re-enabled (EINVAL); __klp_disable_patch()
while another patch is in transition (EBUSY)."""

FORCE_WRITE = GONE | {errno.EINVAL}
"""force_store(): kstrtobool() fails, or the patch is not klp_transition_patch."""

READ_ONLY_WRITE = GONE | {errno.EACCES}
"""transition and patched have no store: kernfs_fop_open() refuses a writer."""

ABSENT = frozenset({errno.ENOENT})
"""signal went away in 5.1 (klp_send_signals() became automatic): no such file on 6.1."""

INT_PARAM_WRITE = GONE | {errno.EINVAL, errno.ERANGE}
"""param_attr_store() with param_set_int(): kstrtoint() cannot parse (EINVAL) or
the value does not fit an int (ERANGE)."""

BOOL_PARAM_WRITE = GONE | {errno.EINVAL}
"""param_attr_store() with param_set_bool(): kstrtobool() fails."""

READ = GONE
"""Every show here succeeds; only a vanished kobject fails a read."""

INSMOD = frozenset({errno.EBUSY})
"""finit_module() of a patch module while another patch is in transition:
klp_enable_patch() -> __klp_enable_patch() finds klp_transition_patch set."""
