"""§2.3 boolean parsing (kstrtobool), through the `enabled` attribute.

Every example of the spec, plus one input per row of the table.  A value
parsed as true enables a disabled patch; false disables an enabled one; an
error is EINVAL whatever the state, and changes nothing.
"""

from __future__ import annotations

import errno

import pytest

from .conftest import spec, settle

TRUE = ["1\n", "10", "yes", "Y", "on", "ON\n",            # spec examples
        "y", "1", "Yikes", "oN", "On\n", "11111"]          # table rows: y Y 1 / o+n N
FALSE = ["0\n", "no", "off", "of", "nonsense",             # spec examples
         "n", "N", "0", "OF", "oFF", "Off\n", "0 1"]       # table rows: n N 0 / o+f F
EINVAL = ["true", "false", " 1", "\n", "o", "2",           # spec examples
          "t", "f", "-", " ", "ox", "O\n", "o1", "Oy", "x1", "\t1", "-1", "+1"]

P = spec("lp_bool")


@pytest.mark.parametrize("text", TRUE)
async def test_true_values_enable(m, autojump_clock, text):
    """§2.3: these parse as true; on a disabled patch the write enables it and
    returns the full byte count (§2.2)."""
    assert m.register_only(P) == 0
    data = text.encode()
    assert m.write("lp_bool/enabled", data) == len(data)
    assert m.enabled("lp_bool") == b"1\n"


@pytest.mark.parametrize("text", FALSE)
async def test_false_values_disable(m, autojump_clock, text):
    """§2.3: these parse as false; on an enabled patch the write disables it."""
    assert m.load(P) == 0
    await settle()
    assert m.state("lp_bool") == (1, 0)
    data = text.encode()
    assert m.write("lp_bool/enabled", data) == len(data)
    assert m.enabled("lp_bool") == b"0\n"


@pytest.mark.parametrize("text", EINVAL)
async def test_parse_errors_are_einval_whatever_the_state(m, autojump_clock, text):
    """§2.3: a parse error is EINVAL, before any other check and in any state
    (disabled, in transition, enabled), and has no effect and prints nothing."""
    data = text.encode()
    assert m.register_only(P) == 0
    m.take()
    assert m.write("lp_bool/enabled", data) == -errno.EINVAL          # disabled, idle
    assert m.state("lp_bool") == (0, 0)
    assert m.take() == []
    blocker = m.blocker()
    assert m.write("lp_bool/enabled", b"1\n") == 2                  # patching, held
    m.take()
    assert m.write("lp_bool/enabled", data) == -errno.EINVAL
    assert m.state("lp_bool") == (1, 1)
    assert m.take() == []
    m.sched.rest(blocker)
    await settle()
    assert m.state("lp_bool") == (1, 0)                               # enabled, idle
    m.take()
    assert m.write("lp_bool/enabled", data) == -errno.EINVAL
    assert m.state("lp_bool") == (1, 0)
    assert m.take() == []
