"""Console scripts run as children of one process that has imported torch, FAISS and fairseq once.

A pipeline runs dozens of fairseq-eval-lm, fairseq-train and fairseq-knnlm-* commands; as
subprocesses each one spends ~4 s importing torch, FAISS and fairseq before it starts (most of
a --tiny run's time). multiprocessing's forkserver imports them once, and forks each command
from that process: a fresh process per command, as isolated as a subprocess (its own memory,
globals and exit status), with its output appended to a log file as a subprocess's would be.
Commands that are not console scripts of this Python (e.g. bash train.sh) run as subprocesses.
"""

import multiprocessing
import os
import subprocess
import sys
from importlib.metadata import entry_points

# fairseq_cli.train first: it configures the root logger as every fairseq command does, before
# fairseq is imported (fairseq/tasks/text_to_speech.py would set it to DEBUG). Not fairseq_knnlm:
# a stock fairseq command must not even see the package's task registered.
PRELOAD = ["fairseq_cli.train", "fairseq_cli.eval_lm", "fairseq_cli.preprocess", "faiss"]
_context = None


def console_script(name):
    """The entry point of an installed console script called ``name``, or None."""
    return next(iter(entry_points(group="console_scripts", name=name)), None)


def _run_in_child(name, argv, log_path, cwd):
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)  # the preloaded logging handlers and tqdm write to sys.stdout / sys.stderr
    os.dup2(fd, 2)
    os.chdir(cwd)
    sys.argv = [name, *argv]
    sys.exit(console_script(name).load()())


def run(cmd, log_path, cwd, env=None):
    """Run ``cmd`` (a list of strings) from ``cwd``, stdout and stderr appended to ``log_path``;
    returns its exit status. ``env``: extra environment variables (these force a subprocess:
    the preloaded libraries have read theirs already)."""
    global _context
    if env is None and console_script(cmd[0]) is not None:
        if _context is None:
            _context = multiprocessing.get_context("forkserver")
            _context.set_forkserver_preload(PRELOAD)
        child = _context.Process(target=_run_in_child, args=(cmd[0], cmd[1:], str(log_path), str(cwd)))
        child.start()
        child.join()
        return child.exitcode
    with open(log_path, "a") as f:
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd,
                              env=dict(os.environ, **(env or {}))).returncode
