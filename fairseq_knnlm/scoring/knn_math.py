"""The kNN-LM arithmetic, as pure tensor functions (no model, no index).

All probabilities are natural-log.  ``dists`` are "distances" in the sense of
the paper: the neighbour weights are softmax(-dists / temperature).  For the
inner-product similarity the caller passes negated inner products.
"""

import math

import torch


SIM_FUNCS = ("faiss", "l2", "ip")


def neighbor_log_weights(dists: torch.Tensor, temperature: float, counts: torch.Tensor = None) -> torch.Tensor:
    """log softmax(-d / T + log count) over the k neighbours (last dim), in float32.

    ``counts`` (same shape as ``dists``): how many original entries each
    neighbour of a pruned datastore stands for, so its weight is
    count * exp(-d / T).  Without counts the arithmetic is exactly the plain
    kNN-LM's, and counts of 1 add log 1 = 0, which changes no bit.
    Neighbours at distance +inf (slots the index could not fill) get weight 0;
    a row with none at all gets -inf everywhere instead of NaN.
    """
    logits = -dists.float() / temperature
    if counts is not None:
        logits = logits + counts.float().log()
    log_w = torch.log_softmax(logits, dim=-1)
    return torch.where(torch.isfinite(logits), log_w, torch.full_like(log_w, -math.inf))


def knn_target_log_probs(
    dists: torch.Tensor, neighbor_vals: torch.Tensor, targets: torch.Tensor, temperature: float,
    counts: torch.Tensor = None,
) -> torch.Tensor:
    """log p_kNN(target): log of the summed weights of neighbours whose value is the target.

    dists, neighbor_vals (and the optional ``counts`` of a pruned store): (n, k);
    targets: (n,).  -inf where no neighbour matches.
    """
    log_w = neighbor_log_weights(dists, temperature, counts)
    match = neighbor_vals.long() == targets.long().unsqueeze(-1)
    return torch.logsumexp(log_w.masked_fill(~match, -math.inf), dim=-1)


def knn_vocab_log_probs(
    dists: torch.Tensor, neighbor_vals: torch.Tensor, vocab_size: int, temperature: float,
    counts: torch.Tensor = None,
) -> torch.Tensor:
    """The full kNN distribution over the vocabulary, (n, vocab_size), natural log.

    Unfilled slots (value -1) are scattered onto token 0 with weight 0.
    ``counts``: as in :func:`neighbor_log_weights`.
    """
    missing = neighbor_vals < 0
    weights = neighbor_log_weights(dists, temperature, counts).exp().masked_fill(missing, 0.0)
    probs = weights.new_zeros(weights.shape[:-1] + (vocab_size,))
    probs.scatter_add_(-1, neighbor_vals.long().clamp(min=0), weights)
    return probs.log()


def interpolate(lm_log_probs: torch.Tensor, knn_log_probs: torch.Tensor, lmbda: float) -> torch.Tensor:
    """log(λ p_kNN + (1-λ) p_LM), computed in log space.

    λ = 0 returns the LM scores unchanged and λ = 1 the kNN scores, so no
    log(0) ever meets a finite term; a p_kNN of 0 gives log((1-λ) p_LM).
    """
    if lmbda == 0:
        return lm_log_probs
    if lmbda == 1:
        return knn_log_probs.to(lm_log_probs.dtype)
    lm_term = lm_log_probs.float() + math.log1p(-lmbda)
    knn_term = knn_log_probs.float() + math.log(lmbda)
    return torch.logaddexp(lm_term, knn_term).to(lm_log_probs.dtype)


def knnlm_log_probs(
    lm_log_probs: torch.Tensor,
    dists: torch.Tensor,
    vals: torch.Tensor,
    lmbda: float,
    temperature: float,
    counts: torch.Tensor = None,
) -> torch.Tensor:
    """The kNN-LM's full distribution: log(λ p_kNN + (1-λ) p_LM) for every token.

    lm_log_probs (n, V) natural log; dists, vals (and the counts of a pruned
    datastore) (n, k) as the retriever returns them.  A row whose neighbours
    are all missing (an IVF search that found nothing) has no kNN
    distribution, so it keeps the LM's: generation needs every row to sum to 1.
    """
    if lmbda == 0:
        return lm_log_probs
    lm = lm_log_probs.float()
    # p_kNN is zero outside the (at most k) neighbour tokens, so the mixture is
    # log(1-λ) + log p_LM everywhere else; only the neighbour tokens need a
    # logaddexp.  This avoids a log and a logaddexp over the whole vocabulary
    # at every decoding step.
    knn_p = lm.new_zeros(lm.shape)  # the full-vocabulary kNN distribution
    weights = neighbor_log_weights(dists, temperature, counts).exp().masked_fill(vals < 0, 0.0)
    tokens = vals.long().clamp(min=0)
    knn_p.scatter_add_(-1, tokens, weights)
    log_keep = math.log1p(-lmbda) if lmbda < 1 else -math.inf
    mixed = lm + log_keep
    at_tokens = torch.logaddexp(
        lm.gather(-1, tokens) + log_keep, knn_p.gather(-1, tokens).log() + math.log(lmbda)
    )
    mixed.scatter_(-1, tokens, at_tokens)  # repeated tokens write the same value
    found = (vals >= 0).any(dim=-1, keepdim=True)
    return torch.where(found, mixed, lm).to(lm_log_probs.dtype)

