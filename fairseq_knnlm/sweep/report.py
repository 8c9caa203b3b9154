"""fairseq-knnlm-sweep's printed report: the λ × temperature tables, the best setting,
and the analyses; each printer also returns its part of the JSON report."""

import numpy as np

from .. import sweep as sw


def fmt_ppl(x: float) -> str:
    if not np.isfinite(x):
        return "inf" if x > 0 else "nan"
    return f"{x:.4f}" if x < 1e4 else f"{x:.4g}"


def print_table(res: sw.SweepResult, best, out) -> None:
    marked = False
    for ki, k in enumerate(res.ks):
        print(f"\nk = {k}: perplexity (rows λ, columns temperature; * best, † tokens skipped)", file=out)
        header = "   λ    " + "".join(f"{'T=' + format(t, 'g'):>14s}" for t in res.temps)
        print(header, file=out)
        for li, lam in enumerate(res.lambdas):
            cells = []
            for ti in range(len(res.temps)):
                cell = fmt_ppl(res.ppl[ki, ti, li])
                mark = ""
                if (ki, ti, li) == best:
                    mark = "*"
                if res.skipped[ki, ti, li] > 0:
                    mark += "†"
                    marked = True
                cells.append(f"{cell + mark:>14s}")
            print(f"  {lam:<6g}" + "".join(cells), file=out)
    if marked:
        print("† some tokens get probability 0 and are skipped, as fairseq-eval-lm skips them; "
              "such perplexities cover fewer tokens and are never chosen as best", file=out)


def words(dictionary, ids) -> list:
    if dictionary is None:
        return [f"#{int(i)}" for i in ids]
    return [dictionary[int(i)] if 0 <= int(i) < len(dictionary) else f"#{int(i)}" for i in ids]



def print_adaptive(rep: sw.AdaptiveReport, fit, nb, out) -> dict:
    fs, es = fit.meta.get("split", "fit"), nb.meta.get("split", "eval")
    print(f"\nadaptive λ: fitted on {fit.path} ({fs}, {fit.n:,} tokens), evaluated on {es}", file=out)
    f = rep.fixed
    print(f"  {'setting':<44s} {fs + ' ppl':>12s} {es + ' ppl':>12s}", file=out)
    fixed_name = f"fixed λ {f['lmbda']:g} (k {f['k']}, T {f['knn_temp']:g}; chosen on {fs})"
    print(f"  {fixed_name:<44s} {fmt_ppl(rep.fixed_fit.ppl):>12s} {fmt_ppl(rep.fixed_eval.ppl):>12s}", file=out)
    rows = []
    for i, (model, fit_stat, eval_stat) in enumerate(rep.per_signal):
        name = f"{model.signal} ({len(model.lambdas)} buckets, k {model.k}, T {model.temp:g})"
        mark = "  <- chosen on " + fs if i == rep.chosen else ""
        print(f"  {name:<44s} {fmt_ppl(fit_stat.ppl):>12s} {fmt_ppl(eval_stat.ppl):>12s}{mark}", file=out)
        rows.append(dict(signal=model.signal, k=model.k, knn_temp=model.temp, edges=model.edges.tolist(),
                         lambdas=model.lambdas.tolist(), fit_ppl=fit_stat.ppl, eval_ppl=eval_stat.ppl,
                         eval_skipped=eval_stat.skipped))
    o = rep.oracle
    print(f"  (oracle: best fixed setting chosen on {es} itself: {fmt_ppl(o['ppl'])}; not a fair comparison)",
          file=out)
    model, _, chosen_eval = rep.per_signal[rep.chosen]
    rel = 100.0 * (chosen_eval.ppl / rep.fixed_eval.ppl - 1)
    verdict = "beats" if rep.beats_fixed else "does not beat"
    print(f"  adaptive λ on {model.signal} {verdict} the best fixed λ on held-out {es}: "
          f"{fmt_ppl(chosen_eval.ppl)} vs {fmt_ppl(rep.fixed_eval.ppl)} ({rel:+.2f}%)", file=out)
    print(f"  buckets of {model.signal}: edges {np.array2string(model.edges, precision=4, separator=', ')}, "
          f"λ {np.array2string(model.lambdas, precision=3, separator=', ')}", file=out)
    return dict(fixed=f, fixed_fit_ppl=rep.fixed_fit.ppl, fixed_eval_ppl=rep.fixed_eval.ppl,
                oracle=o, signals=rows, chosen=rows[rep.chosen]["signal"], beats_fixed=rep.beats_fixed)



