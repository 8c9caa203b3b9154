"""Table, JSON and Pareto plot of bench_fast_knnlm.py's results."""

import json
from pathlib import Path


def describe(name: str, config: dict, indexes: dict, results: dict = None) -> str:
    """A configuration in words: index, nprobe and the options that differ from the full kNN-LM."""
    if name == "base":
        return "base LM (stock fairseq-eval-lm, no retrieval)"
    if name.startswith("base-end"):
        return "base LM again, after the invocation's configurations (machine drift)"
    if name.startswith("base"):
        return "base LM, at the start of a later invocation"
    parts = [f"`{indexes[config['index']]['factory']}`", f"nprobe {config['probe']}"]
    if config["index"].startswith("pruned-") and "prune" in (results or {}):
        p = results["prune"]
        parts.insert(0, f"pruned store ({p['size_after']:,} of {p['size_before']:,} entries)")
    for key, value in config.items():
        if key in ("index", "probe"):
            continue
        if key == "tune":
            parts.append("T and λ chosen on valid for this configuration")
        elif key == "retrieval_fraction":
            parts.append(f"adaptive retrieval {value:g}")
        elif value is True:
            parts.append(f"`--{key.replace('_', '-')}`")
        else:
            parts.append(f"`--{key.replace('_', '-')} {value}`")
    return ", ".join(parts)


def is_extra_base(name: str) -> bool:
    """The base LM's repeated measurements (the first one is the reference point)."""
    return name.startswith("base") and name != "base"


def pareto(points):
    """Names of the points no other point beats on both throughput (higher) and perplexity (lower)."""
    front = []
    for name, (ratio, ppl) in points.items():
        dominated = any(r >= ratio and p <= ppl and (r, p) != (ratio, ppl) for r, p in points.values())
        if not dominated:
            front.append(name)
    return sorted(front, key=lambda n: points[n][0])


def rows(results: dict, configs: dict):
    runs, indexes = results["runs"], results.get("indexes", {})
    full = runs.get("full")
    out = []
    for name, run in runs.items():
        config = configs.get(name, {})
        recall = None
        if config:
            rec = indexes.get(config["index"], {}).get("recall", {}).get(str(config["probe"]))
            recall = rec.get(f"recall@{results['setting']['k']}") if rec else None
        setting = results.get("tuned", {}).get(name, results["setting"])
        # The base LM measured at the start of the same invocation (the first one's otherwise).
        base = runs.get(f"base {run.get('invocation')}", runs["base"])
        out.append(dict(
            name=name, what=describe(name, config, indexes, results),
            setting="" if name.startswith("base") else f"{setting['knn_temp']:g}, {setting['lmbda']:g}", tokens_per_s=run["tokens_per_s"],
            ratio=run["tokens_per_s"] / base["tokens_per_s"], searches_per_token=run["searches_per_token"],
            recall=recall, ppl=run["ppl"],
            change=(run["ppl"] / full["ppl"] - 1) if full else None,
        ))
    return out


def relative_paths(obj, roots: dict):
    """``obj`` with every string's absolute ``roots`` prefixes replaced by their names."""
    text = json.dumps(obj)
    for path, name in roots.items():
        text = text.replace(str(path).rstrip("/") + "/", name)
    return json.loads(text)


def write_fast_report(results: dict, configs: dict, report_dir: Path, roots: dict = None):
    """Table, JSON and plot into ``report_dir``; ``roots`` {absolute path: name} keeps machine paths out."""
    report_dir.mkdir(parents=True, exist_ok=True)
    results = relative_paths(results, roots or {})
    table = rows(results, configs)
    points = {r["name"]: (r["ratio"], r["ppl"]) for r in table if not is_extra_base(r["name"])}
    front = set(pareto(points))
    lines = [
        "| configuration | what | T, λ | tokens/s | ÷ base LM | searches per token | recall@k | test ppl | vs full kNN-LM | Pareto |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(table, key=lambda r: -r["ratio"]):
        spt = "" if r["searches_per_token"] is None else f"{r['searches_per_token']:.3f}"
        rec = "" if r["recall"] is None else f"{r['recall']:.3f}"
        change = "" if r["change"] is None else f"{100 * r['change']:+.2f}%"
        lines.append(f"| {r['name']} | {r['what']} | {r['setting']} | {r['tokens_per_s']:,.0f} | {r['ratio']:.2f} | {spt} | "
                     f"{rec} | {r['ppl']:.2f} | {change} | {'●' if r['name'] in front else ''} |")
    md = report_dir / "fast_knnlm.md"
    md.write_text("\n".join(lines) + "\n")
    js = report_dir / "fast_knnlm.json"
    js.write_text(json.dumps(dict(results, table=table, pareto=sorted(front)), indent=1))
    png = report_dir / "fast_knnlm_pareto.png"
    plot(table, front, png)
    return [md, js, png]


def plot(table, front, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for r in table:
        if is_extra_base(r["name"]):
            continue
        on = r["name"] in front
        ax.scatter(r["ratio"], r["ppl"], color="C3" if on else "C0", s=30 if on else 18, zorder=3)
        ax.annotate(r["name"], (r["ratio"], r["ppl"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    fr = sorted((r for r in table if r["name"] in front), key=lambda r: r["ratio"])
    ax.plot([r["ratio"] for r in fr], [r["ppl"] for r in fr], color="C3", lw=1, label="Pareto front")
    full = next((r for r in table if r["name"] == "full"), None)
    if full:
        ax.axhline(full["ppl"] * 1.01, color="grey", ls=":", lw=1, label="full kNN-LM + 1%")
    ax.axvline(0.9, color="grey", ls="--", lw=1, label="0.9 × base LM tokens/s")
    ax.set_xlabel("throughput ÷ base LM (tokens/s, same run)")
    ax.set_ylabel("test perplexity")
    ax.set_title("kNN-LM on WikiText-2 test: throughput vs perplexity")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
