"""Helpers for tests that start a child process and signal it (a plain module: a second
conftest.py under tests/gpu/ makes `from conftest import` ambiguous)."""


def sigint_as_in_a_terminal():
    """preexec_fn for a child that a test stops with SIGINT. A shell without job control starts
    background commands with SIGINT ignored, Python then keeps it ignored, and so would every child:
    the test suite started with `... &` (as CI scripts and nohup runs do) would send its Ctrl-C
    into the void. The child gets SIGINT's default back, as a command typed in a terminal has it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
