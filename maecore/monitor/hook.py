"""The monitor as one hook (:class:`Monitor`): is the representation getting better while pretraining runs?

Every ``every`` steps (and at step 0, the random-initialised reference, and at the run's last step) the encoder's
features *without masking* on a fixed subset (:mod:`maecore.monitor.subset`), pooled as the linear probe pools
(``mean`` of the patch tokens after the final norm, or the ``cls`` token), give

* ``knn_top1``: weighted kNN (k 20, cosine, T 0.07) of the queries against the bank (:mod:`maecore.monitor.metrics`);
* ``linear_top1``: the online linear classifier's accuracy on the queries;
* ``rankme``: the effective rank of the bank's embeddings (the one measure unlabelled data still gets).

They are logged as a ``monitor`` record (log.jsonl; TensorBoard ``monitor/…``).

The online classifier (BatchNorm without affine + Linear: the MAE paper's probe head, App. A.1) has its own AdamW
and learns at every micro-batch from the features the training forward computed anyway: the encoder's output for
the batch's *visible* tokens, pooled and detached, read by a forward hook on the final norm, with the batch's labels
(``trainer.batch``).  Why not an unmasked forward of the batch: it would cost about one more training step's worth
of encoder compute every step, far past the 5 % budget; the pooled visible tokens cost one (B, D) mean.  The price:
the classifier learns from 25 % views and is tested on whole images, a shift like solo-learn's (augmented views
for training, clean ones for validation); the curve's trend is what it is for.  The encoder's gradients are never
touched (the features are detached), nor its optimizer.

Exact: under DDP/FSDP the bank and queries are gathered across ranks in a fixed order, and every rank trains the
same classifier on the all-gathered batch, so 1 rank and W ranks agree; the classifier, its optimizer and the
running loss are checkpointed under ``extra["monitor"]``, so a resumed run logs what an uninterrupted one would.
Nothing here draws from the global RNGs (the classifier is initialised from its own seed): the run trains exactly
as it would without the monitor.

Harmless: any failure of the monitor (a missing module, an unreadable subset, out of memory) is one warning line
and the monitor turns off; training goes on.  The ranks agree first (a failure on one rank turns all off), so no
rank is left waiting in a collective; a failed collective itself (a dead peer) is the run's error, not hidden.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from maecore import distributed as du
from maecore.engine.hooks import NORMAL, HookBase
from maecore.engine.precision import autocast
from maecore.monitor.metrics import knn_top1, rankme, top1
from maecore.monitor.subset import MonitorSubset, gather_in_order

POOLS = ("mean", "cls")


def pool_tokens(tokens: torch.Tensor, prefix: int, how: str) -> torch.Tensor:
    """(B, prefix + L, D) tokens -> (B, D): the mean of the L patch tokens, or the first (cls) token."""
    return tokens[:, prefix:].mean(1) if how == "mean" else tokens[:, 0]


class OnlineProbe(nn.Module):
    """BatchNorm1d(affine=False) + Linear: features standardised per channel, as the MAE linear probe's head
    (their scale drifts while the encoder trains; the running statistics follow)."""

    def __init__(self, dim: int, num_classes: int, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # nn.Linear's default init draws from the global RNG: leave it alone
            self.norm = nn.BatchNorm1d(dim, affine=False)
            self.head = nn.Linear(dim, num_classes)
        g = torch.Generator().manual_seed(seed)
        nn.init.trunc_normal_(self.head.weight, std=0.01, generator=g)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))


class MonitorOff(Exception):
    """The ranks agreed that the monitor failed: it is off (the warning line is printed)."""


class Monitor(HookBase):
    """See the module's docstring.  ``subset``: the images; ``every``: steps between measurements; ``dim``: the
    features' width; ``online``: train the linear classifier (labels of the training batches in the subset's
    classes); ``pool``: ``mean`` or ``cls``; ``tap``: the module whose output is the encoder's tokens (its final
    norm); ``features(model, images) -> tokens``: the unmasked forward (default ``model.forward_features``);
    ``labels(batch)``: a training batch's labels (default ``batch[1]``)."""

    priority = NORMAL
    state_key = "monitor"

    def __init__(self, subset: MonitorSubset, every: int, dim: int, device: torch.device, online: bool = True,
                 pool: str = "mean", tap: str = "norm", features: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
                 labels: Callable[[Any], torch.Tensor] | None = None, lr: float = 1e-3, seed: int = 0) -> None:
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.subset, self.every, self.pool, self.tap_name = subset, every, pool, tap
        self.features = features or (lambda m, x: m.forward_features(x))
        self.labels = labels or (lambda b: b[1])
        self.online = online and subset.labelled
        self.device = device
        self.probe = OnlineProbe(dim, max(len(subset.classes), 1), seed).to(device)
        self.opt = torch.optim.AdamW(self.probe.parameters(), lr=lr, weight_decay=0.0)
        self.loss_sum = torch.zeros((), device=device)  # the classifier's training loss since the last record
        self.loss_n = 0
        self.last = -1  # the step last measured
        self.on = True
        self._handle: Any = None
        self._tapped: torch.Tensor | None = None
        self._error: BaseException | None = None  # a failure in the last update, reported at the next agreement

    # ---- events ----------------------------------------------------------------------------------------------
    def before_train(self) -> None:
        t = self.trainer
        if not self._agree(self._try(self._start)):
            return
        if t.step == 0:
            self.measure()

    def after_backward(self) -> None:
        if self.on and self.online:
            self.learn()

    def after_step(self) -> None:
        t = self.trainer
        if self.on and (t.step % self.every == 0 or t.done):
            self.measure()

    def after_epoch(self) -> None:
        t = self.trainer
        if self.on and t.final and self.last != t.step:
            self.measure()

    def after_train(self) -> None:
        self._untap()

    # ---- the online classifier -------------------------------------------------------------------------------
    def _start(self) -> None:
        if self.online:
            m = self.trainer.model.get_submodule(self.tap_name)
            self._handle = m.register_forward_hook(self._tap)
        self.subset.load()

    def _tap(self, module: nn.Module, args: Any, out: torch.Tensor) -> None:
        if module.training:  # the training forward's tokens, not the measurement's
            self._tapped = pool_tokens(out.detach().float(), self.trainer.model.num_prefix_tokens, self.pool)

    def _untap(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._tapped = None

    def learn(self) -> None:
        """One AdamW step of the classifier on this micro-batch's pooled features and labels, all ranks' (one
        all-gather, no host sync).  A rank that failed sends rows marked not ok, which carry no weight; its error
        turns the monitor off at the next agreement (the next measurement)."""
        t = self.trainer
        feats, self._tapped = self._tapped, None
        rows = torch.zeros(t.cfg.batch_size, self.probe.head.in_features + 2, device=self.device)  # features | label | ok
        if self._error is None:
            try:
                if feats is None:
                    raise RuntimeError(f"the training forward never ran {self.tap_name!r}: no features to learn from")
                rows = torch.cat([feats, self.labels(t.batch).to(self.device, torch.float32)[:, None],
                                  torch.ones(len(feats), 1, device=self.device)], 1)
            except Exception as e:
                self._error = self._fail_local(e)
        if du.is_dist():
            parts = [torch.empty_like(rows) for _ in range(du.world_size())]
            dist.all_gather(parts, rows)
            rows = torch.cat(parts)
        if self._error is not None and not du.is_dist():
            return
        try:
            x, y, ok = rows[:, :-2], rows[:, -2].long().clamp_min(0), rows[:, -1]
            loss = (F.cross_entropy(self.probe(x), y, reduction="none") * ok).sum() / ok.sum().clamp_min(1)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.loss_sum += loss.detach()
            self.loss_n += 1
        except Exception as e:
            self._error = self._error or self._fail_local(e)

    # ---- the measurement -------------------------------------------------------------------------------------
    def measure(self) -> None:
        """kNN, linear and RankMe on the subset's unmasked features: logged as a ``monitor`` record."""
        t = self.trainer
        start = time.time()
        model, sub = t.model, self.subset
        parts = [p for p in (sub.bank, sub.queries) if len(p)]
        was_training = model.training
        local: list[tuple[torch.Tensor, torch.Tensor]] = []

        def embed() -> None:
            fn = lambda x: pool_tokens(self.features(model, x).float(), model.num_prefix_tokens, self.pool)  # noqa: E731
            with autocast(t.device, t.amp):
                local.extend(sub.local_features(p, fn, t.cfg.batch_size, self.device) for p in parts)

        model.eval()
        try:
            with torch.no_grad(), t.whole_weights():
                ok = self._agree(self._try(embed))
                gathered = [(gather_in_order(f, len(p)), gather_in_order(y, len(p))) for (f, y), p in zip(local, parts)] if ok else []
        finally:
            model.train(was_training)
        if not ok:
            return
        vals: dict[str, Any] = {}

        def compute() -> None:
            (bank, bank_y), *rest = gathered
            vals["rankme"] = rankme(bank)
            if sub.labelled and rest:
                (queries, query_y), = rest
                vals["knn_top1"] = knn_top1(bank, bank_y, queries, query_y, len(sub.classes))
                if self.online:
                    self.probe.eval()
                    with torch.no_grad():
                        vals["linear_top1"] = top1(self.probe(queries), query_y)
                    self.probe.train()
            if self.loss_n:
                vals["linear_loss"] = float(self.loss_sum / self.loss_n)

        if not self._agree(self._try(compute)):
            return
        self.loss_sum.zero_()
        self.loss_n = 0
        self.last = t.step
        vals["seconds"] = round(time.time() - start, 3)
        t.logger.log("monitor", t.step, epoch=t.epoch, subset={"bank": len(sub.bank), "queries": len(sub.queries)}, **vals)
        if du.is_main():
            shown = [f"{k} {vals[k]:.2f}" for k in ("knn_top1", "linear_top1", "rankme") if k in vals]
            print(f"monitor at step {t.step}: {', '.join(shown)} ({vals['seconds']:.1f} s)", flush=True)

    # ---- failures: one line, the monitor off, training on -----------------------------------------------------
    def _try(self, fn: Callable[[], None]) -> BaseException | None:
        try:
            fn()
        except Exception as e:
            return self._fail_local(e)
        return None

    def _fail_local(self, e: BaseException) -> BaseException:
        if du.comm_failure(e):  # a dead or silent peer: the run's error (the launcher names the rank)
            raise e
        return e

    def _agree(self, err: BaseException | None) -> bool:
        """Did this step's monitor work run everywhere (a pending failure of an update counts)?  If not, the lowest
        failing rank prints its error as one warning line and every rank turns the monitor off."""
        err = err or self._error
        if du.is_dist():
            flags = torch.zeros(du.world_size(), device=self.device)
            flags[du.rank()] = float(err is not None)
            dist.all_reduce(flags)
            bad = [r for r, f in enumerate(flags.tolist()) if f]
        else:
            bad = [0] if err is not None else []
        if bad:
            self._off(bad[0], err)
            return False
        return True

    def _off(self, first_bad: int, err: BaseException | None) -> None:
        t = self.trainer
        if du.rank() == first_bad and err is not None:
            what = " ".join(str(err).split()) or "no message"
            where = f" (rank {first_bad})" if du.is_dist() else ""
            print(f"warning: monitor off from step {t.step}{where}: {type(err).__name__}: {what}; training goes on",
                  file=sys.stderr, flush=True)
        self.on = False
        self._error = None
        self._untap()

    # ---- checkpointed state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The classifier, its optimizer and the loss since the last record; a diverged classifier (NaN/inf) is
        started afresh here rather than stopping the run at the checkpoint's finite check (one host sync)."""
        tensors = [*self.probe.state_dict().values(), self.loss_sum]
        tensors += [v for s in self.opt.state.values() for v in s.values() if torch.is_tensor(v)]
        if not all(bool(torch.isfinite(x.float()).all()) for x in tensors if x.is_floating_point()):
            self._reset("the online linear classifier diverged (NaN/inf)")
        return {"probe": self.probe.state_dict(), "optimizer": self.opt.state_dict(), "loss_sum": self.loss_sum,
                "loss_n": self.loss_n, "last": self.last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.probe.load_state_dict(state["probe"])
            self.opt.load_state_dict(state["optimizer"])
            self.loss_sum = state["loss_sum"].to(self.device)
            self.loss_n, self.last = int(state["loss_n"]), int(state["last"])
        except Exception as e:  # another subset's classes, an older layout: a fresh classifier, not a failed resume
            self._reset(f"the checkpoint's online classifier does not fit ({type(e).__name__}: {' '.join(str(e).split())})")

    def _reset(self, why: str) -> None:
        if du.is_main():
            print(f"warning: monitor: {why}; it starts afresh", file=sys.stderr, flush=True)
        fresh = OnlineProbe(self.probe.head.in_features, self.probe.head.out_features).to(self.device)
        self.probe.load_state_dict(fresh.state_dict())
        self.opt = torch.optim.AdamW(self.probe.parameters(), lr=self.opt.defaults["lr"], weight_decay=0.0)
        self.loss_sum = torch.zeros((), device=self.device)
        self.loss_n = 0
