"""Top-1/top-5 evaluation that counts every sample once under torchrun, confusion matrices,
feature extraction and the kNN monitor."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from maecore import distributed as du
from maecore.engine import autocast, to_device
from maecore.figures import save_figure
from maecore.monitor.metrics import knn_scores


def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """rank r of W takes r, r+W, …: no padding, so every sample is evaluated exactly once."""
    return list(range(rank, n, world))


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, pin: bool = False) -> DataLoader:
    """This rank's share of ``dataset`` in order, last batch kept."""
    idx = shard_indices(len(dataset), du.rank(), du.world_size())  # type: ignore[arg-type]
    return DataLoader(Subset(dataset, idx), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=pin, drop_last=False)


def sync_buffers(model: nn.Module, params: bool = False) -> None:
    """Give every rank rank 0's buffers (BN running statistics), and with ``params`` its weights.

    DDP broadcasts buffers at the *start* of each training forward, so after the last step each rank
    holds the statistics of its own last batch; every rank must evaluate the checkpointed model.
    Weights need it before DDP wraps the model (e.g. features extracted from a randomly initialised,
    per-rank-seeded encoder)."""
    if du.is_dist():
        for t in [*model.buffers(), *(model.parameters() if params else ())]:
            dist.broadcast(t.data, 0)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device, num_classes: int, amp: str = "none"
) -> dict:
    """Accuracy, top-5 and cross-entropy over ``loader`` (this rank's non-padded shard), summed over
    ranks.  Returns ``{'acc1', 'acc5', 'loss', 'n_images', 'n_skipped', 'confusion'}`` (percent; confusion
    is a (true, predicted) count matrix on the CPU)."""
    was_training = model.training
    model.eval()
    sync_buffers(model)
    k = min(5, num_classes)
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # correct1, correct5, loss, n, skipped
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for batch in loader:
        imgs, target, skipped = to_device(batch, device)
        with autocast(device, amp):
            logits = model(imgs)
        logits = logits.float()
        top = logits.topk(k, dim=1).indices
        hit = top == target[:, None]
        sums += torch.stack([
            hit[:, 0].sum(), hit.any(dim=1).sum(), F.cross_entropy(logits, target, reduction="sum"),
            torch.ones_like(target).sum(), torch.as_tensor(skipped).sum(),  # device-side: no host sync per batch
        ]).double()
        confusion.view(-1).index_add_(0, target * num_classes + top[:, 0], torch.ones_like(target))
    if du.is_dist():
        dist.all_reduce(sums)
        dist.all_reduce(confusion)
    c1, c5, loss, n, skipped = sums.tolist()
    model.train(was_training)
    n = max(n, 1.0)
    return {"acc1": 100.0 * c1 / n, "acc5": 100.0 * c5 / n, "loss": loss / n, "n_images": int(n), "n_skipped": int(skipped),
            "confusion": confusion.cpu()}


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (ranks may hold different counts), in rank order."""
    if not du.is_dist():
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(du.world_size())]
    dist.all_gather(sizes, n)
    m = int(max(s.item() for s in sizes))
    pad = t.new_zeros((m - t.shape[0], *t.shape[1:]))
    parts = [t.new_zeros((m, *t.shape[1:])) for _ in sizes]
    dist.all_gather(parts, torch.cat([t, pad]))
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


@torch.no_grad()
def extract_features(model: nn.Module, loader: DataLoader, device: torch.device, amp: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-logits features (``forward_head(forward_features(x), pre_logits=True)``: pooled, after
    ``fc_norm``, what the head sees) and targets for the whole dataset, on every rank.

    ``loader`` is this rank's shard (:func:`classification.data.eval_loader`); the result is in the
    dataset's order."""
    model.eval()
    feats, targets = [], []
    for imgs, target, _ in loader:
        with autocast(device, amp):
            f = model.forward_head(model.forward_features(imgs.to(device, non_blocking=True)), pre_logits=True)
        feats.append(f.float())
        targets.append(target.to(device))
    if not feats:  # a rank with no share (fewer images than processes)
        feats = [torch.zeros(0, getattr(model, "embed_dim", 0), device=device)]
        targets = [torch.zeros(0, dtype=torch.long, device=device)]
    f = gather_rows(torch.cat(feats))
    t = gather_rows(torch.cat(targets))
    w = du.world_size()
    if w > 1:  # rank-major (r, r+W, …) -> dataset order
        n = t.shape[0]
        order = torch.cat([torch.arange(r, n, w) for r in range(w)]).to(t.device)
        f_sorted, t_sorted = torch.empty_like(f), torch.empty_like(t)
        f_sorted[order], t_sorted[order] = f, t
        f, t = f_sorted, t_sorted
    return f, t


def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 256,
) -> torch.Tensor:
    """Weighted kNN on cosine similarity (Wu et al. 2018; DINO's monitor): each of the ``k`` nearest
    training samples votes for its class with weight exp(sim / T).  Returns class scores (N, C).
    The monitor's kNN (:func:`maecore.monitor.metrics.knn_scores`): one kNN in the codebase."""
    return knn_scores(train_feats, train_labels, test_feats, num_classes, k, temperature, chunk)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes: int, k: int = 20, temperature: float = 0.07) -> dict:
    scores = knn_classify(train_feats, train_labels, test_feats, num_classes, k, temperature)
    top = scores.topk(min(5, num_classes), dim=1).indices
    hit = top == test_labels[:, None]
    n = max(len(test_labels), 1)
    return {"knn_acc1": 100.0 * hit[:, 0].sum().item() / n, "knn_acc5": 100.0 * hit.any(1).sum().item() / n}


def confusion_figure(confusion: torch.Tensor, classes: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Row-normalised confusion matrix (true class per row) as a PNG; class names shown up to 40
    classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = confusion.double()
    rows = cm / cm.sum(1, keepdim=True).clamp_min(1)
    n = cm.shape[0]
    side = min(4 + 0.35 * n, 20)
    fig, ax = plt.subplots(figsize=(side, side * 0.9))
    im = ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    if n <= 40:
        names = list(classes)[:n] + [str(i) for i in range(len(classes), n)]
        ax.set_xticks(range(n), names, rotation=90)
        ax.set_yticks(range(n), names)
        if n <= 15:
            for i in range(n):
                for j in range(n):
                    if cm[i, j] > 0:
                        ax.text(j, i, int(cm[i, j]), ha="center", va="center",
                                color="white" if rows[i, j] > 0.5 else "black", fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc = 100.0 * cm.diag().sum().item() / max(cm.sum().item(), 1)
    ax.set_title(f"{title}  top-1 {acc:.2f}% ({int(cm.sum().item())} images)".strip())
    return save_figure(fig, path, dpi=100)