def print_best(res: sw.SweepResult, best, out) -> dict:
    """The base LM and the best setting, as the flags that reproduce it."""
    b = res.setting(best)
    change = 100.0 * (b["ppl"] / res.base.ppl - 1)
    print(f"\nbase LM (λ = 0): perplexity {fmt_ppl(res.base.ppl)}, loss {res.base.loss:.4f} "
          f"over {res.base.count:,} tokens", file=out)
    skipped = f"; {b['skipped']:,} tokens skipped (probability 0)" if b["skipped"] else ""
    print(f"best: --k {b['k']} --knn-temp {b['knn_temp']:g} --lmbda {b['lmbda']:g}: "
          f"perplexity {fmt_ppl(b['ppl'])} ({change:+.2f}%), loss {b['loss']:.4f}{skipped}", file=out)
    return b


def print_frequency(rows, source: str, total: int, out) -> list:
    print(f"\nby target frequency ({source}); perplexity = exp(mean NLL) per bucket", file=out)
    print(f"  {'frequency':>14s} {'tokens':>9s} {'share':>7s} {'base LM':>11s} {'kNN-LM':>11s} {'change':>8s}",
          file=out)
    for r in rows:
        share = 100.0 * r.tokens / total
        if not r.tokens:
            print(f"  {r.label:>14s} {0:>9,d} {share:>6.1f}% {'-':>11s} {'-':>11s} {'-':>8s}", file=out)
            continue
        rel = 100.0 * (r.knn_ppl / r.base_ppl - 1)
        skip = f"  ({r.knn_skipped} skipped)" if r.knn_skipped else ""
        print(f"  {r.label:>14s} {r.tokens:>9,d} {share:>6.1f}% {fmt_ppl(r.base_ppl):>11s} "
              f"{fmt_ppl(r.knn_ppl):>11s} {rel:>+7.2f}%{skip}", file=out)
    return [vars(r) for r in rows]


def print_top(targets, lm, knn, final, top: int, context: int, dictionary, out) -> dict:
    """The tokens and token types where kNN helps and hurts most."""
    report = {"top_tokens": {}, "top_types": {}}
    helps, hurts = sw.biggest_changes(lm, final, top)
    for title, idx in (("helps", helps), ("hurts", hurts)):
        print(f"\ntokens where kNN {title} most (log-probs in nats; context = preceding tokens)", file=out)
        entries = []
        for i in idx:
            ctx = words(dictionary, targets[max(0, i - context) : i])
            tgt = words(dictionary, [targets[i]])[0]
            print(f"  #{i:<8d} {tgt!s:>14s}  LM {lm[i]:8.3f}  kNN {knn[i]:8.3f}  final {final[i]:8.3f}  "
                  f"Δ {final[i] - lm[i]:+7.3f}  | {' '.join(ctx)} [{tgt}]", file=out)
            entries.append(dict(position=int(i), target=tgt, lm=float(lm[i]), knn=float(knn[i]),
                                final=float(final[i]), context=ctx))
        report["top_tokens"][title] = entries
    type_helps, type_hurts = sw.type_changes(targets, lm, final, top)
    for title, rows in (("helps", type_helps), ("hurts", type_hurts)):
        print(f"\ntoken types where kNN {title} most in total (summed Δ log-prob, nats)", file=out)
        for tok, occ, total in rows:
            print(f"  {words(dictionary, [tok])[0]!s:>14s}  {occ:>7,d} x  Σ Δ {total:+10.2f}  "
                  f"mean {total / occ:+.3f}", file=out)
        report["top_types"][title] = [dict(token=words(dictionary, [t])[0], occurrences=o, total=s)
                                      for t, o, s in rows]
    return report


