"""Offline kNN-LM tuning on saved neighbours: pure functions on arrays.

The expensive part of a kNN-LM evaluation is the model and the search; both
are done once by ``fairseq-eval-lm --knnlm --knn-save-neighbors``.  Here the
kNN probability of every target is computed once per (k, temperature) in row
chunks, after which every λ costs one vectorised interpolation, and
perplexities are summed the way fairseq-eval-lm sums them.

One module per concept: :mod:`.grid` (grid values), :mod:`.knn_table`
(p_kNN per (k, T) and the retrieval's confidence signals), :mod:`.perplexity`
(eval-lm's arithmetic and the λ sweep), :mod:`.analysis` (frequency buckets,
biggest changes), :mod:`.adaptive_lambda` (λ per signal bucket) and
:mod:`.adaptive_retrieval` (perplexity against the fraction of tokens searched)
and :mod:`.cache` (the continuous cache from the saved keys, with the kNN-LM).
Everything is re-exported here.
"""

from .adaptive_lambda import AdaptiveReport, BucketedLambda, adaptive_comparison, fit_bucketed_lambda
from .adaptive_retrieval import (
    RetrievalCurve,
    RetrievalReport,
    adaptive_retrieval,
    check_features,
    retrieval_curve,
)
from .analysis import (
    BucketRow,
    biggest_changes,
    default_frequency_edges,
    frequency_buckets,
    token_counts,
    type_changes,
)
from .cache import CacheSweep, CacheTable, cache_sweep, cache_table, check_cache_inputs
from .grid import SweepError, check_grid, parse_grid
from .knn_table import (
    SIGNAL_HELP,
    SIGNALS,
    KnnTable,
    default_chunk_rows,
    knn_table,
    knn_target_log_probs_fast,
    value_groups,
)
from .perplexity import (
    PplStat,
    SweepResult,
    eval_lm_perplexity,
    interpolated,
    mean_perplexity,
    segment_starts,
    sweep,
)
from .threads import default_threads, single_torch_thread
