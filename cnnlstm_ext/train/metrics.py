"""Classification metrics accumulated over batches: loss, accuracy, macro-F1, top-k, per-class
accuracy and the confusion matrix.

Everything is kept as sums (a confusion matrix, top-k hits, a loss sum), so the meters of several
processes combine exactly by adding them (`all_reduce`), whatever the batch split.
"""
from typing import Dict, List, Optional

import torch


class ClassificationMeter:
    """Accumulates `update(logits [B, C], targets [B], loss_sum)` and computes the metrics.

    `confusion[i, j]` counts samples of true class i predicted as class j.
    """

    def __init__(self, num_classes: int, topk: int = 5, device=None):
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1, got %d" % num_classes)
        self.num_classes = num_classes
        self.topk = min(topk, num_classes)
        # One float64 vector keeps every sum, so a single all_reduce combines all of them:
        # [confusion (C*C), topk hits, loss sum, loss count]
        self.sums = torch.zeros(num_classes * num_classes + 3, dtype=torch.float64, device=device)

    @property
    def confusion(self) -> torch.Tensor:
        C = self.num_classes
        return self.sums[:C * C].view(C, C).round().long()

    @property
    def count(self) -> int:
        return int(self.confusion.sum())

    def update(self, logits: torch.Tensor, targets: torch.Tensor,
               loss_sum: Optional[torch.Tensor] = None) -> None:
        """logits: [B, C]; targets: [B] int64; loss_sum: summed (not mean) loss of the batch."""
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError("logits must be [B, %d], got %s" % (self.num_classes, tuple(logits.shape)))
        if targets.shape != logits.shape[:1]:
            raise ValueError("targets must be [B]=[%d], got %s" % (logits.shape[0], tuple(targets.shape)))
        C = self.num_classes
        logits = logits.detach()
        targets = targets.detach().to(logits.device)
        sums = self.sums.to(logits.device) if self.sums.device != logits.device else self.sums
        pred = logits.argmax(1)
        sums[:C * C] += torch.bincount(targets * C + pred, minlength=C * C).to(torch.float64)
        top = logits.topk(self.topk, dim=1).indices  # [B, k]
        sums[C * C] += (top == targets[:, None]).any(1).sum().to(torch.float64)
        if loss_sum is not None:
            sums[C * C + 1] += loss_sum.detach().to(torch.float64)
            sums[C * C + 2] += targets.numel()
        self.sums = sums

    def all_reduce(self) -> "ClassificationMeter":
        """Sums the meters of all processes of the default process group (in place)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.sums)
        return self

    def compute(self) -> Dict[str, object]:
        """loss, acc, f1 (macro), top5 (top-k), per_class_acc [C], confusion [C][C], count.

        Macro-F1 averages over the classes that occur in the targets or the predictions (the
        usual convention: a class absent from both says nothing). Per-class accuracy (recall) is
        None for classes without samples.
        """
        C = self.num_classes
        sums = self.sums.double().cpu()
        conf = sums[:C * C].view(C, C)
        n = float(conf.sum())
        tp = conf.diag()
        support = conf.sum(1)  # true samples per class
        predicted = conf.sum(0)
        present = (support + predicted) > 0
        denom = (2 * tp + (predicted - tp) + (support - tp))
        f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1e-12), torch.zeros_like(tp))
        per_class: List[Optional[float]] = [
            (float(tp[i] / support[i]) if support[i] > 0 else None) for i in range(C)]
        loss_count = float(sums[C * C + 2])
        return {
            "count": int(n),
            "loss": float(sums[C * C + 1] / loss_count) if loss_count > 0 else None,
            "acc": float(tp.sum() / n) if n > 0 else 0.0,
            "f1": float(f1[present].mean()) if bool(present.any()) else 0.0,
            "top5": float(sums[C * C] / n) if n > 0 else 0.0,
            "topk": self.topk,
            "per_class_acc": per_class,
            "confusion": conf.round().long().tolist(),
        }
