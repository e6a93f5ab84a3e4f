"""What the monitor measures, as plain functions of feature matrices: no model, no ranks, no state — so each is
tested against an independent computation, and an offline study can call them on saved features.

* :func:`knn_scores` / :func:`knn_top1`: weighted kNN on cosine similarity (Wu et al. 2018), the monitor of DINO
  and solo-learn: each of the ``k`` most similar bank samples votes for its class with weight exp(sim / T);
* :func:`rankme`: RankMe (Garrido et al., ICML 2023), the effective rank of an embedding matrix: exp of the
  entropy of its singular values normalised to sum 1 (plus the paper's epsilon), between 1 and min(N, D).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KNN_K = 20
KNN_T = 0.07
RANKME_EPS = 1e-7  # the paper's epsilon, added to each normalised singular value


@torch.no_grad()
def knn_scores(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
               k: int = KNN_K, temperature: float = KNN_T, chunk: int = 256) -> torch.Tensor:
    """Class scores (Q, C) of the ``queries`` (Q, D): the summed exp(cos / T) of their ``k`` nearest ``bank``
    rows (N, D) per class (``k`` is capped at N).  Queries go ``chunk`` at a time: Q x N similarities at once
    would not fit for a large bank."""
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    k = min(k, bank.shape[0])
    out = []
    for i in range(0, queries.shape[0], chunk):
        sim, idx = (queries[i:i + chunk] @ bank.T).topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        out.append(votes.scatter_add_(1, bank_labels[idx], (sim / temperature).exp()))
    return torch.cat(out) if out else torch.zeros(0, num_classes, device=bank.device)


def top1(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent (0 for no rows); a tie goes to the lower class index (``argmax``)."""
    if not len(labels):
        return 0.0
    return 100.0 * (scores.argmax(1) == labels).float().mean().item()


def knn_top1(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
             num_classes: int, k: int = KNN_K, temperature: float = KNN_T) -> float:
    """Weighted kNN top-1 accuracy (%) of the ``queries`` against the labelled ``bank``."""
    return top1(knn_scores(bank, bank_labels, queries, num_classes, k, temperature), query_labels)


@torch.no_grad()
def rankme(feats: torch.Tensor, eps: float = RANKME_EPS) -> float:
    """RankMe of the embeddings ``feats`` (N, D), uncentred as in the paper; in float64 so that the small singular
    values, which decide the entropy's tail, are not rounding noise."""
    s = torch.linalg.svdvals(feats.double())
    p = s / s.sum().clamp_min(torch.finfo(torch.float64).tiny) + eps
    return float(torch.exp(-(p * p.log()).sum()))
