"""Tables (markdown) and plots (PNG) from the results.json of examples/wikitext2/run.py.

    python examples/wikitext2/report.py WORKDIR [REPORT_DIR]
"""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # training_curve.py beside this file

LAMBDA_ROWS = (0, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
SIM_NAMES = {"faiss": "faiss (IVF-PQ distances)", "l2": "l2 (exact distances of IVF-PQ candidates)"}
STAGE_ROWS = (
    ("data", "locate / slice WikiText-2"),
    ("preprocess", "fairseq-preprocess"),
    ("train", "train the LM (fairseq-train)"),
    ("baseline", "base LM eval, valid + test"),
    ("dstore", "datastore pass over train"),
    ("index", "build IVF-PQ (+ recall) and Flat indexes"),
    ("knn-valid-faiss", "kNN-LM on valid, faiss distances, saving neighbours"),
    ("sweep-valid-faiss", "sweep k x T x λ on valid (faiss)"),
    ("knn-test-faiss", "kNN-LM on test at the valid-chosen setting (faiss)"),
    ("sweep-test-faiss", "sweep on test (read-off at valid-chosen settings)"),
    ("dstore-size", "10% / 30% datastores: copy, index, valid eval, sweep"),
    ("subset", "Flat vs IVF-PQ on a valid subset"),
    ("cache", "continuous cache: valid run saving keys, sweep of size, θ, λc, λ; test run"),
    ("keytypes", "last_layer_output keys: datastore pass, IVF-PQ index, valid run, sweep, test run"),
    ("knn-valid-l2", "kNN-LM on valid, l2 distances, saving neighbours"),
    ("sweep-valid-l2", "sweep on valid (l2)"),
    ("knn-test-l2", "kNN-LM on test at the valid-chosen setting (l2)"),
    ("sweep-test-l2", "sweep on test (l2)"),
    ("whole-test", "kNN-LM (faiss) on the whole test split, valid-chosen setting"),
)


def f2(x):
    return "–" if x is None or not np.isfinite(x) else f"{x:.2f}"


def cell(sw, k, t, lam):
    """Perplexity at (k, T, λ) in a compact sweep, or None if that point is not in the grid."""
    if sw is None:
        return None
    try:
        ki, ti, li = sw["ks"].index(k), sw["temps"].index(t), _index(sw["lambdas"], lam)
    except ValueError:
        return None
    return float(np.array(sw["ppl"])[ki, ti, li])


def _index(values, x):
    for i, v in enumerate(values):
        if abs(v - x) < 1e-9:
            return i
    raise ValueError(x)


def best_on(sw, k=None, t=None, lam=None):
    """(T, λ) minimising perplexity in sw with k (and optionally T or λ) fixed."""
    ppl = np.array(sw["ppl"], dtype=float)
    skipped = np.array(sw["skipped"])
    ppl = np.where(skipped == skipped.min(), ppl, np.inf)
    ki = sw["ks"].index(k)
    grid = ppl[ki]
    if t is not None:
        ti = sw["temps"].index(t)
        li = int(np.argmin(grid[ti]))
        return t, sw["lambdas"][li]
    if lam is not None:
        li = _index(sw["lambdas"], lam)
        ti = int(np.argmin(grid[:, li]))
        return sw["temps"][ti], lam
    ti, li = np.unravel_index(np.argmin(grid), grid.shape)
    return sw["temps"][ti], sw["lambdas"][li]


def base_lm(results):
    """{split: stat} of the base LM on the kNN-LM's tokens: the whole splits, or with --eval-tokens
    λ = 0 of the sweeps (the same forward pass)."""
    base = {} if results.get("config", {}).get("eval_tokens") else dict(results.get("baseline", {}))
    for split in ("valid", "test"):
        sws = results.get(f"sweep_{split}", {})
        sw = sws.get("faiss") or sws.get("l2")
        if split not in base and sw:
            base[split] = dict(sw["base"], from_sweep=True)
    return base


def cache_setting(setting, with_knn=True, with_size=True):
    """'N 2000, θ 0.1, λc 0.2' (and 'λ 0.25, ' first with the kNN-LM) of a cache table row."""
    parts = [f"λ {setting['lmbda']:g}"] if with_knn else []
    if setting["cache_lmbda"]:
        parts += [f"N {setting['cache_size']}"] if with_size else []
        parts.append(f"θ {setting['cache_theta']:g}, λc {setting['cache_lmbda']:g}")
    return ", ".join(parts) or "–"


def cache_section(results):
    """Markdown for the continuous-cache stage, or None."""
    c = results.get("cache", {})
    if "table" not in c:
        return None
    g = c["grid"]
    names = {"base": "base LM", "cache": "LM + continuous cache", "knn": "kNN-LM",
             "both": "kNN-LM + continuous cache"}
    rows = [[names[name], cache_setting(r["setting"], name in ("knn", "both")), f2(r["valid"]), f2(r["test"])]
            for name, r in c["table"].items()]
    md = ["## Continuous cache (Grave et al., 2017), alone and with the kNN-LM\n",
          "p = (1 − λc) · p_model + λc · p_cache, where p_model is the LM or the kNN-LM and p_cache(w) ∝ "
          "Σ exp(θ · q_t · q_i) over the N scored tokens before t whose next token is w (keys q: the "
          f"kNN-LM's). kNN: faiss distances, k {g['k']}, T {g['knn_temp']:g} (chosen for the kNN-LM on valid). "
          f"Chosen on **valid** over N in {{{', '.join(map(str, g['sizes']))}}}, θ in "
          f"{{{', '.join(f'{t:g}' for t in g['thetas'])}}}, λc in {g['cache_lambdas']} and λ in {g['lambdas']} "
          "(jointly, for the last row); test at those settings, from the sweep of a test run's saved "
          "neighbours and keys.\n",
          table(["model", "setting (chosen on valid)", "valid", "test"], rows) + "\n"]
    run = c.get("test_run")
    if run:
        md.append(f"Check: the fairseq-eval-lm run on test at the last row's setting printed {run['ppl']:.2f}.\n")
    per = c.get("per_size")
    if per:
        md.append(table(["cache size N", "valid: LM + cache (θ, λc)", "valid: kNN-LM + cache (λ, θ, λc)"],
                        [[p["size"], f"{f2(p['cache']['ppl'])} ({cache_setting(p['cache'], False, False)})",
                          f"{f2(p['both']['ppl'])} ({cache_setting(p['both'], with_size=False)})"]
                         for p in per]) + "\n")
    return "\n".join(md)


KEYTYPE_NAMES = {"last_ffn_input": "last layer's FFN input, after its layer norm (the paper's best)",
                 "last_layer_output": "last layer's output (the decoder's final hidden state)"}


def keytype_section(results):
    """Markdown for the key-type comparison, or None."""
    kt = results.get("keytypes", {})
    if not all("test" in r for r in kt.values()) or len(kt) < 2:
        return None
    base = base_lm(results)
    rows = [["base LM", "–", "–", "–", f2(base.get("valid", {}).get("ppl")), f2(base.get("test", {}).get("ppl"))]]
    for name, r in kt.items():
        d, rec, c = r["dstore"], r["index"].get("recall") or {}, r["chosen"]
        rows.append([f"`{name}`: {KEYTYPE_NAMES.get(name, name)}", f"{d['size']:,} x {d['dim']}",
                     " / ".join(f"{rec[k]:.3f}" for k in ("recall@1", "recall@10") if k in rec) or "–",
                     f"k {c['k']}, T {c['knn_temp']:g}, λ {c['lmbda']:g}", f2(c["ppl"]), f2(r["test"]["ppl"])])
    cfg = results.get("config", {})
    return "\n".join([
        "## Which hidden state is the key\n",
        "Each key type has its own datastore (one pass over train), its own IVF-PQ index "
        f"({cfg.get('ivfpq_factory')}, trained on up to {cfg.get('ivfpq_train', 0):,} of its own keys), and "
        "its own T and λ chosen on **valid** (faiss distances, k fixed); test is a fairseq-eval-lm run at that "
        "setting. Recall: the index's recall@1 / @10 of exact neighbours among its own keys "
        f"(nprobe {cfg.get('probe')}).\n",
        table(["key", "datastore", "IVF-PQ recall@1 / @10", "setting (chosen on valid)", "valid", "test"],
              rows) + "\n"])


def headline(results, results_path, paths):
    """The table a person reads at the end of a run: base LM vs kNN-LM (and the cache), and where
    the report, the plots and every number are."""
    base = base_lm(results)
    rows = [("base LM", base.get("valid", {}).get("ppl"), base.get("test", {}).get("ppl"))]
    for sim, name in (("faiss", "approximate"), ("l2", "exact")):
        c = results.get("chosen", {}).get(sim)
        if c:
            rows.append((f"kNN-LM, {sim} ({name}) distances: k {c['k']}, T {c['knn_temp']:g}, λ {c['lmbda']:g}",
                         c["ppl"], results.get("knn_test", {}).get(sim, {}).get("ppl")))
    cache = results.get("cache", {}).get("table", {})
    for name, label in (("cache", "LM + continuous cache"), ("both", "kNN-LM (faiss) + continuous cache")):
        if name in cache:
            r = cache[name]
            rows.append((f"{label}: {cache_setting(r['setting'], name == 'both')}", r["valid"], r["test"]))
    width = max(len(r[0]) for r in rows)
    lines = [f"kNN-LM on WikiText-2 ({results.get('mode')} run): perplexity, settings chosen on valid",
             f"  {'model':<{width}s} {'valid':>9s} {'test':>9s}"]
    lines += [f"  {label:<{width}s} {f2(v):>9s} {f2(t):>9s}" for label, v, t in rows]
    report = next((p for p in paths if str(p).endswith(".md")), None)
    plots = [p for p in paths if str(p).endswith(".png")]
    lines.append(f"report: {_shown(report)}")
    if plots:
        lines.append(f"plots:  {', '.join(_shown(p) for p in plots)}")
    lines.append(f"every number: {_shown(results_path)}")
    return "\n".join(lines)


def _shown(path):
    """A path to print: relative to the current directory when inside it."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def write_report(results, work, report_dir):
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    md, plots = [], {}
    cfg = results.get("config", {})
    whole = dict(results.get("baseline", {}))
    n_eval = cfg.get("eval_tokens")
    base = base_lm(results)
    chosen = results.get("chosen", {})
    sv, st = results.get("sweep_valid", {}), results.get("sweep_test", {})
    kt = results.get("knn_test", {})
    kv = results.get("knn_valid", {})
    K = cfg.get("k", 1024)

    md.append(f"# kNN-LM on WikiText-2 ({results.get('mode')} run)\n")
    d = results.get("dstore")
    if d:
        md.append(f"Datastore: {d['size']:,} keys x {d['dim']} ({d['keys_dtype']}, "
                  f"{d['keys_bytes'] / 2**30:.2f} GiB) from train. Evaluation blocks: "
                  f"--tokens-per-sample {cfg.get('tokens_per_sample')} --context-window {cfg.get('eval_context')} "
                  f"(datastore pass: --context-window {cfg.get('dstore_context')}); k = {K}, nprobe = {cfg.get('probe')}.\n")

    # ---------------------------------------------------------------- main
    rows = [["base LM", "–", f2(base.get("valid", {}).get("ppl")), f2(base.get("test", {}).get("ppl"))]]
    for sim in ("faiss", "l2"):
        c = chosen.get(sim)
        if not c:
            rows.append([f"kNN-LM, {SIM_NAMES[sim]}", "not run", "not run", "not run"])
            continue
        test = kt.get(sim, {}).get("ppl")
        rows.append([f"kNN-LM, {SIM_NAMES[sim]}", f"k {c['k']}, T {c['knn_temp']:g}, λ {c['lmbda']:g}",
                     f2(c["ppl"]), f2(test)])
    wt = results.get("whole_test")
    if wt:
        rows.append([f"kNN-LM, {SIM_NAMES['faiss']}, **whole test split**",
                     f"k {wt['k']}, T {wt['knn_temp']:g}, λ {wt['lmbda']:g} (the same)", "–",
                     f"{f2(wt['ppl'])} (base LM {f2(whole.get('test', {}).get('ppl'))})"])
    for sim in ("faiss", "l2"):
        if sim in kv:
            rows.append([f"kNN-LM, {sim}, the paper's T 1, λ 0.25 (not tuned)", f"k {K}, T 1, λ 0.25",
                         f2(kv[sim]["ppl"]), f2(cell(st.get(sim), K, 1.0, 0.25))])
    md.append("## Perplexity: base LM vs kNN-LM\n")
    if n_eval:
        heads = results.get("eval_heads", {})
        md.append(f"**Evaluated on the first {heads.get('valid', n_eval):,} tokens of valid and the first "
                  f"{heads.get('test', n_eval):,} tokens of test** (`--eval-tokens {n_eval}`: whole lines, "
                  "binarized with the model's dictionary), not the whole splits; the base LM row is the same "
                  "forward pass with λ = 0. The base LM on the whole splits: valid "
                  f"{f2(whole.get('valid', {}).get('ppl'))}, test {f2(whole.get('test', {}).get('ppl'))}.\n")
    md.append("T and λ are chosen on **valid** (grid: T in {"
              + ", ".join(f"{t:g}" for t in cfg.get("temps", [])) + "}, λ in " + str(cfg.get("lambdas"))
              + f", k fixed at {K}); test is reported at those settings, from a separate fairseq-eval-lm run "
              "on test.\n")
    md.append(table(["model", "setting (chosen on valid)", "valid", "test"], rows) + "\n")
    checks = []
    for sim in ("faiss", "l2"):
        if sim in kt and sim in st:
            c = kt[sim]
            swept = cell(st[sim], c["k"], c["knn_temp"], c["lmbda"])
            checks.append(f"{sim}: fairseq-eval-lm printed {c['ppl']:.2f}, the sweep gives {swept:.4f}")
    if checks:
        md.append("Check, test at the chosen setting, real run vs offline sweep of its saved neighbours: "
                  + "; ".join(checks) + ".\n")

    for section in (cache_section(results), keytype_section(results)):
        if section:
            md.append(section)

    train_log = Path(work) / "train.log"
    if train_log.exists():
        from training_curve import parse, plot, summary

        curve = parse(train_log.read_text())
        if curve["train"]:
            s = summary(curve)
            plot(curve, report_dir / "training.png")
            plots["training"] = report_dir / "training.png"
            md.append("## Training\n")
            md.append(f"fairseq-train ran {s['updates']:,} updates (epoch {s['epochs']}) in "
                      f"{(s['seconds'] or 0) / 60:.0f} minutes at a median {s['median_tokens_per_s']:,} tokens/s "
                      f"(its log); best valid perplexity {s['best_valid_ppl']} (fairseq's own valid blocks) "
                      f"after {s['best_valid_updates']:,} updates. Loss curve: training.png.\n")

    # ---------------------------------------------------------------- vs k
    if sv:
        rows = []
        ks = sv[next(iter(sv))]["ks"]
        for k in ks:
            r = [k]
            for sim in ("faiss", "l2"):
                if sim not in sv:
                    r += ["–"] * 2
                    continue
                t, lam = best_on(sv[sim], k=k)
                r += [f"T {t:g}, λ {lam:g}", f"{f2(cell(sv[sim], k, t, lam))} / {f2(cell(st.get(sim), k, t, lam))}"]
            rows.append(r)
        md.append("## Perplexity vs k\n")
        md.append("For each k, T and λ chosen on valid; cells are valid / test. The neighbours are the k "
                  f"nearest of the {K} retrieved (IVF-PQ, nprobe {cfg.get('probe')}).\n")
        md.append(table(["k", "faiss: T, λ", "faiss: valid / test", "l2: T, λ", "l2: valid / test"], rows) + "\n")
        plots["k"] = plot_lines(report_dir / "ppl_vs_k.png", "kNN-LM perplexity vs k (T, λ chosen on valid per k)",
                                "k (neighbours)", ks,
                                {f"{split} {sim}": [cell(sw[sim], k, *best_on(sv[sim], k=k)) for k in ks]
                                 for sim in ("faiss", "l2") if sim in sv
                                 for split, sw in (("valid", sv), ("test", st)) if sim in sw},
                                base, logx=True)

    # ------------------------------------------------------------- vs λ
    if sv and chosen:
        rows = []
        for lam in LAMBDA_ROWS:
            r = [f"{lam:g}"]
            for sim in ("faiss", "l2"):
                c = chosen.get(sim)
                r.append("–" if not c else
                         f"{f2(cell(sv.get(sim), c['k'], c['knn_temp'], lam))} / "
                         f"{f2(cell(st.get(sim), c['k'], c['knn_temp'], lam))}")
            rows.append(r)
        md.append("## Perplexity vs λ\n")
        md.append("k and T at the valid-chosen setting of each distance; cells are valid / test "
                  "(λ = 0 is the base LM).\n")
        md.append(table(["λ", "faiss (T {:g}): valid / test".format(chosen["faiss"]["knn_temp"]) if "faiss" in chosen
                         else "faiss", "l2 (T {:g}): valid / test".format(chosen["l2"]["knn_temp"]) if "l2" in chosen
                         else "l2"], rows) + "\n")
        lams = sv[next(iter(sv))]["lambdas"]
        plots["lambda"] = plot_lines(
            report_dir / "ppl_vs_lambda.png", "kNN-LM perplexity vs λ (k, T chosen on valid)", "λ", lams,
            {f"{split} {sim} (T {chosen[sim]['knn_temp']:g})":
             [cell(sw[sim], chosen[sim]["k"], chosen[sim]["knn_temp"], lam) for lam in lams]
             for sim in ("faiss", "l2") if sim in chosen
             for split, sw in (("valid", sv), ("test", st)) if sim in sw}, base)

    # ------------------------------------------------------------- vs T
    if sv and chosen:
        temps = sv[next(iter(sv))]["temps"]
        rows = []
        for t in temps:
            r = [f"{t:g}"]
            for sim in ("faiss", "l2"):
                c = chosen.get(sim)
                if not c:
                    r += ["–"] * 3
                    continue
                _, lam = best_on(sv[sim], k=c["k"], t=t)
                r += [f"{f2(cell(sv[sim], c['k'], t, c['lmbda']))} / {f2(cell(st.get(sim), c['k'], t, c['lmbda']))}",
                      f"{lam:g}",
                      f"{f2(cell(sv[sim], c['k'], t, lam))} / {f2(cell(st.get(sim), c['k'], t, lam))}"]
            rows.append(r)
        md.append("## Perplexity vs temperature\n")
        md.append(f"k = {K}; cells are valid / test, at the valid-chosen λ of each distance "
                  "(faiss λ {}, l2 λ {}) and with λ re-chosen on valid for each T.\n".format(
                      chosen.get("faiss", {}).get("lmbda", "–"), chosen.get("l2", {}).get("lmbda", "–")))
        md.append(table(["T", "faiss, chosen λ", "faiss: best λ on valid", "faiss, that λ",
                         "l2, chosen λ", "l2: best λ on valid", "l2, that λ"], rows) + "\n")
        plots["temp"] = plot_lines(
            report_dir / "ppl_vs_temperature.png", "kNN-LM perplexity vs temperature (λ chosen on valid per T)",
            "temperature T", temps,
            {f"{split} {sim}": [cell(sw[sim], chosen[sim]["k"], t, best_on(sv[sim], k=chosen[sim]["k"], t=t)[1])
                                for t in temps]
             for sim in ("faiss", "l2") if sim in chosen
             for split, sw in (("valid", sv), ("test", st)) if sim in sw}, base, logx=True)

    # ------------------------------------------------------ datastore size
    sizes = results.get("dstore_size", {})
    if sizes and "faiss" in chosen and d:
        c = chosen["faiss"]
        entries = sorted(sizes.values(), key=lambda e: e["fraction"])
        entries.append(dict(fraction=1.0, size=d["size"], run=dict(ppl=cell(sv["faiss"], c["k"], c["knn_temp"], c["lmbda"])),
                            chosen=c, index=results.get("index", {}).get("ivfpq", {}), full=True))
        rows = []
        for e in entries:
            idx = e.get("index", {})
            rows.append([f"{e['fraction'] * 100:g}%", f"{e['size']:,}", idx.get("factory", "–"),
                         f"{(idx.get('train_seconds') or 0) + (idx.get('add_seconds') or 0):.0f}",
                         f2(e["run"]["ppl"]), f"T {e['chosen']['knn_temp']:g}, λ {e['chosen']['lmbda']:g}",
                         f2(e["chosen"]["ppl"])])
        md.append("## Perplexity vs datastore size (valid, faiss distances)\n")
        md.append("A datastore of the first X% of train is the first X% of the full store's entries (keys are in "
                  "corpus order, so these are exactly the keys a datastore pass over that prefix of train writes), "
                  "copied to its own directory with its own IVF-PQ index (same factory, trained on its own keys). "
                  f"Base LM valid perplexity {f2(base.get('valid', {}).get('ppl'))}.\n")
        md.append(table(["train used", "keys", "index", "index train + add s", f"valid, k {c['k']} T {c['knn_temp']:g} "
                         f"λ {c['lmbda']:g} (chosen on 100%)", "best T, λ for this size (valid)", "valid at those"],
                        rows) + "\n")
        plots["size"] = plot_lines(
            report_dir / "ppl_vs_dstore_size.png", "kNN-LM valid perplexity vs datastore size",
            "datastore keys (prefix of train)", [e["size"] for e in entries],
            {"fixed T, λ (chosen on 100%)": [e["run"]["ppl"] for e in entries],
             "T, λ re-chosen per size": [e["chosen"]["ppl"] for e in entries]},
            {"valid": base.get("valid", {})}, logx=True)

    # ----------------------------------------------------------- subset
    sub = results.get("subset", {})
    if sub.get("baseline"):
        rows = [["base LM", "–", "–", f2(sub["baseline"]["ppl"]), "–", "–"]]
        names = {"ivfpq-faiss": ("IVF-PQ", "faiss (approximate)"), "ivfpq-l2": ("IVF-PQ", "l2 (exact)"),
                 "flat": ("Flat (exact neighbours)", "exact")}
        for name, (index, dist) in names.items():
            if name not in sub:
                continue
            r = sub[name]["run"]
            sw = sub[name]["sweep"]
            t, lam = best_on(sw, k=K)
            rows.append(["kNN-LM", index, dist, f"{f2(r['ppl'])} (T {r['knn_temp']:g}, λ {r['lmbda']:g})",
                         f2(cell(sw, K, 1.0, 0.25)), f"{f2(cell(sw, K, t, lam))} (T {t:g}, λ {lam:g})"])
        n_tok = sub["baseline"].get("tokens", "?")
        md.append("## Exact vs approximate search (first {} tokens of valid)\n".format(n_tok))
        md.append(f"Exact (Flat) search costs a full scan of the store per token, so it is run on the first "
                  f"{n_tok} tokens of valid only (binarized with the model's dictionary and evaluated on their "
                  f"own, so their base LM perplexity differs from the whole-split number). k = {K}; all three use "
                  "the T and λ chosen on the whole of valid with faiss distances; the last column is each "
                  "one's best setting on the subset itself (an oracle, for comparing the three only).\n")
        md.append(table(["", "index", "distances", "ppl at valid-chosen T, λ", "ppl at T 1, λ 0.25",
                         "best on the subset (T, λ)"], rows) + "\n")
    idx = results.get("index", {})
    if idx:
        rows = []
        for name, meta in idx.items():
            rec = meta.get("recall") or {}
            rows.append([meta.get("factory"), f"{meta.get('ntotal'):,}", f"{meta.get('train_size'):,}",
                         f"{meta.get('train_seconds') or 0:.0f}", f"{meta.get('add_seconds') or 0:.0f}",
                         f"{meta.get('bytes', 0) / 2**20:.0f}",
                         " / ".join(f"{rec[k]:.3f}" for k in ("recall@1", "recall@10", "recall@100") if k in rec)
                         or "exact"])
        md.append("## Indexes\n")
        md.append(table(["factory", "keys", "training keys", "train s", "add s", "MiB",
                         f"recall@1 / @10 / @100 (nprobe {cfg.get('probe')})"], rows) + "\n")

    # --------------------------------------------------------- wall time
    stages = results.get("stages", {})
    rows = []
    for name, what in STAGE_ROWS:
        if name == "whole-test" and name not in stages:
            continue  # optional (--whole-test)
        if name in stages and stages[name].get("seconds") is None:
            rows.append([name, what, "outputs found complete (made separately, not timed)", "–"])
        elif name in stages:
            rows.append([name, what, f"{stages[name]['seconds']:.0f}", f"{stages[name]['seconds'] / 60:.1f}"])
        else:
            rows.append([name, what, "not run", "–"])
    md.append("## Wall time of every stage (2 CPU cores)\n")
    md.append(table(["stage", "what", "seconds", "minutes"], rows) + "\n")
    speeds = []
    for label, r in [("base LM valid (whole split)", whole.get("valid")), ("base LM test (whole split)", whole.get("test")),
                     ("datastore pass (train)", results.get("dstore"))] + \
            [(f"kNN-LM {split} {sim}", results.get(f"knn_{split}", {}).get(sim))
             for split in ("valid", "test") for sim in ("faiss", "l2")] + \
            [("kNN-LM whole test split, faiss", results.get("whole_test"))]:
        if r and "tokens_per_s" in r:
            speeds.append([label, f"{r['tokens']:,}", f"{r['eval_seconds']:.0f}", f"{r['tokens_per_s']:.0f}"])
    if speeds:
        md.append(table(["fairseq-eval-lm run", "tokens", "seconds", "tokens/s"], speeds) + "\n")
    written = [p for p in plots.values() if p]
    if written:
        md.append("Plots: " + ", ".join(f"[{p.name}]({p.name})" for p in written) + "\n")

    out = report_dir / "results.md"
    out.write_text("\n".join(md))
    (report_dir / "results.json").write_text(json.dumps(results, indent=1, default=float))
    return [out, report_dir / "results.json"] + written


def plot_lines(path, title, xlabel, xs, series, base, logx=False):
    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    palette = {"faiss": "tab:blue", "l2": "tab:green"}
    for label, ys in series.items():
        ys = [np.nan if y is None else y for y in ys]
        words = label.split()
        style = "--" if words[0] == "test" else "-"
        color = next((c for name, c in palette.items() if name in words), None)
        ax.plot(xs, ys, style, marker="o", markersize=4, label=label, color=color)
    for split, stat in base.items():
        if stat and "ppl" in stat:
            ax.axhline(stat["ppl"], color="gray", linestyle=":" if split == "test" else "-.", linewidth=1,
                       label=f"base LM {split}")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("perplexity")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    work = Path(sys.argv[1])
    dest = Path(sys.argv[2]) if len(sys.argv) > 2 else work / "report"
    results = json.loads((work / "results.json").read_text())
    paths = write_report(results, work, dest)
    print(headline(results, work / "results.json", paths))
