"""/dev/kmsg's kernel side (klpfs/kernel/devkmsg.py) against kernel/printk/printk.c.

What a write stores (devkmsg_write, vprintk_store), what a read returns
(devkmsg_read with info_print_ext_header and msg_print_ext_body), where
devkmsg_llseek goes, the ring's sequence numbers, and the write ratelimit.
A plain list is the clock: nothing here needs trio.
"""

from __future__ import annotations

import errno
import os
import select
from collections import deque

import pytest

from klpfs.kernel.devkmsg import DevkmsgUser, format_ext, log_line_max, parse_write
from klpfs.kernel.printk import (KERN_DEBUG, KERN_ERR, KERN_INFO, KERN_WARNING, LOG_CONT, LOG_KERN,
                                 LOG_NEWLINE, LOG_USER, LogRecord, Printk)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def log(clock: Clock) -> Printk:
    return Printk(clock)


def user(log: Printk, clock: Clock) -> DevkmsgUser:
    return DevkmsgUser(log, clock, comm="writer", pid=4242)


# -- writes: the prefix, the text ---------------------------------------------------


@pytest.mark.parametrize(("data", "facility", "level", "text", "flags"), [
    (b"% modprobe x\n", LOG_USER, 4, b"% modprobe x", LOG_NEWLINE),   # default_message_loglevel
    (b"<6>hello\n", LOG_USER, 6, b"hello", LOG_NEWLINE),              # facility 0 stays LOG_USER
    (b"<14>user info", LOG_USER, 6, b"user info", 0),
    (b"<30>daemon\n", 3, 6, b"daemon", LOG_NEWLINE),                  # LOG_DAEMON
    (b"<0>kern?\n", LOG_USER, 0, b"kern?", LOG_NEWLINE),              # userspace cannot say LOG_KERN
    (b"<>empty\n", LOG_USER, 0, b"empty", LOG_NEWLINE),               # no digits is 0
    (b"<4294967309>wrap\n", LOG_USER, 5, b"wrap", LOG_NEWLINE),       # modulo 2**32: 13
    (b"<2048>big\n", LOG_USER, 0, b"big", LOG_NEWLINE),               # facility (2048 >> 3) & 0xff == 0
    (b"<6 >space\n", LOG_USER, 4, b"<6 >space", LOG_NEWLINE),         # no '>' right after: kept
    (b"<6", LOG_USER, 4, b"<6", 0),
    (b"<a>x", LOG_USER, 4, b"<a>x", 0),
    (b"two\n\n", LOG_USER, 4, b"two\n", LOG_NEWLINE),                 # one newline stripped
    (b"nul\0after\n", LOG_USER, 4, b"nul", 0),                        # "%s" stops at the NUL
    (b"\n", LOG_USER, 4, b"", LOG_NEWLINE),
])
def test_parse_write(data, facility, level, text, flags) -> None:
    line = parse_write(data, default_level=4)
    assert (line.facility, line.level, line.text, line.flags) == (facility, level, text, flags)


def test_the_longest_write_loses_its_last_byte() -> None:
    """LOG_LINE_MAX is 992 (1024 - PREFIX_MAX 32); the text reserve holds
    LOG_LINE_MAX with its NUL, so a 992-byte write keeps 991 bytes, and the
    newline that was the 992nd is not there to strip."""
    assert log_line_max() == 992
    assert log_line_max(printk_caller=True) == 976
    line = parse_write(b"x" * 991 + b"\n", 4)
    assert (line.text, line.flags) == (b"x" * 991, 0)
    line = parse_write(b"<3>" + b"y" * 989, 4)  # the limit is on what follows the prefix
    assert (line.level, line.text) == (3, b"y" * 989)


def test_write_stores_one_record_per_call(log: Printk, clock: Clock) -> None:
    clock.t = 1.5
    u = user(log, clock)
    assert u.write(b"% modprobe x\n") == 13
    assert u.write(b"<6>hello\n") == 9
    assert log.records[0] == LogRecord(0, 4, 1.5, "% modprobe x", LOG_USER, LOG_NEWLINE, 4242)
    assert log.records[1] == LogRecord(1, 6, 1.5, "hello", LOG_USER, LOG_NEWLINE, 4242)
    assert log.lines() == ["% modprobe x", "hello"]


