"""docs/scale/: table, plot and extrapolation of benchmarks/bench_scale.py's results.

The extrapolation fits two cost models to the measured sizes (all at the
benchmark's key dimension D and 2 cores):

- adding keys: seconds = N x (a + b x nlist) x d / D (coarse assignment costs
  nlist x d per key, PQ encoding a multiple of d);
- searching (one process, index in RAM): seconds per query = c0 + c1 x S,
  S = nprobe x N / nlist codes scanned (PQ codes of the same size cost the
  same whatever d; the coarse search is in c0).

and applies them to WikiText-103 (103M x 1024, IVF4096) and a 3B-entry store
(3B x 1024, IVF65536: 4096 lists would scan 23M codes per query).
"""

import json
import os

import numpy as np

GIB = 1 << 30
NPROBE = 32
TARGETS = [
    ("WikiText-103", 103_225_485, 1024, 4096),
    ("3B-entry store", 3_000_000_000, 1024, 65536),
]


def _rows(results):
    return [results[n] for n in sorted((n for n in results if n.isdigit()), key=int)]


def fit(rows):
    n = np.array([r["size"] for r in rows], float)
    nlist = np.array([r["nlist"] for r in rows], float)
    add = np.array([r["add0"]["summary"]["add_seconds"] + r["add1"]["summary"]["add_seconds"] for r in rows])
    a, b = np.linalg.lstsq(np.stack([n, n * nlist], 1), add, rcond=None)[0]
    scanned = NPROBE * n / nlist
    per_query = 1 / np.array([r["search"]["ram"]["qps"] for r in rows])
    c0, c1 = np.linalg.lstsq(np.stack([np.ones_like(scanned), scanned], 1), per_query, rcond=None)[0]
    merge_rate = np.mean([r["bytes"]["merged_ivfdata"] / r["merge"]["summary"]["merge_seconds"] for r in rows])
    return dict(a=a, b=b, c0=c0, c1=c1, merge_bytes_per_s=merge_rate)


