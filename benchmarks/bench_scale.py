"""Cost as the store grows: sharded build, on-disk merge, search in RAM / memory-mapped / distributed.

    python benchmarks/bench_scale.py --workdir WORK/scale --sizes 1M,4M,16M --dim 128 --pq 64

For each size N (synthetic clustered float16 keys, written as 2 pass shards):

1. Build with the sharded commands, each stage in its own process (wall time,
   peak RSS): ``--train-only`` on 64 x nlist keys, ``--trained --shard-id i
   --num-shards 2`` for both shards (one after the other here; independent
   jobs on a cluster), ``--merge`` into one index with on-disk lists.
   nlist grows with the store as sqrt(N) (a power of two: 1024 at 1M, 4096 at
   16M); codes are ``PQ<pq>``, the paper's 64 bytes by default.
2. Search Q held-out queries (k 1024, nprobe 32, batches of 1024) in a fresh
   process per mode: the whole index held in RAM (the pieces merged in memory
   with ``merge_from`` and read normally), the same file memory-mapped
   (``--knn-index-mmap``), the merged on-disk index, and 2 ranks under
   torchrun/gloo each holding one piece (``--knn-distributed-index``'s
   retriever).  Queries/s, peak RSS and the resident anonymous / file-backed
   memory after the search; the first batch's neighbours are compared across
   modes (they must be equal).  Each single-process mode uses 2 FAISS
   threads; each rank 1.

Results go to WORK/results.json (a size already measured is skipped unless
--rerun); ``--report`` writes docs/scale/scale.md and scale.png from it.
The parent stays small (standard library only): ru_maxrss carries across fork.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

MIB = 1 << 20
K, NPROBE, BATCH = 1024, 32, 1024


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1_000, "M": 1_000_000, "G": 1_000_000_000}.get(text[-1], 1)
    return int(float(text.rstrip("KMG")) * scale)


def nlist_for(n: int) -> int:
    return 2 ** round(math.log2(math.sqrt(n)))


# ---------------------------------------------------------------- workers


def _generator(dim: int):
    import numpy as np

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((1024, 24)) * 3
    proj = rng.standard_normal((24, dim)) / 5

    def keys(n, seed):
        r = np.random.default_rng(seed)
        z = centers[r.integers(0, len(centers), n)] + r.standard_normal((n, centers.shape[1]))
        return (z @ proj + 0.05 * r.standard_normal((n, dim))).astype(np.float32)

    return keys


def worker_make(args) -> dict:
    """A synthetic float16 store of --size keys in 2 pass shards, and the queries."""
    import numpy as np
    from tqdm import tqdm

    from fairseq_knnlm.storage.datastore import DatastoreWriter, shard_dirname

    keys = _generator(args.dim)
    bounds = [0, args.size // 2, args.size]
    chunk = 1_000_000
    with tqdm(total=args.size, desc="keys", unit_scale=True, file=sys.stderr) as bar:
        for s in range(2):
            writer = DatastoreWriter(os.path.join(args.dstore, shard_dirname(s, 2)), args.dim, np.float16)
            for lo in range(bounds[s], bounds[s + 1], chunk):
                n = min(chunk, bounds[s + 1] - lo)
                writer.append(keys(n, [1, lo]), (np.arange(lo, lo + n) % 50_000).astype(np.int32))
                bar.update(n)
            writer.commit(dict(keytype="last_ffn_input", dictionary_md5="0" * 32, checkpoint_sha256="0" * 64))
    np.save(os.path.join(args.workdir, "queries.npy"), keys(args.queries, [2]))
    return {}


def _memory() -> dict:
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmHWM", "RssAnon", "RssFile"):
                fields[name] = int(value.split()[0]) / 1024
    return dict(peak_rss_mib=round(fields["VmHWM"]), anon_mib=round(fields["RssAnon"]),
                file_mib=round(fields["RssFile"]))


def _search_all(search, queries, out_prefix):
    import numpy as np

    first = search(queries[:BATCH])
    np.save(out_prefix + "-ids.npy", first[1])
    np.save(out_prefix + "-dists.npy", first[0])
    start = time.perf_counter()
    for lo in range(0, len(queries), BATCH):
        search(queries[lo : lo + BATCH])
    return time.perf_counter() - start


def worker_search(args) -> dict:
    import faiss
    import numpy as np

    from fairseq_knnlm.storage.datastore import Datastore
    from fairseq_knnlm.index import open_index

    faiss.omp_set_num_threads(2)
    queries = np.load(os.path.join(args.workdir, "queries.npy"))
    start = time.perf_counter()
    index, _ = open_index(args.index, Datastore(args.dstore), nprobe=NPROBE, mmap=args.mode == "mmap")
    load = time.perf_counter() - start
    seconds = _search_all(lambda q: index.search(q, K), queries,
                          os.path.join(args.workdir, f"first-{args.mode}"))
    return dict(load_seconds=round(load, 2), qps=round(len(queries) / seconds, 1), **_memory())


def worker_ram_index(args) -> dict:
    """The pieces merged in memory (FAISS merge_from) and written as one ordinary index."""
    import faiss

    from fairseq_knnlm.index.shards import find_shards

    paths, _ = find_shards(os.path.dirname(args.index))
    index = faiss.read_index(os.path.join(os.path.dirname(args.index), "trained.index"))
    for path in paths:
        piece = faiss.read_index(path)
        faiss.extract_index_ivf(index).merge_from(faiss.extract_index_ivf(piece), 0)
        index.ntotal = faiss.extract_index_ivf(index).ntotal
    faiss.write_index(index, args.output)
    return dict(bytes=os.path.getsize(args.output))


def worker_distributed(args) -> dict:
    """One rank of a 2-rank search (--knn-distributed-index's retriever): batches
    r, r + 2, ... of the queries, this rank's piece of the index."""
    import faiss
    import numpy as np
    import torch
    import torch.distributed as dist

    from fairseq_knnlm.storage.datastore import Datastore
    from fairseq_knnlm.retrieval.distributed import open_distributed_retriever

    faiss.omp_set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    queries = np.load(os.path.join(args.workdir, "queries.npy"))
    mine = np.concatenate([queries[lo : lo + BATCH] for lo in range(rank * BATCH, len(queries), world * BATCH)])
    flags = argparse.Namespace(
        knn_distributed_index=True, knnlm=True, knn_pointers=False, probe=NPROBE, knn_faiss_params=None,
        knn_index_mmap=False, knn_gpu=False, k=K, knn_sim_func="faiss", knn_candidates=None,
    )
    start = time.perf_counter()
    retriever = open_distributed_retriever(flags, Datastore(args.dstore), args.index)
    load = time.perf_counter() - start

    def search(q):
        found = retriever.search(torch.from_numpy(q))
        return found.dists.numpy(), found.ids

    dist.barrier()
    seconds = _search_all(search, mine, os.path.join(args.workdir, f"first-distributed-rank{rank}"))
    retriever.serve_until_done()
    ranks = [None] * world
    dist.all_gather_object(ranks, dict(seconds=seconds, load=load, **_memory()))
    dist.destroy_process_group()
    if rank:
        return None  # rank 0 reports for both
    return dict(load_seconds=round(max(r["load"] for r in ranks), 2),
                qps=round(len(queries) / max(r["seconds"] for r in ranks), 1),
                **{m: max(r[m] for r in ranks) for m in ("peak_rss_mib", "anon_mib", "file_mib")})


WORKERS = {"make": worker_make, "search": worker_search, "ram-index": worker_ram_index,
           "distributed": worker_distributed}


# ---------------------------------------------------------------- parent


def timed(cmd, env=None):
    """(wall seconds, peak RSS MiB, last stdout line) of one subprocess."""
    start = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE", **(env or {})))
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"failed: {' '.join(map(str, cmd))}\n{out[-2000:]}")
    lines = out.strip().splitlines()
    return time.perf_counter() - start, usage.ru_maxrss / 1024, lines[-1] if lines else ""


