"""Which options of the task combine, and which values they take: every rule once, as data.

:data:`RULES` is checked by :func:`check_flags` and rendered by
:func:`combination_table` into README.md's "Which options combine" table, so
the refusals and the documentation cannot drift apart.  A rule may read a fact
of the run rather than an option (the sharding and context window eval-lm
asks for, generation rather than eval-lm, the datastore's size); it is checked
once that fact is known, so the task can re-check just those rules when it
learns one.
"""

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from ..errors import UserError
from .keys import KEYTYPES


class FlagError(UserError):
    pass


@dataclass(frozen=True)
class Run:
    """Facts of the run the options are checked against; None: not known yet."""

    num_shards: Optional[int] = None
    context_window: Optional[int] = None
    purpose: Optional[str] = None  # "eval" or "generate"
    dstore_size: Optional[int] = None


@dataclass(frozen=True)
class Use:
    """An option in use (or a fact of the run), named as the table shows it."""

    name: str
    on: Callable[[Any, Run], bool]
    fact: Optional[str] = None  # the Run field it reads
    flag: Optional[str] = None  # the table row it belongs to, if not ``name``

    @property
    def row(self) -> str:
        return self.flag or self.name


@dataclass(frozen=True)
class Combination:
    """``option`` needs ``other`` in use, or excludes it."""

    option: Use
    relation: str  # "needs" or "excludes"
    other: Use
    message: str

    @property
    def facts(self) -> set:
        return {u.fact for u in (self.option, self.other) if u.fact}

    def refused(self, cfg, run: Run) -> bool:
        if not self.option.on(cfg, run):
            return False
        return self.other.on(cfg, run) == (self.relation == "excludes")


@dataclass(frozen=True)
class Bound:
    """The values ``flag`` (config field ``field``) takes when given and ``when`` is in use."""

    flag: str
    field: str
    ok: Callable[[Any, Any, Run], bool]  # (value, cfg, run)
    text: str
    message: str
    when: Optional[Use] = None
    fact: Optional[str] = None

    @property
    def facts(self) -> set:
        return {f for f in (self.fact, self.when and self.when.fact) if f}

    def refused(self, cfg, run: Run) -> bool:
        value = getattr(cfg, self.field)
        if value is None or (self.when is not None and not self.when.on(cfg, run)):
            return False
        return not self.ok(value, cfg, run)


def _given(field: str) -> Callable[[Any, Run], bool]:
    return lambda cfg, run: getattr(cfg, field) not in (None, False, "", 0)


def _at_least(low):
    return lambda value, cfg, run: value >= low


def _unit_interval(value, cfg, run) -> bool:
    return 0.0 <= value <= 1.0  # also refuses NaN


KNNLM = Use("--knnlm", _given("knnlm"))
SAVE_DSTORE = Use("--save-knnlm-dstore", _given("save_knnlm_dstore"))
DSTORE = Use("--dstore DIR", _given("dstore"))
PREDICTOR = Use("--knn-retrieval-predictor", _given("knn_retrieval_predictor"))
FRACTION = Use("--knn-retrieval-fraction", lambda cfg, run: cfg.knn_retrieval_fraction is not None)
THRESHOLD = Use("--knn-retrieval-threshold", lambda cfg, run: cfg.knn_retrieval_threshold is not None)
FRACTION_OR_THRESHOLD = Use("--knn-retrieval-fraction or --knn-retrieval-threshold",
                            lambda cfg, run: FRACTION.on(cfg, run) or THRESHOLD.on(cfg, run))
SAVE_NEIGHBORS = Use("--knn-save-neighbors", _given("knn_save_neighbors"))
DISTRIBUTED = Use("--knn-distributed-index", _given("knn_distributed_index"))
POINTERS = Use("--knn-pointers", _given("knn_pointers"))
CACHE = Use("--knn-cache-size", lambda cfg, run: int(cfg.knn_cache_size or 0) > 0)  # 0: no cache
OVERLAP = Use("--knn-overlap", _given("knn_overlap"))
RERANK = Use("--knn-candidates N > --k",
             lambda cfg, run: KNNLM.on(cfg, run) and cfg.knn_candidates is not None and cfg.knn_candidates > cfg.k,
             flag="--knn-candidates")
EXACT = Use("--knn-sim-func l2 or ip", lambda cfg, run: str(cfg.knn_sim_func) in ("l2", "ip"))
SHARDED = Use("--num-shards > 1 or distributed evaluation", lambda cfg, run: run.num_shards > 1, "num_shards")
CONTEXT = Use("--context-window N > 0 (fairseq-eval-lm)", lambda cfg, run: run.context_window > 0,
              "context_window")
GENERATE = Use("generation (fairseq-generate, fairseq-interactive, hub sample/score)",
               lambda cfg, run: run.purpose == "generate", "purpose")

ONE_OF_FRACTION_THRESHOLD = (
    "with --knn-retrieval-predictor give one of --knn-retrieval-fraction F or --knn-retrieval-threshold S")