def test_write_uses_the_current_default_message_loglevel(log: Printk, clock: Clock) -> None:
    log.console_printk[1] = 6
    user(log, clock).write(b"x\n")
    assert log.records[0].level == 6


def test_a_write_too_long_is_einval_and_stores_nothing(log: Printk, clock: Clock) -> None:
    u = user(log, clock)
    assert u.write(b"x" * 993) == -errno.EINVAL
    assert u.write(b"x" * 992) == 992
    assert log.lines() == ["x" * 991]


def test_user_writes_at_debug_level_are_stored(log: Printk, clock: Clock) -> None:
    """A write is a record whatever its level (no console is emulated to hide it from)."""
    user(log, clock).write(b"<7>dbg\n")
    assert [(r.level, r.text) for r in log.records] == [(KERN_DEBUG, "dbg")]


def test_arbitrary_bytes_come_back_unchanged(log: Printk, clock: Clock) -> None:
    u = user(log, clock)
    u.write(b"caf\xc3\xa9 \xff\x01\\\n")
    record = log.records[0]
    assert record.text.encode("utf-8", "surrogateescape") == b"caf\xc3\xa9 \xff\x01\\"
    assert u.read(8192) == b"12,0,0,-;caf\\xc3\\xa9 \\xff\\x01\\x5c\n"


# -- the ratelimit --------------------------------------------------------------------


def test_more_than_ten_writes_in_five_seconds_are_dropped(log: Printk, clock: Clock) -> None:
    """___ratelimit: burst 10 per 5 s; dropped writes still return their length,
    and closing the file reports them (ratelimit_state_exit)."""
    u = user(log, clock)
    for i in range(12):
        assert u.write(f"w{i}\n".encode()) == len(f"w{i}\n")
    clock.t = 5.0
    assert u.write(b"same window\n") == 12
    clock.t = 5.000001
    assert u.write(b"next window\n") == 12
    u.release()
    assert log.lines() == [f"w{i}" for i in range(10)] + [
        "next window", "writer: 3 output lines suppressed due to ratelimiting"]
    last = log.records[-1]
    assert (last.level, last.facility, last.caller) == (KERN_WARNING, LOG_KERN, 4242)


def test_each_open_file_has_its_own_ratelimit(log: Printk, clock: Clock) -> None:
    for i in range(15):
        u = user(log, clock)
        u.write(f"{i}\n".encode())
        u.release()
    assert log.lines() == [str(i) for i in range(15)]


# -- reads: the extended format -------------------------------------------------------


def test_ext_format_of_a_kernel_record() -> None:
    record = LogRecord(7, KERN_ERR, 12.000034, "livepatch: failed", LOG_KERN, LOG_NEWLINE, 812)
    assert format_ext(record) == b"3,7,12000034,-;livepatch: failed\n"
    assert format_ext(record, printk_caller=True) == b"3,7,12000034,-,caller=T812;livepatch: failed\n"
    cpu = LogRecord(8, KERN_INFO, 0.0, "irq", caller=0x80000000 + 1, flags=LOG_CONT)
    assert format_ext(cpu, printk_caller=True) == b"6,8,0,c,caller=C1;irq\n"


def test_ext_format_escapes_and_dict_lines() -> None:
    """msg_add_ext_text: < 0x20, >= 0x7f and the backslash as \\xNN; dev_info
    as " KEY=VALUE" lines, an empty value left out."""
    record = LogRecord(0, KERN_INFO, 0.5, "a\tb\\c\x7f\n", dev_info=(
        ("SUBSYSTEM", "usb"), ("DEVICE", ""), ("X", "v\x01")))
    assert format_ext(record) == b"6,0,500000,-;a\\x09b\\x5cc\\x7f\\x0a\n SUBSYSTEM=usb\n X=v\\x01\n"


