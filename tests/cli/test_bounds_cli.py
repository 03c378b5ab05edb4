"""Times and module files the daemon must refuse, through the `klpfs` CLI
against a real mount: the exit status and the message a user reads, and the
daemon serving on afterwards."""

from __future__ import annotations

from pathlib import Path

from fusemount import Mount, wait_until
from test_commands import klpfs, m, ok  # noqa: F401

from klpfs.kernel.timers import MAX_SECONDS

NOT_A_TIME = f"is not a time: must be from 0 to {MAX_SECONDS} seconds (MAX_JIFFY_OFFSET jiffies)"


def test_task_sleep_seconds_that_are_no_time(m: Mount) -> None:
    pid = ok(m, "task", "add", "napper", "--kthread").strip()
    for seconds, shown in (("-1", "-1.0"), ("1e300", "1e+300")):
        run = klpfs(m, "task", "sleep", pid, "cmdline_proc_show", "--seconds", seconds)
        assert (run.returncode, run.stderr) == (1, f"klpfs task: seconds: {shown} {NOT_A_TIME}\n")
    assert ok(m, "task", "sleep", pid, "cmdline_proc_show", "--seconds", "0.5") == (
        f"{pid} sleeps in cmdline_proc_show\n")
    wait_until(lambda: f"{pid:>6} napper           kthread  S        -1  kthread" in ok(m, "ps").splitlines(),
               "the timed sleep to end")


def test_insmod_of_a_file_nested_too_deeply(m: Mount, tmp_path: Path) -> None:
    deep = tmp_path / "deep.toml"
    deep.write_text("x = " + "[" * 1000 + "]" * 1000 + "\n")
    run = klpfs(m, "insmod", str(deep))
    assert (run.returncode, run.stderr) == (1, f"insmod: ERROR: could not insert module {deep}: Invalid module format\n"
                                               f"{deep}: nested too deeply to parse\n")
    assert ok(m, "lsmod") == "Module                  Size  Used by\n"
