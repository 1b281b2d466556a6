"""FinetuneModule: the LightningModule every run trains, whatever the method.

It owns the training and validation steps, the token-weighted loss and perplexity, the optimizer
and schedule over the method's parameter groups, and the measurements every comparison needs
(learning rate, tokens per second, padding efficiency, peak memory). Method-specific behaviour
reaches it only through the :class:`~ftlab.methods.base.Method` interface.

The loss of an optimizer step is weighted by tokens (:mod:`ftlab.training.loss`): the summed
cross-entropy of all its micro-batches, on all processes, over their scored targets,

    L = sum_{k, r} S_{k,r} / N,   N = sum_{k, r} n_{k,r}   (micro-batch k of A, rank r of R),

so ``batch_size=2`` with ``accumulate_grad_batches=4`` trains like ``batch_size=8``. Lightning
divides what ``training_step`` returns by A and DDP averages gradients over R; the step
returns ``A S_k / n_ref`` (``n_ref``: the first micro-batch's count on one process, else the
previous step's mean per micro-batch, the same on every rank), and once the last backward pass
of the step has run (inside the optimizer's closure, before any ``on_before_optimizer_step``
hook and before clipping) the gradients are multiplied by ``n_ref R / N``: the gradient of L
exactly, and no rescaling at all with one micro-batch on one process. A method's regulariser
(``regularizer(model)``, a function of its parameters only) is added once per optimizer step.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.aggregation import SumMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from ftlab.config import OptimizerSettings, SchedulerSettings
from ftlab.data.collate import model_inputs, real_tokens
from ftlab.training.loss import DEFAULT_CHUNK, loss_sum
from ftlab.methods.base import Method
from ftlab.metrics.memory import peak_memory_mb
from ftlab.training.optim import build_optimizer, build_scheduler


class FinetuneModule(L.LightningModule):
    def __init__(self, model: torch.nn.Module, method: Method, optimizer: OptimizerSettings,
                 scheduler: SchedulerSettings, total_steps: int, num_classes: int | None = None,
                 loss_chunk_size: int = DEFAULT_CHUNK):
        super().__init__()
        # Checkpoints hold only the trainable parameters, so loading one is never strict.
        self.strict_loading = False
        self.model = model
        self.method = method
        self.optimizer_settings = optimizer
        self.scheduler_settings = scheduler
        self.total_steps = total_steps
        # loss.chunk_size: scored tokens per chunk of the chunked cross-entropy, 0 = all logits at once.
        self.loss_chunk_size = loss_chunk_size
        # Sums over the whole validation set (and processes): loss = sum / count, not a mean of
        # batch means; perplexity = exp(loss), finite wherever the loss is.
        self.val_loss_sum, self.val_count, self.val_correct = SumMetric(), SumMetric(), SumMetric()
        # Sequence classification (labels [B], one class per example): accuracy and macro F1.
        self.num_classes = num_classes
        if num_classes:
            self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
            self.val_f1 = MulticlassF1Score(num_classes=num_classes, average="macro")
        self.step_times: list[float] = []
        self.step_tokens: list[int] = []
        self.tokens_real = 0
        self.tokens_computed = 0
        self.train_losses: list[tuple[int, float]] = []
        self.val_history: list[dict[str, float]] = []
        self._t0 = 0.0
        # The optimizer step in progress: summed loss and scored targets of its micro-batches.
        self._step_sum, self._step_count, self._micro = 0.0, 0, 0
        self._n_ref, self._mean_per_micro = 1.0, 1.0
        self._step_loss = torch.tensor(float("nan"))

    def forward(self, **batch):
        return self.model(**model_inputs(batch))

    # -- training ----------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        # from_pretrained returns the model in eval mode and Lightning 2.6 no longer switches
        # to train mode at fit start, which would silently turn adapter dropout off.
        self.model.train()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._t0 = time.perf_counter()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        s = loss_sum(self.model, model_inputs(batch), batch["labels"], self.loss_chunk_size)
        if self._micro == 0:  # the scale must be the same on every rank: local only when alone
            self._n_ref = max(1, int(s.count)) if self.trainer.world_size == 1 else self._mean_per_micro
        self._micro += 1
        self._step_sum = self._step_sum + s.total.detach()
        self._step_count = self._step_count + s.count
        # Real tokens from the collator's count: a packed batch has no attention mask.
        real = real_tokens(batch)
        self.tokens_real += real
        self.tokens_computed += batch["input_ids"].numel()
        self.step_tokens.append(real)
        # The rate this step's update will use (the scheduler advances after the step).
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True)
        return s.total * (self.trainer.accumulate_grad_batches / self._n_ref)

    def _weight_by_tokens(self) -> None:
        """After the step's last backward pass: gradients summed over the micro-batches and
        averaged over the ranks become the gradient of the token-weighted loss."""
        strategy, world, device = self.trainer.strategy, self.trainer.world_size, self.device
        total = strategy.reduce(torch.as_tensor(self._step_sum, dtype=torch.float32, device=device), reduce_op="sum")
        count = strategy.reduce(torch.as_tensor(self._step_count, dtype=torch.float32, device=device), reduce_op="sum")
        n = float(count)
        factor = self._n_ref * world / n if n > 0 else 1.0
        if factor != 1.0:
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.mul_(factor)
        self._step_loss = total / max(n, 1.0)
        self._mean_per_micro = max(1.0, n / (world * max(1, self._micro)))
        self._step_sum, self._step_count, self._micro = 0.0, 0, 0

    def on_before_optimizer_step(self, optimizer) -> None:
        # Gradients are token-weighted (and unscaled, under fp16's GradScaler) by now; clipping
        # comes after this hook.
        loss = self._step_loss
        penalty = self.method.regularizer(self.model)
        if penalty is not None:
            # Depends on the parameters only, identical on every rank: its gradient is added
            # here, outside DDP's hooks (autograd.grad does not accumulate into .grad).
            params = [p for p in self.model.parameters() if p.requires_grad]
            for p, g in zip(params, torch.autograd.grad(penalty, params, allow_unused=True)):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad.add_(g)
            loss = loss + penalty.detach()
        self.log("train/loss", loss, prog_bar=True, on_step=True)
        self.train_losses.append((self.global_step + 1, float(loss)))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        dt = time.perf_counter() - self._t0
        self.step_times.append(dt)
        self.log("train/tokens_per_sec", self.step_tokens[-1] / dt, on_step=True)
        self.log("train/peak_memory_mb", peak_memory_mb(), on_step=True)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        def closure():  # runs the step's last micro-batch, then weights the gradients by tokens
            result = optimizer_closure()
            self._weight_by_tokens()
            return result

        super().optimizer_step(epoch, batch_idx, optimizer, closure if optimizer_closure else None)
        # global_step counts completed steps only after this hook returns.
        self.method.after_optimizer_step(self.model, self.global_step + 1, self.total_steps)

    # -- validation --------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        labels = batch["labels"]
        if labels.ndim == 1:  # one class per example
            logits = self.model(**{k: v for k, v in model_inputs(batch).items() if k != "labels"}).logits
            self.val_loss_sum.update(F.cross_entropy(logits.float(), labels, reduction="sum"))
            self.val_count.update(labels.numel())
            self.val_acc.update(logits, labels)
            self.val_f1.update(logits, labels)
            return
        # Plain cross-entropy without a method's regulariser (AdaLoRA's), so validation losses
        # compare across methods; the correct count is next-token accuracy (argmax == label).
        s = loss_sum(self.model, model_inputs(batch), labels, self.loss_chunk_size, accuracy=True)
        self.val_loss_sum.update(s.total)
        self.val_count.update(s.count)
        self.val_correct.update(s.correct)

    def on_validation_epoch_end(self) -> None:
        count = self.val_count.compute()
        loss = self.val_loss_sum.compute() / count
        self.log("val/loss", loss, prog_bar=True)
        if self.num_classes:
            scores = {"val_accuracy": float(self.val_acc.compute()), "val_f1": float(self.val_f1.compute())}
            self.log("val/accuracy", scores["val_accuracy"], prog_bar=True)
            self.log("val/f1", scores["val_f1"])
            self.val_acc.reset()
            self.val_f1.reset()
        else:
            scores = {"val_perplexity": float(torch.exp(loss.double())),
                      "val_token_accuracy": float(self.val_correct.compute() / count)}
            self.log("val/perplexity", scores["val_perplexity"])
            self.log("val/token_accuracy", scores["val_token_accuracy"])
        if not self.trainer.sanity_checking:
            point = {"step": int(self.global_step), "val_loss": float(loss), **scores}
            if self.val_history and self.val_history[-1]["step"] == point["step"]:
                self.val_history[-1] = point  # validated again at the same step
            else:
                self.val_history.append(point)
        for metric in (self.val_loss_sum, self.val_count, self.val_correct):
            metric.reset()

    # -- optimizer ---------------------------------------------------------------------------
    def configure_optimizers(self):
        s = self.optimizer_settings
        # A method may bring its own optimizer class (LoRA-FA's peft variant); None means the
        # configured optimizer over the method's parameter groups.
        optimizer = self.method.build_optimizer(self.model, s.lr, s.weight_decay)
        if optimizer is None:
            optimizer = build_optimizer(s, self.method.param_groups(self.model, s.lr, s.weight_decay))
        scheduler = build_scheduler(self.scheduler_settings, optimizer, self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints: trainable parameters and method state only -----------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if k in trainable or not k.startswith("model.")}
        checkpoint["method_state"] = self.method.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.method.load_state_dict(checkpoint.get("method_state", {}))

    # -- summaries ---------------------------------------------------------------------------
    def throughput(self) -> dict[str, float]:
        """Median tokens/s and step time over the steps after the first (warm-up) one."""
        times = self.step_times[1:] or self.step_times
        tokens = self.step_tokens[1:] or self.step_tokens
        if not times:
            return {"tokens_per_second": 0.0, "step_time_s": 0.0, "padding_efficiency": 0.0}
        rates = [t / dt for t, dt in zip(tokens, times)]
        return {
            "tokens_per_second": statistics.median(rates),
            "step_time_s": statistics.median(times),
            "padding_efficiency": self.tokens_real / max(1, self.tokens_computed),
        }

