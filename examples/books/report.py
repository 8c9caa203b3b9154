"""Tables and plots of examples/books/run.py's results.json.

    python examples/books/report.py WORKDIR/results.json [REPORT_DIR]
"""

import json
import sys
from pathlib import Path

MODELS = (("base", "LM"), ("cache", "LM + cache"), ("knn", "kNN-LM"), ("both", "kNN-LM + cache"))
# Paper, Table 4 (Books test; Wikipedia = WIKI-3B) and Table 3 (Wiki-100M LM, Wiki-3B store: 13.73).
PAPER_TABLE4 = {"wiki+books": (34.84, 20.47), "books+books": (11.89, 10.89)}
PAPER_LAMBDA = {"wiki+books": 0.65, "books+books": 0.25}


def fmt(x, digits=2):
    return "–" if x is None else f"{x:.{digits}f}"


def size_rows(results):
    """The datastore-size curve of the eighth LM: (row, entries, fraction of train) by size."""
    out = []
    for name, rec in results.get("rows", {}).items():
        if rec.get("lm") == "eighth" and "table" in rec:
            store = results["dstore"][rec["dstore"]]
            out.append((name, rec, store["size"], store["size"] / results["dstore"]["books-by-eighth"]["size"]))
    return sorted(out, key=lambda row: row[2])


def table4(results):
    rows, base = results.get("rows", {}), results.get("baseline", {})
    lines = ["| LM trained on | datastore | valid ppl (token / word) | test ppl (token / word) | λ (valid) | "
             "paper test ppl |", "|---|---|---|---|---|---|"]
    for lm, name, paper_i, ds in (("wiki", "wiki+books", 0, "–"), ("wiki", "wiki+books", 1, "Books train"),
                                  ("books", "books+books", 0, "–"), ("books", "books+books", 1, "Books train")):
        rec = rows.get(name, {})
        if paper_i == 0:
            b = base.get(f"{lm}@books", {})
            v, t = b.get("valid", {}), b.get("test", {})
            cells = (f"{fmt(v.get('ppl'))} / {fmt(v.get('ppl_per_word'))}", f"{fmt(t.get('ppl'))} / "
                     f"{fmt(t.get('ppl_per_word'))}", "–")
        else:
            r = rec.get("table", {}).get("knn", {})
            cells = (f"{fmt(r.get('valid'))} / {fmt(r.get('valid_per_word'))}",
                     f"{fmt(r.get('test'))} / {fmt(r.get('test_per_word'))}", fmt(r.get("setting", {}).get("lmbda")))
        lines.append(f"| {'WikiText-2' if lm == 'wiki' else 'Books'} | {ds} | {cells[0]} | {cells[1]} | {cells[2]} | "
                     f"{PAPER_TABLE4[name][paper_i]} |")
    return lines


def cache_table(results):
    lines = ["| row | " + " | ".join(n for _, n in MODELS) + " | cache's share of the kNN gain (test) |",
             "|---|" + "---|" * (len(MODELS) + 1)]
    for name, rec in results.get("rows", {}).items():
        t = rec.get("table")
        if not t:
            continue
        share = None
        gain = t["base"]["test"] - t["knn"]["test"]
        if gain > 0:
            share = (t["base"]["test"] - t["cache"]["test"]) / gain
        lines.append(f"| {name} | " + " | ".join(f"{fmt(t[m]['valid'])} / {fmt(t[m]['test'])}" for m, _ in MODELS)
                     + f" | {'–' if share is None else f'{100 * share:.0f}%'} |")
    return lines


