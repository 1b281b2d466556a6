"""FinetuneModule: the LightningModule every run trains, whatever the method.

It owns the training and validation steps, loss and perplexity (torchmetrics), the optimizer
and schedule over the method's parameter groups, and the measurements every comparison needs
(learning rate, tokens per second, padding efficiency, peak memory). Method-specific behaviour
reaches it only through the :class:`~ftlab.methods.base.Method` interface.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.aggregation import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from torchmetrics.text import Perplexity

from ftlab.config import OptimizerSettings, SchedulerSettings
from ftlab.data.collate import model_inputs, real_tokens
from ftlab.data.encode import IGNORE_INDEX
from ftlab.methods.base import Method
from ftlab.metrics.memory import peak_memory_mb
from ftlab.training.optim import build_optimizer, build_scheduler


class FinetuneModule(L.LightningModule):
    def __init__(self, model: torch.nn.Module, method: Method, optimizer: OptimizerSettings,
                 scheduler: SchedulerSettings, total_steps: int, num_classes: int | None = None):
        super().__init__()
        # Checkpoints hold only the trainable parameters, so loading one is never strict.
        self.strict_loading = False
        self.model = model
        self.method = method
        self.optimizer_settings = optimizer
        self.scheduler_settings = scheduler
        self.total_steps = total_steps
        self.val_loss = MeanMetric()
        self.val_ppl = Perplexity(ignore_index=IGNORE_INDEX)
        # Sequence classification (labels [B], one class per example): accuracy and macro F1.
        self.num_classes = num_classes
        if num_classes:
            self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
            self.val_f1 = MulticlassF1Score(num_classes=num_classes, average="macro")
        else:
            # Next-token accuracy on the scored positions: argmax of the logits == the label.
            self.val_token_acc = MulticlassAccuracy(num_classes=_vocab_size(model), average="micro",
                                                    ignore_index=IGNORE_INDEX, validate_args=False)
        self.step_times: list[float] = []
        self.step_tokens: list[int] = []
        self.tokens_real = 0
        self.tokens_computed = 0
        self.train_losses: list[tuple[int, float]] = []
        self.val_history: list[dict[str, float]] = []
        self._t0 = 0.0

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
        loss = self.model(**model_inputs(batch)).loss
        # Real tokens from the collator's count: a packed batch has no attention mask.
        real = real_tokens(batch)
        self.tokens_real += real
        self.tokens_computed += batch["input_ids"].numel()
        self.step_tokens.append(real)
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=batch["input_ids"].shape[0])
        # The rate this step's update will use (the scheduler advances after the step).
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        dt = time.perf_counter() - self._t0
        self.step_times.append(dt)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.train_losses.append((self.global_step, float(loss.detach())))
        self.log("train/tokens_per_sec", self.step_tokens[-1] / dt, on_step=True)
        self.log("train/peak_memory_mb", peak_memory_mb(), on_step=True)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # global_step counts completed steps only after this hook returns.
        self.method.after_optimizer_step(self.model, self.global_step + 1, self.total_steps)

    # -- validation --------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # Without labels: the loss below comes from the logits, and a model's own loss may fail
        # where training state is gone (an AdaLoRA adapter loaded by peft has no trainable
        # adapter to take its orthogonality penalty from).
        out = self.model(**{k: v for k, v in model_inputs(batch).items() if k != "labels"})
        labels = batch["labels"]
        if labels.ndim == 1:  # one class per example
            loss = F.cross_entropy(out.logits.float(), labels)
            self.val_loss.update(loss.detach(), weight=labels.numel())
            self.val_acc.update(out.logits, labels)
            self.val_f1.update(out.logits, labels)
            return
        # Shift so that tokens < n predict token n, as the model's own loss does. Models that
        # prepend virtual tokens (prompt tuning, p-tuning) return their logits too, in front.
        logits, targets = out.logits[:, -labels.shape[1]:][:, :-1], labels[:, 1:]
        n = int((targets != IGNORE_INDEX).sum())
        # Plain cross-entropy, not out.loss: that may carry a method's regulariser (AdaLoRA adds
        # its orthogonality penalty), which would make validation losses incomparable.
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
        self.val_loss.update(loss.detach(), weight=n)
        self.val_ppl.update(logits.float(), targets)
        self.val_token_acc.update(logits.flatten(0, 1), targets.flatten())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.log("val/loss", loss, prog_bar=True)
        if self.num_classes:
            scores = {"val_accuracy": float(self.val_acc.compute()), "val_f1": float(self.val_f1.compute())}
            self.log("val/accuracy", scores["val_accuracy"], prog_bar=True)
            self.log("val/f1", scores["val_f1"])
            self.val_acc.reset()
            self.val_f1.reset()
        else:
            scores = {"val_perplexity": float(self.val_ppl.compute()),
                      "val_token_accuracy": float(self.val_token_acc.compute())}
            self.log("val/perplexity", scores["val_perplexity"])
            self.log("val/token_accuracy", scores["val_token_accuracy"])
            self.val_token_acc.reset()
        if not self.trainer.sanity_checking:
            point = {"step": int(self.global_step), "val_loss": float(loss), **scores}
            if self.val_history and self.val_history[-1]["step"] == point["step"]:
                self.val_history[-1] = point  # validated again at the same step
            else:
                self.val_history.append(point)
        self.val_loss.reset()
        self.val_ppl.reset()

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


def _vocab_size(model: torch.nn.Module) -> int:
    """Width of the model's logits (the output embedding may be padded past the tokenizer)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)
