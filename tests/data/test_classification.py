"""Sequence classification: a head with one output per label, accuracy and macro F1."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from ftlab.config import ModelSettings, OptimizerSettings, SchedulerSettings
from ftlab.data.collate import Collator
from ftlab.methods.base import PlainHooks
from ftlab.methods import build_method
from ftlab.models import load_model, meta_model
from ftlab.training.module import FinetuneModule

from .helpers import datamodule, write_jsonl

LLAMA = {"model_type": "llama", "vocab_size": 272, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
BERT = {"model_type": "bert", "vocab_size": 272, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 128}


def seq_cls(arch, targets=("q_proj", "v_proj")) -> ModelSettings:
    return ModelSettings(name=f"tiny-{arch['model_type']}", source="random", task="seq_cls", arch=arch,
                         target_modules=list(targets))


@pytest.mark.parametrize("arch,head", [(LLAMA, "score"), (BERT, "classifier")])
def test_decoder_and_encoder_heads_get_one_output_per_label(tmp_path, arch, head):
    path = write_jsonl(tmp_path / "s.jsonl", [{"text": t, "label": lab} for t, lab in
                                              [("good", "pos"), ("bad", "neg"), ("so so", "mid")]])
    settings = seq_cls(arch)
    assert type(meta_model(settings)).__name__.endswith("ForSequenceClassification")
    dm = datamodule(path, format="classification", val_path=str(path))
    model, tok = load_model(settings, labels=dm.labels)
    assert model.config.num_labels == 3 and model.config.id2label == {0: "mid", 1: "neg", 2: "pos"}
    dm.tokenizer = tok
    dm.setup()
    batch = Collator(tok.pad_token_id)(dm.train_set)
    out = model(**{k: v for k, v in batch.items() if k != "num_tokens"})
    assert out.logits.shape == (3, 3) and out.loss.ndim == 0
    assert getattr(model, head).weight.shape[0] == 3


def test_lora_trains_and_saves_the_new_head(tmp_path):
    """peft gets the SEQ_CLS task: the randomly initialised head is trained and saved."""
    from peft import PeftModel

    model, _ = load_model(seq_cls(LLAMA), labels=["a", "b"])
    method = build_method("lora", r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    method.check(meta_model(seq_cls(LLAMA)))
    peft_model = method.apply(model, total_steps=1)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable) and any("lora_A" in n for n in trainable)
    with torch.no_grad():  # stand-in for training: move every trainable tensor
        for n, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(0.5)
    method.save(peft_model, tmp_path / "adapter")
    x = torch.tensor([[5, 6, 7, 8]])
    base, _ = load_model(seq_cls(LLAMA), labels=["a", "b"])  # same seed: the same frozen base
    untrained = base(input_ids=x).logits
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    torch.testing.assert_close(loaded(input_ids=x).logits, peft_model.eval()(input_ids=x).logits)
    assert (loaded(input_ids=x).logits - untrained).abs().max() > 0.1


class _Identity(PlainHooks):
    """A method that trains everything (enough to drive the module)."""

    name = "identity"

    def check(self, model): pass
    def apply(self, model, total_steps): return model
    def param_groups(self, model, lr, weight_decay): return [{"params": list(model.parameters()), "lr": lr}]
    def after_optimizer_step(self, model, step, total_steps): pass
    def state_dict(self): return {}
    def load_state_dict(self, state): pass


def test_module_reports_accuracy_and_macro_f1():
    torch.manual_seed(0)
    model, tok = load_model(seq_cls(LLAMA), labels=["a", "b", "c"])
    g = torch.Generator().manual_seed(0)
    examples = [{"input_ids": torch.randint(4, 200, (3 + i % 4,), generator=g).tolist(), "labels": i % 3}
                for i in range(24)]
    loader = DataLoader(examples, batch_size=8, collate_fn=Collator(tok.pad_token_id))
    module = FinetuneModule(model, _Identity(), OptimizerSettings(factory=torch.optim.SGD, lr=0.1),
                            SchedulerSettings(name="constant"), total_steps=1, num_classes=3)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    metrics = trainer.validate(module, dataloaders=loader, verbose=False)[0]

    model.eval()
    with torch.no_grad():
        preds, labels = [], []
        for batch in loader:
            preds.append(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1))
            labels.append(batch["labels"])
    preds, labels = torch.cat(preds), torch.cat(labels)
    accuracy = float((preds == labels).float().mean())
    f1s = []
    for c in range(3):
        tp = int(((preds == c) & (labels == c)).sum())
        fp, fn = int(((preds == c) & (labels != c)).sum()), int(((preds != c) & (labels == c)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    assert metrics["val/accuracy"] == pytest.approx(accuracy)
    assert metrics["val/f1"] == pytest.approx(sum(f1s) / 3)
    assert "val/perplexity" not in metrics and module.val_history[-1]["val_accuracy"] == pytest.approx(accuracy)