def size_table(results):
    books = results.get("baseline", {}).get("books@books", {}).get("test", {}).get("ppl")
    lines = ["| datastore (Books train, keys of the eighth LM) | entries | share of train | valid ppl | test ppl | "
             "best λ (valid) |", "|---|---|---|---|---|---|"]
    base = results.get("baseline", {}).get("eighth@books", {})
    lines.append(f"| none (the eighth LM alone) | 0 | 0 | {fmt(base.get('valid', {}).get('ppl'))} | "
                 f"{fmt(base.get('test', {}).get('ppl'))} | – |")
    crossing = None
    for name, rec, size, frac in size_rows(results):
        r = rec["table"]["knn"]
        lines.append(f"| {name} | {size:,} | {frac:.3f} | {fmt(r['valid'])} | {fmt(r['test'])} | "
                     f"{fmt(r['setting']['lmbda'])} |")
        if crossing is None and books is not None and r["test"] < books:
            crossing = (name, size, frac)
    lines.append("")
    lines.append(f"The LM trained on all of Books train: test ppl {fmt(books)}. " + (
        f"The curve crosses it at {crossing[0]} ({crossing[1]:,} entries, {crossing[2]:.3f} of train)."
        if crossing else "The curve does not cross it in the sizes measured."))
    return lines


def plot_lambda(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in (("books+books", "in domain: Books LM + Books store"),
                        ("wiki+wiki", "in domain: WikiText-2 LM + WikiText-2 store"),
                        ("wiki+books", "out of domain: WikiText-2 LM + Books store")):
        rec = results.get("rows", {}).get(name)
        if not rec or "lambda_curve" not in rec:
            continue
        curve = rec["lambda_curve"]
        base = curve["ppl"][0]
        ax.plot(curve["lambdas"], [p / base for p in curve["ppl"]], label=f"{label} (best λ {rec['chosen']['lmbda']:g})")
    ax.set_xlabel("λ")
    ax.set_ylabel("valid perplexity / perplexity at λ = 0")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_size(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = size_rows(results)
    if not rows:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    sizes = [s for _, _, s, _ in rows]
    a.plot(sizes, [r["table"]["knn"]["test"] for _, r, _, _ in rows], "o-", label="eighth LM + datastore")
    books = results.get("baseline", {}).get("books@books", {}).get("test", {}).get("ppl")
    if books:
        a.axhline(books, color="k", ls="--", label="LM trained on all of Books train")
    a.set_xscale("log")
    a.set_xlabel("datastore entries")
    a.set_ylabel("test perplexity")
    a.legend(fontsize=7)
    b.plot(sizes, [r["table"]["knn"]["setting"]["lmbda"] for _, r, _, _ in rows], "o-")
    b.set_xscale("log")
    b.set_xlabel("datastore entries")
    b.set_ylabel("best λ (valid)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def headline(results):
    t = results.get("rows", {}).get("wiki+books", {}).get("table")
    if not t:
        return "no kNN-LM results yet"
    base, knn = t["base"]["test"], t["knn"]["test"]
    return (f"Books test, WikiText-2 LM: {base:.2f} alone, {knn:.2f} with a Books datastore "
            f"({100 * (knn / base - 1):+.1f}%), per subword token ({results['mode']} mode)")


def write_report(results, report_dir):
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    lam, size = report_dir / "lambda.png", report_dir / "dstore_size.png"
    plot_lambda(results, lam)
    plot_size(results, size)
    md = ["# kNN-LM on Books: domain adaptation and datastore size", "",
          f"Mode: {results['mode']}. Perplexity per subword token / per word (exp(NLL / words), words = "
          "whitespace-separated tokens plus one end of line per line). λ and T chosen on valid.", "",
          "## Domain adaptation (paper Table 4)", "", *table4(results), "",
          "## Continuous cache (valid / test per subword token)", "", *cache_table(results), "",
          "## Datastore size (paper Table 3, Figure 2)", "", *size_table(results), "",
          "![λ](lambda.png) ![size](dstore_size.png)", ""]
    out = report_dir / "results.md"
    out.write_text("\n".join(md))
    (report_dir / "results.json").write_text(json.dumps(results, indent=1))
    return [p for p in (out, lam, size) if p.exists()]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    res = json.loads(Path(sys.argv[1]).read_text())
    print("\n".join(str(p) for p in write_report(res, sys.argv[2] if len(sys.argv) > 2 else Path(sys.argv[1]).parent / "report")))
