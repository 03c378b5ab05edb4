"""Fault injection: concurrent writers against a real mount, generated module
files, malformed control requests and signals to the daemon, each run bounded
so the directory stays fast.  scripts/fault-figures runs bigger versions of
the writer and module runs and prints their figures."""
