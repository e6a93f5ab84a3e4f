"""LARS as the MAE linear probe uses it (You et al. 2017, in the SimCLR/MoCo v3 form).

For every parameter with more than one dimension::

    u = g + wd * w
    u = u * (eta * ||w|| / ||u||)      (factor 1 if ||w|| = 0 or ||u|| = 0)

1-D parameters (biases, norms) get neither weight decay nor the trust ratio: ``u = g``.  Then
heavy-ball momentum ``mu = m * mu + u`` (buffer starts at zero) and ``w -= lr * mu``.

``timm.optim.Lars`` is not this optimizer: it divides by ``||g|| + wd * ||w|| + eps`` instead of
``||g + wd * w||``, adapts only when the group's weight decay is non-zero (the probe's is 0) unless
``always_adapt``, and does not single out 1-D parameters — hence this small class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


class LARS(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable,
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or trust_coefficient <= 0:
            raise ValueError("LARS needs lr >= 0, weight_decay >= 0, 0 <= momentum < 1, trust_coefficient > 0")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                u = p.grad
                if p.ndim > 1:
                    u = u.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(u)
                    # torch.where keeps this free of host syncs
                    ratio = torch.where(
                        (w_norm > 0) & (u_norm > 0), group["trust_coefficient"] * w_norm / u_norm, torch.ones_like(w_norm)
                    )
                    u = u.mul(ratio)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(u)
                p.add_(mu, alpha=-group["lr"])
        return loss