def estimates(rows, model):
    dim = rows[0]["dim"]
    code = int(rows[0]["factory"].rsplit("PQ", 1)[1])
    out = []
    for name, n, d, nlist in TARGETS:
        add_core_hours = n * (model["a"] + model["b"] * nlist) * d / dim * 2 / 3600
        scanned = NPROBE * n / nlist
        out.append(dict(
            name=name, size=n, dim=d, nlist=nlist,
            keys_gib=n * d * 2 / GIB, index_gib=n * (code + 8) / GIB,
            add_core_hours=add_core_hours,
            merge_hours=n * (code + 8) / model["merge_bytes_per_s"] / 3600,
            ms_per_query=(model["c0"] + model["c1"] * scanned) * 1000,
            scanned=scanned,
        ))
    return out


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["size"] for r in rows]
    fig, (left, right, memory) = plt.subplots(1, 3, figsize=(15, 4))
    for stage, label in (("train", "train (64 x nlist keys)"), ("add", "add (2 pieces)"), ("merge", "merge on disk")):
        secs = [r["add0"]["seconds"] + r["add1"]["seconds"] if stage == "add" else r[stage]["seconds"] for r in rows]
        left.plot(n, secs, "o-", label=label)
    left.set(xscale="log", yscale="log", xlabel="keys in the store", ylabel="wall seconds (2 cores)",
             title="build")
    left.legend()
    for mode in ("ram", "mmap", "ondisk", "distributed"):
        if all(mode in r["search"] for r in rows):
            right.plot(n, [r["search"][mode]["qps"] for r in rows], "o-", label=mode)
    right.set(xscale="log", yscale="log", xlabel="keys in the store", ylabel="queries/s (k 1024, nprobe 32)",
              title="search")
    right.legend()
    for mode, label in (("ram", "in RAM"), ("ondisk", "merged, lists on disk"), ("distributed", "distributed (per rank)")):
        if all(mode in r["search"] for r in rows):
            memory.plot(n, [r["search"][mode]["anon_mib"] for r in rows], "o-", label=label)
    memory.set(xscale="log", xlabel="keys in the store", ylabel="resident anonymous MiB after the search",
               title="search process memory")
    memory.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(results, rows, model, est) -> str:
    r0 = rows[0]
    lines = [
        f"Synthetic clustered float16 keys of dim {r0['dim']}, written as 2 pass shards; "
        f"`IVF<nlist>,PQ{r0['factory'].rsplit('PQ', 1)[1]}` with nlist = sqrt(N) (a power of two), trained on "
        f"64 x nlist keys; " + ", ".join(f"{r['queries']:,}" for r in rows) + " held-out queries for the "
        "sizes in order, k 1024, nprobe 32, batches of 1024. "
        f"Machine: {results.get('machine', '?')}.",
        "",
        "Build, each stage a process of its own (wall seconds incl. start-up / peak RSS MiB):",
        "",
        "| keys | nlist | train | add piece 0 | add piece 1 | merge | keys on disk | pieces | merged .ivfdata |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = r["bytes"]
        lines.append(
            f"| {r['size']:,} | {r['nlist']} | "
            + " | ".join(f"{r[s]['seconds']:.1f} s / {r[s]['peak_rss_mib']:,}" for s in ("train", "add0", "add1", "merge"))
            + f" | {r['make']['keys_bytes'] / GIB:.2f} GiB | {b['pieces'] / GIB:.3f} GiB | {b['merged_ivfdata'] / GIB:.3f} GiB |"
        )
    lines += [
        "",
        "Search, one process per mode (queries/s; peak RSS / resident anonymous / resident file-backed MiB "
        "after the search). `ram`: the whole index read into RAM; `mmap`: the same file with "
        "`--knn-index-mmap`; `ondisk`: the merged index (`knn.ivfdata`); `distributed`: 2 ranks (gloo), "
        "one piece and every other batch each, 1 FAISS thread each (memory: the larger rank). Last column: "
        "the fraction of the first batch's neighbour ids equal to `ram`'s (distributed: rank 0's batch; "
        "its single FAISS thread can change the last bits of IVF-PQ scores, and so the order of near ties).",
        "",
        "| keys | ram | mmap | ondisk | distributed | same neighbours |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = []
        for mode in ("ram", "mmap", "ondisk", "distributed"):
            s = r["search"].get(mode)
            cells.append("–" if s is None else
                         f"{s['qps']:,.0f} q/s; {s['peak_rss_mib']:,} / {s['anon_mib']:,} / {s['file_mib']:,}")
        same = r.get("equal_results") or {}
        lines.append(f"| {r['size']:,} | " + " | ".join(cells) + " | "
                     + ", ".join(f"{m} {v['same_ids']:.4f}" for m, v in same.items()) + " |")
    lines += [
        "",
        f"Fitted at dim {r0['dim']} on 2 cores: adding costs N x ({model['a'] * 1e6:.2f} + "
        f"{model['b'] * 1e9:.3f}e-3 x nlist) µs; a query costs {model['c0'] * 1e3:.2f} ms + "
        f"{model['c1'] * 1e9:.2f} ns per scanned code; the merge writes {model['merge_bytes_per_s'] / (1 << 20):.0f} MiB/s.",
        "",
        "| store | keys on disk (fp16) | index (codes + ids) | add: core-hours | merge | search (1 process, 2 cores, in RAM) |",
        "|---|---|---|---|---|---|",
    ]
    for e in est:
        lines.append(
            f"| {e['name']}: {e['size']:,} x {e['dim']}, IVF{e['nlist']},PQ64 | {e['keys_gib']:,.0f} GiB | "
            f"{e['index_gib']:,.1f} GiB | {e['add_core_hours']:,.0f} | {_duration(e['merge_hours'] * 3600)} | "
            f"{e['ms_per_query']:,.0f} ms per query ({e['scanned'] / 1e6:.1f}M codes scanned) |"
        )
    return "\n".join(lines) + "\n"


def _duration(seconds: float) -> str:
    return f"{seconds:,.0f} s" if seconds < 120 else f"{seconds / 60:,.0f} min"


def write_report(results: dict, out_dir) -> None:
    os.makedirs(out_dir, exist_ok=True)
    rows = _rows(results)
    with open(os.path.join(out_dir, "scale.json"), "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    if len(rows) < 2:
        print("need at least 2 sizes for a report")
        return
    model = fit(rows)
    est = estimates(rows, model)
    plot(rows, os.path.join(out_dir, "scale.png"))
    with open(os.path.join(out_dir, "scale.md"), "w") as f:
        f.write(markdown(results, rows, model, est))
    print(f"wrote {out_dir}/scale.md, scale.png, scale.json")
