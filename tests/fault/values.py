"""What the writers write, with what Linux 6.1 makes of each value.

Booleans go through kstrtobool() (lib/kstrtox.c): only the first byte, or
the first two for "on"/"off", decide; a write longer than a page is cut at
PAGE_SIZE by kernfs_fop_write_iter() before the store sees it.  Integers go
through kstrtoint() (param_set_int() in kernel/params.c): base 0, an
optional sign and one trailing newline.
"""

from __future__ import annotations

import errno

PAGE_SIZE = 4096

BOOL_VALUES: dict[bytes, bool] = {
    b"1\n": True, b"Y": True, b"yes\n": True, b"on\n": True, b"10": True, b"1" + b"z" * 5000: True,
    b"0\n": False, b"N": False, b"no way": False, b"OFF": False, b"0x1": False, b"0junk": False,
}
BOOL_INVALID: tuple[bytes, ...] = (b"2\n", b"-1", b"x", b" 1", b"\n", b"\0", b"o", b"oz", b"z" * 5000)

INT_VALUES: dict[bytes, int] = {
    b"0": 0, b"-19\n": -19, b"0x10": 16, b"017": 15, b"+5": 5,
    b"2147483647\n": 2147483647, b"-2147483648": -2147483648,
}
INT_INVALID: dict[bytes, int] = {
    b"x": errno.EINVAL, b"1.5": errno.EINVAL, b"12abc": errno.EINVAL, b"-": errno.EINVAL,
    b"1\n\n": errno.EINVAL, b"2147483648": errno.ERANGE, b"-2147483649\n": errno.ERANGE,
    b"99999999999999999999": errno.ERANGE,
}


def written(data: bytes) -> int:
    """What a successful write(2) of data to a sysfs attribute returns."""
    return min(len(data), PAGE_SIZE)


def shown_bool_param(value: bool) -> str:
    """param_get_bool(): Y or N."""
    return "Y\n" if value else "N\n"


def shown_int(value: int) -> str:
    """param_get_int() and the livepatch shows: "%i\\n"."""
    return f"{value}\n"
