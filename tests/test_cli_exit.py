"""The `ngrpo` executable's quick exit (ngrpo_cli/main.py:main): once torch is loaded it ends the
process without the interpreter's final garbage collections, after doing what shutdown must do."""
import os
import subprocess
import sys
import textwrap

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent('''
    import atexit, sys, threading, time
    import torch  # a command that loaded the stack
    out = sys.argv[1]

    def late_writer():  # a non-daemon thread still working when the command returns
        time.sleep(0.5)
        open(out + ".thread", "w").write("joined")

    threading.Thread(target=late_writer).start()
    atexit.register(lambda: open(out + ".atexit", "w").write("ran"))
    print("x" * 100_000, end="")  # more than one buffer of stdout, still unflushed
    sys.argv = ["ngrpo", *sys.argv[2:]]
    from ngrpo_cli.main import main
    main()
    raise SystemExit("main() returned instead of ending the process")
''')


def _ngrpo(tmp_path, *args):
    out = str(tmp_path / "mark")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, out, *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=300)
    done = {suffix: os.path.exists(out + suffix) for suffix in (".thread", ".atexit")}
    return proc, done


def test_a_command_ends_with_threads_joined_atexit_run_and_output_flushed(tmp_path):
    proc, done = _ngrpo(tmp_path, "get-model", "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("x" * 100_000) and "Usage: ngrpo get-model" in proc.stdout
    assert done == {".thread": True, ".atexit": True}
    assert "returned instead" not in proc.stderr


def test_a_usage_error_keeps_its_exit_code_and_message(tmp_path):
    proc, done = _ngrpo(tmp_path, "train", "--no-such-option")
    assert proc.returncode == 2
    assert "Error: No such option '--no-such-option'" in proc.stderr
    assert done == {".thread": True, ".atexit": True}
