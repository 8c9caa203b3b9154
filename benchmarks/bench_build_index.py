"""Index build overhead and memory: fairseq-knnlm-build-index vs the bare FAISS calls.

    python benchmarks/bench_build_index.py --workdir /tmp/bench-index \\
        --sizes 250000,1000000 --dim 256 --index-factory IVF1024,PQ32 \\
        --train-size 131072 --add-batch 100000 --repeats 2

1. Time: on the largest synthetic float16 datastore, runs (alternating,
   ``--repeats`` times each) the full ``build_index`` call and the bare FAISS
   ``train`` + ``add`` calls on the same keys (same training sample, same
   chunks, already in memory as float32, untimed preparation).  Reports the
   ratio of medians; target <= 1.10.
2. Memory: peak RSS (``ru_maxrss`` of each subprocess) of ``build_index`` on
   every size, next to the expected bound sample + chunk + index, and the
   datastore size it does not depend on.

Each measurement runs in its own subprocess.  This parent process stays small
(standard library only): Linux carries a process's peak RSS across fork and
exec, so a heavy parent would inflate every child's ``ru_maxrss``.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

MIB = 1 << 20


def clustered_keys(n, dim, rng, centers, proj):
    import numpy as np

    """Keys near a low-dimensional mixture, like LM hidden states."""
    z = centers[rng.integers(0, len(centers), n)] + rng.standard_normal((n, centers.shape[1]))
    return (z @ proj + 0.05 * rng.standard_normal((n, proj.shape[1]))).astype(np.float32)


def worker_make(args) -> dict:
    """A synthetic float16 datastore of ``args.size`` keys at ``args.dstore``."""
    import numpy as np

    from fairseq_knnlm.storage.datastore import DatastoreWriter

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((256, 16)) * 4
    proj = rng.standard_normal((16, args.dim)) / 4
    writer = DatastoreWriter(args.dstore, args.dim, np.float16)
    for lo in range(0, args.size, 100_000):
        n = min(100_000, args.size - lo)
        writer.append(clustered_keys(n, args.dim, rng, centers, proj), rng.integers(0, 50_000, n))
    writer.commit(dict(keytype="last_ffn_input", dictionary_md5="0" * 32, checkpoint_sha256="0" * 64))
    return {}


# ---------------------------------------------------------------- workers (subprocesses)


def worker_build(args) -> dict:
    from fairseq_knnlm.index import build_index

    output = os.path.join(args.workdir, "bench.index")
    start = time.perf_counter()
    meta = build_index(
        args.dstore, output=output, factory=args.index_factory, train_size=args.train_size,
        add_batch=args.add_batch, overwrite=True, progress=False, log=lambda msg: None,
    )
    seconds = time.perf_counter() - start
    return dict(seconds=seconds, train=meta["train_seconds"], add=meta["add_seconds"], ntotal=meta["ntotal"])


def worker_bare(args) -> dict:
    import faiss
    import numpy as np

    from fairseq_knnlm.storage.datastore import Datastore
    from fairseq_knnlm.index import sample_ids

    ds = Datastore(args.dstore)
    # Untimed: the same training sample and chunks, as float32 in memory.
    ids = sample_ids(ds.size, min(args.train_size, ds.size), seed=1)
    sample = np.asarray(ds.keys[ids], dtype=np.float32)
    chunks = [np.asarray(ds.keys[lo : lo + args.add_batch], dtype=np.float32)
              for lo in range(0, ds.size, args.add_batch)]
    index = faiss.index_factory(ds.dim, args.index_factory, faiss.METRIC_L2)
    faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = False  # as build_index
    start = time.perf_counter()
    index.train(sample)
    trained = time.perf_counter()
    for chunk in chunks:
        index.add(chunk)
    done = time.perf_counter()
    return dict(seconds=done - start, train=trained - start, add=done - trained, ntotal=index.ntotal)


def worker_idle(args) -> dict:
    import importlib

    import faiss

    importlib.import_module("fairseq_knnlm.index")  # what every build imports
    return dict(faiss=faiss.__version__)


WORKERS = {"make": worker_make, "build": worker_build, "bare": worker_bare, "idle": worker_idle}


def run_worker(kind: str, args, dstore: Path, size: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--dstore", str(dstore), "--workdir", args.workdir,
           "--index-factory", args.index_factory, "--train-size", str(args.train_size),
           "--add-batch", str(args.add_batch), "--dim", str(args.dim), "--size", str(size)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"worker {kind} failed on {dstore}")
    result = json.loads(out.strip().splitlines()[-1])
    result["rss_mib"] = usage.ru_maxrss / 1024  # kilobytes on Linux
    return result


# ---------------------------------------------------------------- report


def faiss_code_bytes(factory: str) -> int:
    """Bytes per vector of a ``...,PQ<m>`` factory (8-bit codes); 0 if unknown."""
    last = factory.split(",")[-1]
    return int(last[2:].split("x")[0]) if last.startswith("PQ") else 0


def machine() -> str:
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/bench-index")
    p.add_argument("--sizes", default="250000,1000000", help="datastore sizes; the largest is timed")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--index-factory", default="IVF1024,PQ32")
    p.add_argument("--train-size", type=int, default=131072)
    p.add_argument("--add-batch", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--dstore", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return

    idle = run_worker("idle", args, Path(args.workdir))
    print(f"machine: {machine()}, faiss {idle['faiss']}, load average {os.getloadavg()[0]:.1f} at start")
    print(f"command: python benchmarks/bench_build_index.py {' '.join(sys.argv[1:])}")
    sizes = sorted(int(s) for s in args.sizes.split(","))
    stores = {n: Path(args.workdir) / f"dstore-{n}x{args.dim}" for n in sizes}
    for n, path in stores.items():
        if not (path / "meta.json").exists():
            run_worker("make", args, path, n)

    # Alternate the two so that slow phases of a shared machine hit both.
    runs = {"build": [], "bare": []}
    for _ in range(args.repeats):
        for kind in runs:
            runs[kind].append(run_worker(kind, args, stores[sizes[-1]]))
    print(f"\n### Build time, {sizes[-1]:,} x {args.dim} float16, {args.index_factory}, "
          f"train {args.train_size:,}, add batch {args.add_batch:,}\n")
    print("| | seconds per run (train + add) | median | min |")
    print("|---|---|---|---|")
    rows = {"build": "`build_index` (read sample, train, checkpoint, stream + add, write)",
            "bare": "bare FAISS `index.train` + `index.add` (keys already float32 in RAM)"}
    for kind, label in rows.items():
        secs = [r["seconds"] for r in runs[kind]]
        each = ", ".join(f"{r['seconds']:.1f} ({r['train']:.1f} + {r['add']:.1f})" for r in runs[kind])
        print(f"| {label} | {each} | {statistics.median(secs):.1f} | {min(secs):.1f} |")
    ratio = {f: f([r["seconds"] for r in runs["build"]]) / f([r["seconds"] for r in runs["bare"]])
             for f in (statistics.median, min)}
    print(f"\n**ratio {ratio[statistics.median]:.3f}** (medians; {ratio[min]:.3f} for the fastest "
          f"runs; target <= 1.10); load average {os.getloadavg()[0]:.1f} at the end")

    print(f"\n### Peak RSS of `build_index` (ru_maxrss of the subprocess; {idle['rss_mib']:.0f} MiB "
          "after importing Python, torch, fairseq and faiss)\n")
    print("| datastore | keys file (float16) | peak RSS | above import | training sample (float32) "
          "| add chunk (float32) | index |")
    print("|---|---|---|---|---|---|---|")
    for n in sizes:
        rss = (max(r["rss_mib"] for r in runs["build"]) if n == sizes[-1]
               else run_worker("build", args, stores[n])["rss_mib"])
        sample = min(args.train_size, n) * args.dim * 4 / MIB
        chunk = min(args.add_batch, n) * args.dim * 4 / MIB
        index = n * (faiss_code_bytes(args.index_factory) + 8) / MIB
        print(f"| {n:,} x {args.dim} | {n * args.dim * 2 / MIB:.0f} MiB | {rss:.0f} MiB | "
              f"{rss - idle['rss_mib']:.0f} MiB | {sample:.0f} MiB | {chunk:.0f} MiB | {index:.0f} MiB |")


if __name__ == "__main__":
    main()