def worker_cmd(kind, args, **extra):
    cmd = [sys.executable, __file__, "--worker", kind, "--workdir", args.workdir, "--dim", str(args.dim)]
    for name, value in extra.items():
        cmd += [f"--{name.replace('_', '-')}", str(value)]
    return cmd


def build_cmd(*args):
    return [sys.executable, "-m", "fairseq_knnlm.cli.build_index", "--quiet", *map(str, args)]


def measure_size(args, n: int) -> dict:
    work = os.path.join(args.workdir, f"n{n}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    sub = argparse.Namespace(**dict(vars(args), workdir=work))
    dstore, idx = os.path.join(work, "dstore"), os.path.join(work, "idx")
    os.makedirs(idx)
    nlist = nlist_for(n)
    factory = f"IVF{nlist},PQ{args.pq}"
    row = dict(size=n, dim=args.dim, factory=factory, nlist=nlist, train_size=64 * nlist, queries=args.queries)
    wall, rss, _ = timed(worker_cmd("make", sub, dstore=dstore, size=n, queries=args.queries))
    row["make"] = dict(seconds=round(wall, 1), keys_bytes=n * args.dim * 2)
    trained = os.path.join(idx, "trained.index")
    stages = [("train", build_cmd("--dstore", dstore, "--train-only", "--output", trained,
                                  "--index-factory", factory, "--train-size", 64 * nlist))]
    stages += [(f"add{s}", build_cmd("--dstore", dstore, "--trained", trained, "--shard-id", s, "--num-shards", 2))
               for s in range(2)]
    stages += [("merge", build_cmd("--merge", idx))]
    for name, cmd in stages:
        wall, rss, line = timed(cmd, env=dict(OMP_NUM_THREADS="2"))
        row[name] = dict(seconds=round(wall, 1), peak_rss_mib=round(rss), summary=json.loads(line))
        print(f"  {name}: {wall:.1f} s, peak RSS {rss:.0f} MiB", file=sys.stderr)
    merged = os.path.join(idx, "knn.index")
    row["bytes"] = dict(
        trained=os.path.getsize(trained),
        pieces=sum(os.path.getsize(os.path.join(idx, f)) for f in os.listdir(idx) if f.startswith("shard-") and f.endswith(".index")),
        merged_index=os.path.getsize(merged), merged_ivfdata=os.path.getsize(os.path.join(idx, "knn.ivfdata")),
    )
    whole_dir = os.path.join(work, "whole")
    os.makedirs(whole_dir)
    whole = os.path.join(whole_dir, "knn.index")
    timed(worker_cmd("ram-index", sub, index=merged, output=whole))
    shutil.copy(merged + ".meta.json", whole + ".meta.json")
    meta = json.load(open(whole + ".meta.json"))
    meta.pop("ondisk"), meta.pop("ivfdata_bytes")
    json.dump(meta, open(whole + ".meta.json", "w"))
    row["bytes"]["ram_index"] = os.path.getsize(whole)
    row["search"] = {}
    for mode, index in (("ram", whole), ("mmap", whole), ("ondisk", merged)):
        wall, rss, line = timed(worker_cmd("search", sub, dstore=dstore, index=index, mode=mode))
        row["search"][mode] = json.loads(line)
        print(f"  search {mode}: {row['search'][mode]}", file=sys.stderr)
    if args.skip_distributed:
        return row
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    wall, rss, line = timed(torchrun + worker_cmd("distributed", sub, dstore=dstore, index=idx)[1:])
    row["search"]["distributed"] = json.loads(line)
    print(f"  search distributed: {row['search']['distributed']}", file=sys.stderr)
    row["equal_results"] = check_equal(work)
    shutil.rmtree(dstore)  # the keys are the bulk of the disk
    return row


def check_equal(work: str) -> dict:
    """How the first batch's neighbours of each mode compare with the index in RAM."""
    import numpy as np  # all children have run: the parent's RSS no longer matters

    ref_ids = np.load(os.path.join(work, "first-ram-ids.npy"))
    ref_d = np.load(os.path.join(work, "first-ram-dists.npy"))
    out = {}
    for mode in ("mmap", "ondisk", "distributed-rank0"):
        ids = np.load(os.path.join(work, f"first-{mode}-ids.npy"))
        d = np.load(os.path.join(work, f"first-{mode}-dists.npy"))
        finite = np.isfinite(ref_d)
        out[mode.split("-")[0]] = dict(same_ids=round(float((ids == ref_ids).mean()), 6),
                                       max_dist_diff=float(np.abs(d - ref_d)[finite].max()))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--sizes", default="1M,4M,16M")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--pq", type=int, default=64)
    p.add_argument("--queries", type=int, default=8192)
    p.add_argument("--rerun", action="store_true")
    p.add_argument("--skip-distributed", action="store_true", help="(to try the script) no 2-rank search")
    p.add_argument("--report", action="store_true", help="write docs/scale/ from WORK/results.json")
    p.add_argument("--worker", choices=WORKERS)
    for name in ("dstore", "index", "output", "mode"):
        p.add_argument(f"--{name}")
    p.add_argument("--size", type=int)
    args = p.parse_args()
    if args.worker:
        result = WORKERS[args.worker](args)
        if result is not None:
            print(json.dumps(result))
        return
    os.makedirs(args.workdir, exist_ok=True)
    results_path = os.path.join(args.workdir, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}
    if not args.report:
        for n in map(parse_size, args.sizes.split(",")):
            if str(n) in results and not args.rerun:
                continue
            print(f"size {n}", file=sys.stderr)
            results[str(n)] = measure_size(args, n)
            results["machine"] = machine_state()
            tmp = results_path + ".tmp"
            json.dump(results, open(tmp, "w"), indent=1)
            os.replace(tmp, results_path)
    from scale_report import write_report

    write_report(results, ROOT / "docs" / "scale")


def machine_state() -> str:
    load = os.getloadavg()
    return f"{os.cpu_count()} cores, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end"


if __name__ == "__main__":
    main()
