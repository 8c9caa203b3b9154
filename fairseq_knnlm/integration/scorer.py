"""KNNSequenceScorer: fairseq's SequenceScorer for kNN-LM, used by the stock fairseq-eval-lm.

Per batch it runs the model once, takes the hidden states at the scored
positions (targets after the context window, not padding) and then either
streams them to the datastore (``--save-knnlm-dstore``) or hands them to the
kNN-LM pipeline (``--knnlm``, the continuous cache: :mod:`fairseq_knnlm.scoring.pipeline`).
LM probabilities are only
computed at scored positions, which is what makes both passes cheaper than a
plain evaluation that normalises over the context window too.
"""

import logging
import sys

from typing import NamedTuple

import numpy as np
import torch
from fairseq import utils as fairseq_utils

from ..retrieval import adaptive
from ..retrieval.base import Batch
from ..scoring.cache import make_cache
from ..scoring.pipeline import KNNPipeline, NeighboursSaver, PipelineStats
from ..storage.datastore import DatastoreWriter
from ..errors import UserError
from .keys import KeyCapture

logger = logging.getLogger(__name__)


def scored_mask(sample, pad: int) -> torch.Tensor:
    """(bsz, tsz) bool: the positions fairseq-eval-lm counts (after start index, not pad)."""
    target = sample["target"]
    starts = sample.get("start_indices")
    mask = target.ne(pad)
    if starts is not None:
        cols = torch.arange(target.size(1), device=target.device)
        start_t = torch.as_tensor(list(starts), device=target.device)
        mask &= cols.unsqueeze(0) >= start_t.unsqueeze(1)
    return mask


def lm_target_log_probs(model, features, extra, targets, chunk: int, lm_features_out=None) -> torch.Tensor:
    """log p_LM(target) for rows of ``features`` (n, dim), in chunks of ``chunk`` rows.

    ``lm_features_out``: a list that receives each chunk's adaptive-retrieval
    features of the LM's distribution (:func:`adaptive.lm_features`).
    """
    # Given the targets, an adaptive softmax computes only the tail clusters they fall in
    # and leaves the other tails' log-probabilities at 0, so the features (entropy, top
    # log-probs) need the whole distribution, computed as generation computes it.
    partial = getattr(model.decoder, "adaptive_softmax", None) is not None
    out = []
    for s in range(0, features.size(0), chunk):
        feats = features[s : s + chunk].unsqueeze(0)
        tgt = targets[s : s + chunk].unsqueeze(0)
        logits = model.decoder.output_layer(feats)
        # The class method: a model attached for generation (generation.py)
        # has a kNN-LM get_normalized_probs on the instance.
        lprobs = type(model).get_normalized_probs(
            model, (logits, extra), log_probs=True, sample={"target": tgt}
        )
        out.append(lprobs.gather(-1, tgt.unsqueeze(-1)).view(-1).float())
        if lm_features_out is not None:
            if partial:
                lprobs = type(model).get_normalized_probs(model, (logits, extra), log_probs=True, sample=None)
            lm_features_out.append(adaptive.lm_features(lprobs.view(-1, lprobs.size(-1))))
    return torch.cat(out) if out else features.new_zeros(0)


class _Prepared(NamedTuple):
    """A batch after the model's forward pass: the pipeline's input and where its rows go."""

    mask: torch.Tensor  # (bsz, tsz) scored positions
    keep_rows: torch.Tensor  # (bsz,) rows scored (not priming context)
    batch: Batch  # the scored positions, row after row