def print_retrieval(rep: sw.RetrievalReport, out) -> dict:
    """Perplexity against the fraction of tokens searched, on the fit split and held out."""
    s = rep.setting
    print(f"\nadaptive retrieval: predictor fit on {rep.fit.split} ({rep.predictor.meta.get('fit_tokens'):,} "
          f"tokens) at --k {s['k']} --knn-temp {s['knn_temp']:g} --lmbda {s['lmbda']:g}; skipped tokens "
          "keep the LM's log-probability", file=out)
    report = dict(setting=s, feature_names=rep.predictor.feature_names)
    for curve in (rep.fit, rep.held_out):
        if curve is None:
            continue
        note = " (thresholds from " + rep.fit.split + ")" if curve is rep.held_out else ""
        print(f"  {curve.split}{note}: base LM {fmt_ppl(curve.base.ppl)}, every token searched "
              f"{fmt_ppl(curve.full.ppl)}", file=out)
        print(f"  {'fraction':>8s} {'searched':>9s} {'perplexity':>11s} {'vs full':>8s} {'random':>11s} "
              f"{'oracle':>11s}", file=out)
        for row in curve.rows():
            rel = 100.0 * (row["ppl"] / curve.full.ppl - 1)
            print(f"  {row['fraction']:>8g} {row['searched']:>9.4f} {fmt_ppl(row['ppl']):>11s} {rel:>+7.2f}% "
                  f"{fmt_ppl(row['random_ppl']):>11s} {fmt_ppl(row['oracle_ppl']):>11s}", file=out)
        report["held_out" if curve is rep.held_out else "fit"] = dict(
            split=curve.split, base_ppl=curve.base.ppl, full_ppl=curve.full.ppl, rows=curve.rows())
    print("  (random: as many tokens chosen at random; oracle: the tokens retrieval helps most, "
          "which needs the target; neither is available at test time)", file=out)
    return report


def print_cache(res: sw.CacheSweep, out, seconds: float = 0.0) -> dict:
    """Base LM, + cache, + kNN and + kNN + cache, each at its best setting of the grid."""
    from .cache import ROW_NAMES, flags

    print(f"\ncontinuous cache at k = {res.k}, T = {res.knn_temp:g}: p = (1 - λc) · p_kNN-LM + λc · p_cache "
          f"(sizes {', '.join(map(str, res.sizes))}; θ {', '.join(f'{t:g}' for t in res.thetas)}; "
          f"{len(res.lambdas)} λ x {len(res.cache_lambdas)} λc)", file=out)
    rows = res.rows()
    base = rows["base"]["ppl"]
    print(f"  {'model':<14s} {'perplexity':>11s} {'change':>8s}  flags", file=out)
    for name, row in rows.items():
        change = f"{100.0 * (row['ppl'] / base - 1):+7.2f}%" if name != "base" else ""
        skipped = f"  ({row['skipped']:,} tokens skipped)" if row["skipped"] else ""
        print(f"  {ROW_NAMES[name]:<14s} {fmt_ppl(row['ppl']):>11s} {change:>8s}  {flags(row)}{skipped}", file=out)
    print("  best per cache size (λ, θ, λc chosen on this file):", file=out)
    per_size = []
    for si, size in enumerate(res.sizes):
        alone, both = res.setting(res.best(knn=False, size_index=si)), res.setting(res.best(size_index=si))
        per_size.append(dict(size=size, cache=alone, both=both))
        print(f"    --knn-cache-size {size:<7d} + cache {fmt_ppl(alone['ppl']):>11s} (θ {alone['cache_theta'] or 0:g}, "
              f"λc {alone['cache_lmbda']:g})   + kNN + cache {fmt_ppl(both['ppl']):>11s} (λ {both['lmbda']:g}, "
              f"θ {both['cache_theta'] or 0:g}, λc {both['cache_lmbda']:g})", file=out)
    if seconds:
        print(f"  (cache probabilities and {res.ppl.size:,} settings in {seconds:.1f}s)", file=out)
    return dict(k=res.k, knn_temp=res.knn_temp, sizes=res.sizes, thetas=res.thetas, lambdas=res.lambdas,
                cache_lambdas=res.cache_lambdas, perplexity=res.ppl.tolist(), loss=res.loss.tolist(),
                skipped=res.skipped.tolist(), base=vars(res.base), rows=rows, per_size=per_size)