NEED_PREDICTOR = "--knn-retrieval-fraction/--knn-retrieval-threshold need --knn-retrieval-predictor FILE"
NEED_DSTORE = "--dstore DIR is required with --save-knnlm-dstore and --knnlm"

# In the order they are checked: the first refused rule's message is the error.
RULES = (
    # Adaptive retrieval
    Combination(FRACTION, "needs", PREDICTOR, NEED_PREDICTOR),
    Combination(THRESHOLD, "needs", PREDICTOR, NEED_PREDICTOR),
    Combination(PREDICTOR, "needs", KNNLM, "--knn-retrieval-predictor decides kNN searches; it needs --knnlm"),
    Combination(PREDICTOR, "excludes", SAVE_NEIGHBORS,
                "--knn-save-neighbors saves every token's neighbours; run it without --knn-retrieval-predictor"),
    Combination(PREDICTOR, "needs", FRACTION_OR_THRESHOLD, ONE_OF_FRACTION_THRESHOLD),
    Combination(FRACTION, "excludes", THRESHOLD, ONE_OF_FRACTION_THRESHOLD),
    Bound("--knn-retrieval-fraction", "knn_retrieval_fraction", _unit_interval, "in [0, 1]",
          "--knn-retrieval-fraction must lie in [0, 1], got {value:g}"),
    # Distributed search
    Combination(DISTRIBUTED, "needs", KNNLM, "--knn-distributed-index spreads the kNN-LM's index over the "
                "ranks: it needs --knnlm (drop it otherwise)"),
    Combination(DISTRIBUTED, "excludes", POINTERS,
                "--knn-pointers reads entries of the whole index in every process; drop --knn-distributed-index "
                "(--knn-index IDX/ searches all pieces in one process) or --knn-pointers"),
    # Pointers
    Combination(POINTERS, "needs", KNNLM, "--knn-pointers decides kNN searches; it needs --knnlm"),
    Bound("--knn-pointer-min-candidates", "knn_pointer_min_candidates", _at_least(1), "≥ 1",
          "--knn-pointer-min-candidates must be at least 1, got {value}", when=POINTERS),
    # Continuous cache
    Bound("--knn-cache-size", "knn_cache_size", _at_least(0), "≥ 0 (0: no cache)",
          "--knn-cache-size must be 0 (no cache) or a number of tokens, got {value}"),
    Bound("--knn-cache-lmbda", "knn_cache_lmbda", _unit_interval, "in [0, 1]",
          "--knn-cache-lmbda must lie in [0, 1], got {value}"),
    Bound("--knn-cache-theta", "knn_cache_theta", lambda value, cfg, run: value >= 0 and math.isfinite(value),
          "finite, ≥ 0", "--knn-cache-theta must be a finite number >= 0 (0: every entry weighs the same), "
          "got {value}"),
    Combination(CACHE, "excludes", SAVE_DSTORE,
                "the datastore pass scores nothing with a cache: drop --knn-cache-size from --save-knnlm-dstore"),
    Combination(CACHE, "excludes", SHARDED,
                "--knn-cache-size holds the preceding tokens of one stream, which --num-shards / distributed "
                "evaluation splits into pieces; evaluate with one process"),
    Combination(SAVE_NEIGHBORS, "needs", KNNLM,
                "--knn-save-neighbors saves a kNN-LM's neighbours: add --knnlm --dstore DIR (with "
                "--knn-cache-size the file then also carries the keys the cache needs)"),
    Combination(CACHE, "needs", CONTEXT,
                "--knn-cache-size needs fairseq-eval-lm's --context-window N (N > 0): without it eval-lm "
                "orders the blocks by length, so the cache would not see the text in corpus order"),
    Combination(CACHE, "excludes", GENERATE,
                "--knn-cache-size is for fairseq-eval-lm (the cache holds the evaluated text's own previous "
                "tokens); drop it for generation"),
    # The two passes
    Combination(SAVE_DSTORE, "excludes", KNNLM, "--save-knnlm-dstore and --knnlm are separate passes; give one"),
    Combination(SAVE_DSTORE, "needs", DSTORE, NEED_DSTORE),
    Combination(KNNLM, "needs", DSTORE, NEED_DSTORE),
    Bound("--knn-keytype", "knn_keytype", lambda value, cfg, run: str(value) in KEYTYPES, " or ".join(KEYTYPES),
          "unknown --knn-keytype {value!r}; choose one of " + ", ".join(KEYTYPES)),
    # Search
    Combination(OVERLAP, "excludes", SAVE_DSTORE,
                "--knn-overlap overlaps kNN searches; the datastore pass makes none: drop it"),
    Combination(OVERLAP, "excludes", GENERATE,
                "--knn-overlap is for fairseq-eval-lm (generation searches step by step); drop it"),
    Bound("--knn-faiss-threads", "knn_faiss_threads", _at_least(1), "≥ 1",
          "--knn-faiss-threads must be at least 1, got {value}"),
    Bound("--knn-torch-threads", "knn_torch_threads", _at_least(1), "≥ 1",
          "--knn-torch-threads must be at least 1, got {value}"),
    Bound("--lmbda", "lmbda", _unit_interval, "in [0, 1]", "--lmbda must lie in [0, 1], got {value}", when=KNNLM),
    Bound("--k", "k", _at_least(1), "≥ 1", "--k must be at least 1, got {value}", when=KNNLM),
    Bound("--k", "k", lambda value, cfg, run: value <= run.dstore_size, "≤ the datastore's entries",
          "--k {value} exceeds the datastore's {dstore_size} entries; lower --k", when=KNNLM, fact="dstore_size"),
    Bound("--knn-temp", "knn_temp", lambda value, cfg, run: value > 0, "> 0",
          "--knn-temp must be positive, got {value}", when=KNNLM),
    Bound("--probe", "probe", _at_least(1), "≥ 1",
          "--probe must be at least 1, got {value}", when=KNNLM),
    Bound("--knn-candidates", "knn_candidates", lambda value, cfg, run: value >= cfg.k, "≥ --k",
          "--knn-candidates {value} is below --k {k}; give at least k", when=KNNLM),
    Combination(RERANK, "needs", EXACT,
                "--knn-candidates {knn_candidates} re-ranks by exact distances: add --knn-sim-func l2 "
                "(or ip for inner-product indexes), or drop --knn-candidates"),
    Bound("--knn-candidates", "knn_candidates", lambda value, cfg, run: value <= run.dstore_size,
          "≤ the datastore's entries", "--knn-candidates {value} exceeds the datastore's {dstore_size} entries; "
          "lower it", when=KNNLM, fact="dstore_size"),
)


