"""The reports of reads a failed checkpoint restore abandoned are dropped while the CLI's
filter is installed, and only they: the process's stderr and unraisable hook are its own
again once it is removed."""

import _thread
import sys
import threading
import types

from metajax.run import cli
from metajax.run.checkpoint import quiet_abandoned_reads

ABANDONED = "Traceback (most recent call last):\n  File x\nRuntimeError: Event loop is closed\n"
OTHER = "Traceback (most recent call last):\n  File y\nValueError: real\n"


def _in_foreign_thread(fn):
    """Runs ``fn`` on a thread Python's threading did not start, as tensorstore's are."""
    done = threading.Event()

    def run():
        try:
            fn()
        finally:
            done.set()

    _thread.start_new_thread(run, ())
    assert done.wait(10)


def _unraisable(error):
    return types.SimpleNamespace(exc_value=error, exc_type=type(error), exc_traceback=None)


def test_only_foreign_threads_event_loop_reports_are_dropped(capsys, monkeypatch):
    heard = []
    monkeypatch.setattr(sys, "unraisablehook", heard.append)
    stderr = sys.stderr
    restore = quiet_abandoned_reads()
    assert sys.stderr is not stderr

    def report():
        sys.stderr.write(ABANDONED[:40])  # a traceback arrives in pieces
        sys.stderr.write(ABANDONED[40:])
        sys.stderr.write(OTHER)
        sys.unraisablehook(_unraisable(RuntimeError("Event loop is closed")))
        sys.unraisablehook(_unraisable(RuntimeError("other")))

    _in_foreign_thread(report)
    sys.stderr.write(ABANDONED)  # this thread's own: kept
    sys.unraisablehook(_unraisable(RuntimeError("Event loop is closed")))
    restore()
    assert sys.stderr is stderr and sys.unraisablehook == heard.append
    assert capsys.readouterr().err == OTHER + ABANDONED
    assert [str(u.exc_value) for u in heard] == ["other", "Event loop is closed"]


def test_an_unfinished_report_is_written_when_the_filter_is_removed(capsys):
    restore = quiet_abandoned_reads()
    _in_foreign_thread(lambda: sys.stderr.write(OTHER[:40]))
    assert capsys.readouterr().err == ""
    restore()
    assert capsys.readouterr().err == OTHER[:40]


def test_the_cli_called_in_process_leaves_the_streams_as_it_found_them(tmp_path):
    stderr, hook = sys.stderr, sys.unraisablehook
    assert cli.main(["eval", "--workdir", str(tmp_path)]) == 2  # no checkpoint there
    assert sys.stderr is stderr and sys.unraisablehook is hook