def test_timestamps_are_whole_microseconds(log: Printk, clock: Clock) -> None:
    clock.t = 2.0000004999
    log.printk(KERN_INFO, "a")
    clock.t = 2.0000005001
    log.printk(KERN_INFO, "b")
    assert [(r.timestamp, r.usec) for r in log.records] == [(2.0, 2000000), (2.000001, 2000001)]
    assert [r.format() for r in log.records] == ["[    2.000000] a", "[    2.000001] b"]


def test_kernel_records_carry_the_caller_the_kernel_names(log: Printk) -> None:
    log.caller_id = lambda: 77
    log.printk(KERN_INFO, "x")
    assert log.records[0].caller == 77


# -- reads: one record each, errors --------------------------------------------------


def test_reads_return_one_record_each_then_eagain(log: Printk, clock: Clock) -> None:
    for text in ("one", "two"):
        log.printk(KERN_INFO, text)
    u = user(log, clock)
    assert u.read(8192) == b"6,0,0,-;one\n"
    assert u.read(8192) == b"6,1,0,-;two\n"
    assert u.read(8192) == -errno.EAGAIN
    assert u.poll() == 0
    log.printk(KERN_ERR, "three")
    assert u.poll() == select.POLLIN | select.POLLRDNORM
    assert u.read(8192) == b"3,2,0,-;three\n"


def test_a_short_buffer_is_einval_and_the_record_is_consumed(log: Printk, clock: Clock) -> None:
    """devkmsg_read moves past the record before it compares the length."""
    log.printk(KERN_INFO, "first")
    log.printk(KERN_INFO, "second")
    u = user(log, clock)
    assert u.read(len(b"6,0,0,-;first\n") - 1) == -errno.EINVAL
    assert u.read(len(b"6,1,0,-;second\n")) == b"6,1,0,-;second\n"


def test_epipe_once_when_the_ring_dropped_the_next_record(clock: Clock) -> None:
    small = Printk(clock)
    small.records = deque(maxlen=2)
    u = user(small, clock)
    for text in ("a", "b", "c"):
        small.printk(KERN_INFO, text)
    assert (small.first_seq, small.next_seq) == (1, 3)
    assert u.poll() == select.POLLIN | select.POLLRDNORM | select.POLLERR | select.POLLPRI
    assert u.read(8192) == -errno.EPIPE
    assert u.read(8192) == b"6,1,0,-;b\n"


def test_llseek(log: Printk, clock: Clock) -> None:
    for text in ("a", "b", "c"):
        log.printk(KERN_INFO, text)
    u = user(log, clock)
    assert u.llseek(os.SEEK_END) == 0
    assert u.read(8192) == -errno.EAGAIN
    log.printk(KERN_INFO, "d")
    assert u.read(8192) == b"6,3,0,-;d\n"
    assert u.llseek(os.SEEK_SET) == 0
    assert u.read(8192) == b"6,0,0,-;a\n"
    assert u.llseek(os.SEEK_CUR) == -errno.EINVAL


def test_seek_data_starts_after_the_last_clear(log: Printk, clock: Clock) -> None:
    log.printk(KERN_INFO, "before")
    u = user(log, clock)
    assert u.llseek(os.SEEK_DATA) == 0
    assert u.read(8192) == b"6,0,0,-;before\n"
    log.clear()
    log.printk(KERN_INFO, "after")
    assert log.clear_seq == 1
    assert u.llseek(os.SEEK_DATA) == 0
    assert u.read(8192) == b"6,1,0,-;after\n"
    assert log.lines() == ["before", "after"]  # clearing forgets nothing


def test_read_valid_and_sequence_numbers(log: Printk) -> None:
    assert (log.first_seq, log.next_seq, log.read_valid(0)) == (0, 0, None)
    log.printk(KERN_INFO, "x")
    assert log.read_valid(0) == log.records[0]
    assert log.read_valid(1) is None