class _Fields(dict):
    """What a rule's message may name: ``value``, a Run fact or any option."""

    def __init__(self, cfg, run: Run, value):
        super().__init__(vars(run), value=value)
        self.cfg = cfg

    def __missing__(self, key):
        return getattr(self.cfg, key)


def check_flags(cfg, *, num_shards: Optional[int] = None, context_window: Optional[int] = None,
                purpose: Optional[str] = None, dstore_size: Optional[int] = None,
                recheck: Iterable[str] = ()) -> None:
    """Raise FlagError with the first refused rule's one-line message.

    ``cfg`` is the task's config (or a Namespace with its fields).  Rules that
    read a fact of the run not given here are left for later; ``recheck``
    names facts just learnt, so that only the rules reading them are checked.
    """
    run = Run(num_shards, context_window, purpose, dstore_size)
    known = {name for name, value in vars(run).items() if value is not None}
    recheck = set(recheck)
    for rule in RULES:
        if not rule.facts <= known or (recheck and not rule.facts & recheck):
            continue
        if rule.refused(cfg, run):
            value = getattr(cfg, rule.field) if isinstance(rule, Bound) else None
            raise FlagError(rule.message.format_map(_Fields(cfg, run, value)))


def check_against_datastore(cfg, dstore_size: int) -> None:
    """The rules that need the datastore's size, once it is open."""
    check_flags(cfg, dstore_size=int(dstore_size), recheck=("dstore_size",))


def check_value(flag: str, value) -> None:
    """``value`` checked against ``flag``'s unconditional bounds, for tools that take the
    same values under the same option name (the sweep's cache grid)."""
    for rule in RULES:
        if isinstance(rule, Bound) and rule.flag == flag and rule.when is None and not rule.facts:
            if not rule.ok(value, None, Run()):
                raise FlagError(rule.message.format(value=value))


# ------------------------------------------------------------------ the table
def _code(text: str) -> str:
    """Markdown with every option (and its metavar) as code."""
    return re.sub(r"--[a-z][a-z0-9-]*(?: [A-Z]+\b)?", lambda m: f"`{m.group(0)}`", text)


def combination_table() -> str:
    """README.md's "Which options combine": a row per option, its rules in check order
    (a pair that does not combine is listed once, under the option the rule is about)."""
    rows = {}
    for rule in RULES:
        if isinstance(rule, Combination):
            row = rows.setdefault(rule.option.row, ([], [], []))
            row[0 if rule.relation == "needs" else 1].append(rule.other.name)
            if rule.option.name != rule.option.row:
                row[0 if rule.relation == "needs" else 1][-1] += f" (when {rule.option.name})"
        else:
            row = rows.setdefault(rule.flag, ([], [], []))
            row[2].append(rule.text + (f" (with {rule.when.name})" if rule.when is not None else ""))
    lines = ["| Option | Needs | Does not combine with | Values |", "|---|---|---|---|"]
    for name, cells in rows.items():
        lines.append("| " + " | ".join([name] + ["; ".join(dict.fromkeys(c)) for c in cells]) + " |")
    return _code("\n".join(lines)) + "\n"
