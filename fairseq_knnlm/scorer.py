"""KNNSequenceScorer: fairseq's SequenceScorer for kNN-LM, used by the stock fairseq-eval-lm.

Per batch it runs the model once, takes the hidden states at the scored
positions (targets after the context window, not padding) and then either
streams them to the datastore (``--save-knnlm-dstore``) or searches them all
in one FAISS call and interpolates (``--knnlm``).  LM probabilities are only
computed at scored positions, which is what makes both passes cheaper than a
plain evaluation that normalises over the context window too.
"""

import logging
import sys

import numpy as np
import torch

from . import knn_math
from .datastore import DatastoreWriter
from .errors import UserError
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


def lm_target_log_probs(model, features, extra, targets, chunk: int) -> torch.Tensor:
    """log p_LM(target) for rows of ``features`` (n, dim), in chunks of ``chunk`` rows."""
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
    return torch.cat(out) if out else features.new_zeros(0)


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
        self.neighbors_writer = None
        self.capture = None
        self.tokens = 0

    # ----------------------------------------------------------- main entry
    @torch.no_grad()
    def generate(self, models, sample, **kwargs):
        if len(models) != 1:
            raise UserError("kNN-LM scores one model; pass a single checkpoint to --path")
        model = models[0]
        model.eval()
        if self.capture is None:
            self.capture = KeyCapture(model, self.args.knn_keytype)

        features, extra = model(**sample["net_input"], features_only=True)
        keys = self.capture.keys(features)
        mask = scored_mask(sample, self.pad)
        # Rows of priming samples (context for a shard's first block) are not scored.
        keep_rows = sample["id"] >= self.task.first_scored_id
        mask &= keep_rows.to(mask.device).unsqueeze(1)

        targets = sample["target"][mask]
        lm_lp = lm_target_log_probs(model, features[mask], extra, targets, self.chunk)
        queries = keys[mask]
        if self.args.save_knnlm_dstore:
            self._write_dstore(queries, targets)
            scores = lm_lp
        else:
            scores = self._knn_scores(queries, targets, lm_lp, mask.sum(dim=1))
        self.tokens += targets.numel()
        return self._hypos(mask, keep_rows, targets, scores)

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
    def _knn_scores(self, queries, targets, lm_lp, row_lengths):
        if self.args.lmbda == 0 and self.args.knn_save_neighbors is None:
            return lm_lp  # λ = 0 is the plain LM: skip the search entirely
        dists, vals = self.task.retriever.search(queries)
        knn_lp = knn_math.knn_target_log_probs(dists, vals, targets, self.args.knn_temp)
        if self.args.knn_save_neighbors:
            self._write_neighbors(targets, lm_lp, dists, vals, row_lengths)
        return knn_math.interpolate(lm_lp, knn_lp, self.args.lmbda)

    def _write_neighbors(self, targets, lm_lp, dists, vals, row_lengths):
        if self.neighbors_writer is None:
            from .neighbors import NeighborsWriter

            info = self.task.run_info()
            info.update(
                k=self.args.k,
                sim_func=str(self.args.knn_sim_func),
                lmbda=self.args.lmbda,
                knn_temp=self.args.knn_temp,
                probe=self.args.probe,
                dstore=self.task.datastore.path,
                dstore_fingerprint=self.task.datastore.fingerprint,
                dstore_size=self.task.datastore.size,
                shard_id=self.task.shard_id,
                num_shards=self.task.num_shards,
            )
            self.neighbors_writer = NeighborsWriter(
                self.task.neighbors_output_path(),
                self.args.k,
                info,
                fp16_dists=self.args.knn_save_neighbors_fp16,
                overwrite=self.args.knn_save_neighbors_overwrite,
            )
        self.neighbors_writer.append(
            targets.cpu().numpy(),
            lm_lp.cpu().numpy(),
            dists.cpu().numpy(),
            vals.to(torch.int32).cpu().numpy(),
            # eval-lm sums scores per sequence in float32; the sweep repeats that exactly.
            lengths=row_lengths.cpu().numpy(),
        )

    # ------------------------------------------------------------ the end
    def finish(self):
        """Commit what this pass wrote; called once eval-lm has seen every batch."""
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
        if self.neighbors_writer is not None:
            path = self.neighbors_writer.commit()
            logger.info(f"neighbours of {self.tokens:,} tokens saved to {path}")
        if self.capture is not None:
            self.capture.remove()
