"""Shared pieces of the benchmark scripts: data, a model to time, timed runs."""

import os
import platform
import re
import shlex
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
USER_DIR = str(ROOT / "fairseq_knnlm")
WIKITEXT2 = ROOT.parent / "shared" / "data" / "wikitext-2"

# A 4-layer 256-d adaptive-input/softmax LM: the size the WikiText-2 example trains.
BENCH_ARCH = [
    "--arch", "transformer_lm", "--decoder-layers", "4", "--decoder-embed-dim", "256",
    "--decoder-ffn-embed-dim", "1024", "--decoder-attention-heads", "4",
    "--decoder-normalize-before", "--decoder-input-dim", "256", "--decoder-output-dim", "256",
    "--adaptive-input", "--adaptive-input-cutoff", "4000,16000",
    "--adaptive-softmax-cutoff", "4000,16000", "--tie-adaptive-weights",
    "--criterion", "adaptive_loss", "--ddp-backend", "legacy_ddp",
]


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def run_quiet(cmd):
    subprocess.run([str(c) for c in cmd], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def prepare_wikitext2(workdir: Path, wikitext2: Path = WIKITEXT2) -> Path:
    data_bin = workdir / "data-bin"
    if not (data_bin / "dict.txt").exists():
        run_quiet([
            "fairseq-preprocess", "--only-source", "--trainpref", wikitext2 / "train.txt",
            "--validpref", wikitext2 / "valid.txt", "--testpref", wikitext2 / "test.txt",
            "--destdir", data_bin, "--workers", "2",
        ])
    return data_bin


def train_bench_model(workdir: Path, data_bin: Path, max_update: int = 50) -> Path:
    """A briefly trained model: timings depend on its shape, not its quality."""
    ckpt = workdir / "ckpt" / "checkpoint_last.pt"
    if not ckpt.exists():
        run_quiet([
            "fairseq-train", data_bin, "--task", "language_modeling", *BENCH_ARCH,
            "--tokens-per-sample", "512", "--sample-break-mode", "none", "--max-tokens", "4096",
            "--optimizer", "adam", "--lr", "0.0005", "--max-update", str(max_update), "--cpu",
            "--save-dir", workdir / "ckpt", "--no-epoch-checkpoints", "--num-workers", "0",
        ])
    return ckpt


def timed(cmd, env=None):
    """(wall seconds, peak RSS MiB, output) of one run of ``cmd``."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, **(env or {})),
    )
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"failed: {shlex.join(map(str, cmd))}\n{out[-3000:]}")
    return wall, usage.ru_maxrss / 1024, out


def alternate(commands: dict, repeats: int, prepare=None):
    """Run each named command ``repeats`` times, interleaved A B A B ...

    Returns {name: [(wall, rss, output), ...]}.  ``prepare(name)`` runs untimed
    before each run (e.g. to delete an output directory).
    """
    results = {name: [] for name in commands}
    for _ in range(repeats):
        for name, cmd in commands.items():
            if prepare:
                prepare(name)
            results[name].append(timed(cmd))
    return results


def median(xs):
    return statistics.median(xs)


TOKENS_PER_S = re.compile(r"Evaluated ([0-9,]+) tokens in ([0-9.]+)s")


def eval_tokens_per_s(output: str):
    n, secs = TOKENS_PER_S.findall(output)[-1]
    n = int(n.replace(",", ""))
    return n, n / float(secs)