class KNNSequenceScorer:
    """Scores targets like fairseq's SequenceScorer, with a datastore pass or kNN-LM."""

    def __init__(self, tgt_dict, softmax_batch=None, task=None, **unused):
        if task is None:
            raise UserError("KNNSequenceScorer needs the knnlm_language_modeling task")
        self.task = task
        self.args = task.args
        self.pad = tgt_dict.pad()
        self.chunk = min(softmax_batch or sys.maxsize, 4096)
        self.dstore_writer = None
        self.capture = None
        self.tokens = 0
        self.overlap = None  # --knn-overlap's SearchOverlap, made at the first batch
        self.stats = PipelineStats()
        self.pipeline = None
        if not self.args.save_knnlm_dstore:
            cache = make_cache(self.args)  # --knn-cache-size's continuous cache (scoring/cache.py), or None
            saver = None
            if self.args.knnlm and self.args.knn_save_neighbors:
                saver = NeighboursSaver(
                    self.task.neighbors_output_path(), self.args.k, self._neighbors_info,
                    fp16_dists=self.args.knn_save_neighbors_fp16,
                    overwrite=self.args.knn_save_neighbors_overwrite,
                    with_queries=cache is not None,  # the keys the cache sweep needs, only then
                )
            if task.knnlm is not None:
                self.pipeline = task.knnlm.pipeline(self.args.lmbda, self.args.knn_temp, self.stats,
                                                    cache=cache, saver=saver)
            else:  # the LM with the continuous cache alone
                self.pipeline = KNNPipeline(None, self.args.lmbda, self.args.knn_temp, cache=cache, stats=self.stats)

    # ----------------------------------------------------------- main entry
    @torch.no_grad()
    def generate(self, models, sample, **kwargs):
        if len(models) != 1:
            raise UserError("kNN-LM scores one model; pass a single checkpoint to --path")
        model = models[0]
        model.eval()
        if self.capture is None:
            self.capture = KeyCapture(model, self.args.knn_keytype)

        if getattr(self.args, "knn_overlap", False):
            prepared, scores = self._overlapped(model, sample)
        else:
            prepared = self._prepare(model, sample)
            if self.args.save_knnlm_dstore:
                self._write_dstore(prepared.batch.queries, prepared.batch.targets)
                scores = prepared.batch.lm_lp
            else:
                scores = self._search_step(prepared)
        self.tokens += prepared.batch.targets.numel()
        return self._hypos(prepared.mask, prepared.keep_rows, prepared.batch.targets, scores)

    def _prepare(self, model, sample) -> _Prepared:
        """The model's part of a batch: forward pass, scored positions, LM log-probs, keys."""
        features, extra = model(**sample["net_input"], features_only=True)
        keys = self.capture.keys(features)
        mask = scored_mask(sample, self.pad)
        # Rows of priming samples (context for a shard's first block) are not scored.
        keep_rows = sample["id"] >= self.task.first_scored_id
        mask &= keep_rows.to(mask.device).unsqueeze(1)

        targets = sample["target"][mask]
        lm_feats = [] if self._wants_lm_features() else None
        lm_lp = lm_target_log_probs(model, features[mask], extra, targets, self.chunk, lm_feats)
        if lm_feats is not None:  # (0, f) for a batch without scored tokens (a shard's priming context)
            empty = torch.zeros(0, len(adaptive.FEATURE_NAMES), device=targets.device)
            lm_feats = torch.cat(lm_feats) if lm_feats else empty
        batch = Batch(keys[mask], lm_lp, targets, mask.sum(dim=1), lm_feats, sample["id"][keep_rows])
        return _Prepared(mask, keep_rows, batch)

    def _search_step(self, prepared: _Prepared):
        """The retrieval's part of a batch, the pipeline (also in --knn-overlap's worker)."""
        return self.pipeline.target_log_probs(prepared.batch)

    def _overlapped(self, model, sample):
        """--knn-overlap: this batch's search step runs in a worker thread while the
        model prepares the next batch (kept for the next call); same results."""
        if self.overlap is None:
            from ..retrieval.overlap import SearchOverlap
            from ..index.search_params import thread_setter

            peek = self.task.lookahead.peek if self.task.lookahead is not None else (lambda: None)
            self.overlap = SearchOverlap(peek, key=lambda s: tuple(s["id"].tolist()), thread_init=thread_setter())
        device = next(model.parameters()).device

        def prepare(s):
            if device.type == "cuda":  # eval-lm moves only the batch it hands over
                s = fairseq_utils.move_to_cuda(s, device=device)
            return self._prepare(model, s)

        return self.overlap.run(sample, prepare, self._search_step, ready=lambda s: "net_input" in s)

    def _hypos(self, mask, keep_rows, targets, scores):
        """One hypothesis per kept row, as SequenceScorer returns them."""
        counts = mask.sum(dim=1).tolist()
        hypos, offset = [], 0
        for row, n in enumerate(counts):
            if not bool(keep_rows[row]):
                continue
            toks, pos = targets[offset : offset + n], scores[offset : offset + n]
            offset += n
            hypos.append(
                [{
                    "tokens": toks,
                    "score": pos.sum() / max(n, 1),
                    "attention": None,
                    "alignment": None,
                    "positional_scores": pos,
                }]
            )
        return hypos

    # ------------------------------------------------------- datastore pass
    def _write_dstore(self, queries, targets):
        if self.dstore_writer is None:
            dtype = np.float16 if self.args.dstore_fp16 else np.float32
            self.dstore_writer = DatastoreWriter(
                self.task.dstore_output_dir(), queries.size(-1), dtype, self.args.dstore_overwrite
            )
        dtype = torch.float16 if self.args.dstore_fp16 else torch.float32
        self.dstore_writer.append(
            queries.to(dtype).cpu().numpy(), targets.to(torch.int32).cpu().numpy()
        )

    # ------------------------------------------------------------ kNN-LM
    def _wants_lm_features(self) -> bool:
        """LM features are computed to be saved with neighbours or to decide which tokens to search."""
        return bool(self.args.knnlm) and (
            bool(self.args.knn_save_neighbors) or self.task.knnlm.predictor is not None
        )

    def _neighbors_info(self) -> dict:
        """What a saved neighbours file records about the run."""
        knnlm = self.task.knnlm
        info = self.task.run_info()
        info.update(
            k=self.args.k,
            sim_func=str(self.args.knn_sim_func),
            lmbda=self.args.lmbda,
            knn_temp=self.args.knn_temp,
            probe=knnlm.retriever.nprobe,  # --probe, or the index's own when not given
            candidates=knnlm.retriever.candidates,
            faiss_params=self.args.knn_faiss_params,
            pointer_min_candidates=self.args.knn_pointer_min_candidates if self.args.knn_pointers else None,
            cache_size=self.args.knn_cache_size,
            cache_theta=self.args.knn_cache_theta,
            cache_lmbda=self.args.knn_cache_lmbda,
            dstore=knnlm.datastore.path,
            dstore_fingerprint=knnlm.datastore.fingerprint,
            dstore_size=knnlm.datastore.size,
            shard_id=self.task.shard_id,
            num_shards=self.task.num_shards,
        )
        return info

    # ------------------------------------------------------------ the end
    def finish(self):
        """Commit what this pass wrote; called once eval-lm has seen every batch."""
        if self.overlap is not None:
            self.overlap.close()
            logger.info(f"--knn-overlap: {self.overlap.prepared_ahead:,} batches computed while "
                        "the previous batch was searched")
        if self.args.save_knnlm_dstore:
            if self.dstore_writer is None:
                raise UserError("no scored tokens: the datastore would be empty; check --gen-subset")
            info = self.task.run_info()
            info.update(
                shard_id=self.task.shard_id,
                num_shards=self.task.num_shards,
                first_sample_id=int(self.task.first_scored_id),
            )
            path = self.dstore_writer.commit(info)
            logger.info(f"datastore: {self.dstore_writer.size:,} entries written to {path}")
        knnlm = self.task.knnlm
        retriever = knnlm.retriever if knnlm is not None else None
        if retriever is not None and self.tokens:
            # One parseable line: benchmarks read the searches per scored token from it.
            logger.info(
                f"kNN searches: {retriever.queries_searched:,} for {self.tokens:,} scored tokens "
                f"({retriever.queries_searched / self.tokens:.4f} per token)"
            )
        if knnlm is not None and knnlm.pointers is not None and knnlm.pointers.tokens:
            logger.info(knnlm.pointers.report())  # benchmarks parse this line
        cache = self.pipeline.cache if self.pipeline is not None else None
        if cache is not None and cache.tokens:
            logger.info(cache.describe())
        if self.stats.decided:
            searched, decided = self.stats.selected, self.stats.decided
            logger.info(f"adaptive retrieval: searched {searched:,} of {decided:,} scored tokens "
                        f"({searched / decided:.4f}); the others kept the LM's log-probability")
        saver = self.pipeline.saver if self.pipeline is not None else None
        path = saver.commit() if saver is not None else None
        if path is not None:
            logger.info(f"neighbours of {self.tokens:,} tokens saved to {path}")
        if self.capture is not None:
            self.capture.remove()
