"""The loss: chunked cross-entropy against the model's own loss (transformers', peft's), token
weighting over an optimizer step through the real module and Trainer, and validation loss and
perplexity against sums computed here."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from ftlab.config import OptimizerSettings, SchedulerSettings
from ftlab.data.collate import Collator, PackedCollator
from ftlab.training.loss import _chunkable_head, loss_sum
from ftlab.methods import build_method
from ftlab.training.module import FinetuneModule
from tests.methods.tiny import BERT, GPT2, LLAMA, build


def _examples(n: int = 8, seed: int = 0) -> list[dict]:
    """Examples of different lengths (5..16 tokens) and prompt lengths (1..4 masked labels)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length, prompt = 5 + (7 * i) % 12, 1 + i % 4
        ids = torch.randint(4, 260, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def _padded() -> dict[str, torch.Tensor]:
    return Collator(pad_id=0)(_examples(4))


def _packed() -> dict[str, torch.Tensor]:
    ex = _examples(5)
    batch = PackedCollator(pad_id=0, pad_to=None)([[ex[0], ex[1]], [ex[2], ex[3], ex[4]]])
    return {k: v for k, v in batch.items() if k != "num_tokens"}


CASES = {  # id: (family, method, overrides, batch)
    "llama-lora": (LLAMA, "lora", {"dropout": 0.0}, _padded),
    "llama-full": (LLAMA, "full", {}, _padded),
    "gpt2-full-tied": (GPT2, "full", {}, _padded),
    "gpt2-lora": (GPT2, "lora", {"dropout": 0.0}, _padded),
    "llama-prompt-tuning": (LLAMA, "prompt_tuning", {}, _padded),
    "llama-p-tuning": (LLAMA, "p_tuning", {}, _padded),
    "llama-lora-packed": (LLAMA, "lora", {"dropout": 0.0}, _packed),
}


@pytest.mark.parametrize("case", list(CASES))
def test_chunked_loss_and_gradients_equal_the_models_own(case):
    """The reference is the model's own loss (transformers' mean over scored tokens; peft's,
    with -100 prepended for virtual tokens), its gradients, and argmax over all logits."""
    family, name, overrides, make_batch = CASES[case]
    torch.manual_seed(0)
    model = build(name, family=family, **overrides).apply(family.load(), 10)
    model.train()
    batch = make_batch()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    assert _chunkable_head(model) is not None  # the chunked path is the one under test

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    out = model(**batch)
    ref_grads = grads(out.loss)
    logits = out.logits.detach()[:, -batch["labels"].shape[1]:]  # without virtual tokens
    targets = batch["labels"][:, 1:]
    ref_correct = int(((logits[:, :-1].argmax(-1) == targets) & (targets != -100)).sum())

    s = loss_sum(model, inputs, batch["labels"], chunk_size=5, accuracy=True)  # ragged last chunk
    got_grads = grads(s.total / s.count)
    assert s.count == int((targets != -100).sum())
    assert float(s.total / s.count) == pytest.approx(float(out.loss), abs=1e-5)
    for n, g in ref_grads.items():
        torch.testing.assert_close(got_grads[n], g, atol=1e-5, rtol=1e-5, msg=n)
    assert int(s.correct) == ref_correct  # (the first label is -100: no virtual token predicts it)
    plain = loss_sum(model, inputs, batch["labels"], chunk_size=0, accuracy=True)
    assert int(s.correct) == int(plain.correct)


def test_heads_the_chunked_path_cannot_reproduce_use_the_plain_one():
    model = LLAMA.load()
    assert _chunkable_head(model) is not None
    model.config.final_logit_softcapping = 30.0  # Gemma 2's tanh cap on the logits
    assert _chunkable_head(model) is None
    on_head = build("lora", family=LLAMA, dropout=0.0, target_modules=["q_proj", "lm_head"]).apply(LLAMA.load(), 10)
    assert _chunkable_head(on_head) is None  # a LoRA-wrapped head computes W + BA
    batch = _padded()
    s = loss_sum(on_head, {k: v for k, v in batch.items() if k != "labels"}, batch["labels"])
    assert float(s.total / s.count) == pytest.approx(float(on_head(**batch).loss), abs=1e-5)


# ---------------------------------------------------------------- a toy head, worked by formula
class _Toy(nn.Module):
    """Embedding -> output layer, a causal LM's last two steps: logits = E[ids] W^T + b."""

    def __init__(self, vocab=11, hidden=6, bias=True, twice=False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, hidden)
        self.head = nn.Linear(hidden, vocab, bias=bias)
        self.twice = twice

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, **_):
        h = self.embed(input_ids)
        if self.twice:
            self.head(h)
        return SimpleNamespace(logits=self.head(h))


def _toy_reference(model, ids, labels):
    """sum over scored targets of logsumexp(z) - z[y], the definition, in float64."""
    z = model(input_ids=ids).logits.double()[:, :-1]
    y = labels[:, 1:]
    m = y != -100
    nll = torch.logsumexp(z, -1) - z.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
    return nll[m].sum(), int(m.sum()), int(((z.argmax(-1) == y) & m).sum())


@pytest.mark.parametrize("frozen", ["none", "head", "embed", "bias"])
def test_chunked_loss_and_gradients_on_a_toy_head_with_bias(frozen):
    """Chunks of 3 rows over 8 scored targets of 10 (ragged: 3 + 3 + 2), against the formula;
    a frozen part gets no gradient and the others keep theirs."""
    ids = torch.tensor([[1, 4, 2, 9, 3, 7], [5, 5, 8, 0, 10, 6]])
    labels = ids.clone()
    labels[0, :2] = -100
    labels[1, 5] = -100
    model = _Toy()
    if frozen != "none":
        {"head": model.head.weight, "embed": model.embed.weight, "bias": model.head.bias}[frozen].requires_grad_(False)
    expected, count, correct = _toy_reference(model, ids, labels)
    expected.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    s = loss_sum(model, {"input_ids": ids}, labels, chunk_size=3, accuracy=True)
    assert (int(s.count), int(s.correct)) == (count, correct) and count == 8
    assert float(s.total.detach()) == pytest.approx(float(expected), rel=1e-6)
    (2.0 * s.total).backward()  # the incoming gradient scales every gradient
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, 2.0 * ref[n].float(), atol=1e-5, rtol=1e-5, msg=n)
        else:
            assert p.grad is None, n
    assert "forward" not in model.head.__dict__  # the capture hook is gone again


def test_next_token_accuracy_counts_argmax_hits_in_every_chunk():
    """embed = 5 I, head = I with bias 5.5 on token 5: every position predicts token 5 (5.5 beats
    5); targets [5, 2, 2, 3], [4, 4, 5, 5] and [6, 6, 6, 6] hold three 5s, the first one first."""
    model = _Toy(vocab=8, hidden=8)
    with torch.no_grad():
        model.embed.weight.copy_(5 * torch.eye(8))
        model.head.weight.copy_(torch.eye(8))
        model.head.bias.zero_()
        model.head.bias[5] = 5.5
    ids = torch.tensor([[5, 5, 2, 2, 3], [4, 4, 4, 5, 5], [6, 6, 6, 6, 6]])
    for chunk in (0, 3, 10):  # all logits; chunks of 3 (4 x 3); 10 + 2, wider than the hidden size
        s = loss_sum(model, {"input_ids": ids}, ids, chunk_size=chunk, accuracy=True)
        assert (int(s.count), int(s.correct)) == (12, 3), chunk
        assert loss_sum(model, {"input_ids": ids}, ids, chunk_size=chunk).correct is None


def test_all_scored_slices_what_the_selection_would_select():
    """The planner's ``all_scored`` path (no data-dependent shapes) computes the same sum when
    every target is scored, with and without virtual tokens in front."""
    ids = torch.tensor([[1, 4, 2, 9, 3, 7], [5, 5, 8, 0, 10, 6]])
    model = _Toy(bias=False)
    expected, count, _ = _toy_reference(model, ids, ids)
    s = loss_sum(model, {"input_ids": ids}, ids, chunk_size=4, all_scored=True)
    assert float(s.total.detach()) == pytest.approx(float(expected), rel=1e-6) and int(s.count) == count == 10
    torch.manual_seed(0)
    prompt = build("prompt_tuning", family=LLAMA).apply(LLAMA.load(), 10)
    labels = torch.randint(4, 260, (2, 7))
    sliced = loss_sum(prompt, {"input_ids": labels}, labels, chunk_size=4, all_scored=True)
    selected = loss_sum(prompt, {"input_ids": labels}, labels, chunk_size=4)
    assert float(sliced.total) == pytest.approx(float(selected.total), rel=1e-6)
    assert int(sliced.count) == int(selected.count) == 14  # the last virtual token predicts label 0
    with_labels = loss_sum(prompt, {"input_ids": labels, "labels": labels}, labels, chunk_size=4)  # labels dropped
    assert float(with_labels.total) == pytest.approx(float(selected.total), rel=1e-6)


def test_class_labels_sum_cross_entropy_and_count_correct():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    labels = torch.tensor([0, 0, 0])
    model = _FixedLogits([logits])
    s = loss_sum(model, {"input_ids": torch.zeros(3, 2, dtype=torch.long), "labels": labels}, labels,
                 accuracy=True)
    expected = sum(math.log(math.exp(a) + math.exp(b)) - a for a, b in logits.tolist())
    assert float(s.total) == pytest.approx(expected, rel=1e-6)
    assert (int(s.count), int(s.correct)) == (3, 2)  # rows 0 and 2 put class 0 on top
    assert loss_sum(model, {"input_ids": torch.zeros(3, 2, dtype=torch.long)}, labels).correct is None


def test_the_capture_restores_a_forward_set_on_the_head_and_counts_its_calls():
    ids = torch.tensor([[1, 4, 2, 9]])
    model = _Toy()
    hooked = model.head.forward  # accelerate sets a bound forward of its own on the instance
    model.head.forward = hooked
    loss_sum(model, {"input_ids": ids}, ids, chunk_size=2)
    assert model.head.__dict__["forward"] is hooked
    with pytest.raises(RuntimeError, match="the output layer ran 2 times in one forward pass"):
        loss_sum(_Toy(twice=True), {"input_ids": ids}, ids, chunk_size=2)


@pytest.mark.parametrize("key", ["final_logit_softcapping", "logit_scale", "logits_scaling",
                                 "output_multiplier_scale"])
def test_a_logit_transform_in_the_config_turns_chunking_off(key):
    model = _Toy()
    model.config = SimpleNamespace(**{key: 1.0})
    assert _chunkable_head(model) is model.head  # 1 changes nothing
    model.config = SimpleNamespace(**{key: 2.0})
    assert _chunkable_head(model) is None
    assert _chunkable_head(nn.Linear(2, 2)) is None  # no get_output_embeddings at all


# ---------------------------------------------------------------- token weighting over a step
class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _one_step(family, examples, batch_size: int, accumulate: int, chunk: int):
    """Weights after one SGD step of full fine-tuning, and the logged losses."""
    torch.manual_seed(0)
    method = build_method("full")
    model = method.apply(family.load(), 1)
    module = FinetuneModule(model, method, OptimizerSettings(factory=torch.optim.SGD, lr=0.5),
                            SchedulerSettings(name="constant"), 1,
                            num_classes=len(family.labels) or None, loss_chunk_size=chunk)
    trainer = L.Trainer(max_steps=1, accumulate_grad_batches=accumulate, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    loader = DataLoader(_Rows(examples), batch_size=batch_size, shuffle=False, collate_fn=Collator(pad_id=0))
    trainer.fit(module, train_dataloaders=loader)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, module.train_losses


@pytest.mark.parametrize("family,chunk", [(LLAMA, 0), (LLAMA, 4), (BERT, 0)],
                         ids=["llama", "llama-chunked", "bert-cls"])
def test_accumulated_micro_batches_train_like_one_batch(family, chunk):
    """batch 2 x accumulate 4 and batch 8 x accumulate 1, same 8 examples of different
    lengths in the same order: one SGD step gives the same weights, and the logged loss is
    the token-weighted mean of the step (computed here from the model's own summed loss)."""
    examples = _examples(8)
    if family.task == "seq_cls":
        examples = [{"input_ids": e["input_ids"], "labels": i % 2} for i, e in enumerate(examples)]
    whole, whole_loss = _one_step(family, examples, 8, 1, chunk)
    accumulated, acc_loss = _one_step(family, examples, 2, 4, chunk)
    for n, w in whole.items():
        torch.testing.assert_close(accumulated[n], w, atol=1e-6, rtol=0, msg=n)
    assert [s for s, _ in acc_loss] == [1]
    assert acc_loss[0][1] == pytest.approx(whole_loss[0][1], abs=1e-5)
    torch.manual_seed(0)
    reference = family.load()
    batch = Collator(pad_id=0)(examples)
    with torch.no_grad():
        expected = reference(**{k: v for k, v in batch.items() if k != "num_tokens"}).loss
    assert whole_loss[0][1] == pytest.approx(float(expected), abs=1e-5)


def test_adalora_penalty_is_added_once_per_step_as_peft_adds_it():
    """AdaLoRA's loss is CE + orth_reg_weight * penalty in peft's forward (given labels); the
    module computes the CE without labels and adds the penalty and its gradient itself."""
    batch = _padded()
    inputs = {k: v for k, v in batch.items() if k != "num_tokens"}

    def fresh():
        torch.manual_seed(0)
        method = build("adalora", dropout=0.0)
        return method, method.apply(LLAMA.load(), 10)

    _, reference = fresh()
    reference.train()
    ref_loss = reference(**inputs).loss
    ref_loss.backward()
    method, model = fresh()
    module = FinetuneModule(model, method, OptimizerSettings(factory=torch.optim.SGD, lr=1e-3),
                            SchedulerSettings(name="constant"), 1)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None))
    assert module.train_losses[0][1] == pytest.approx(float(ref_loss), abs=1e-5)
    ref = dict(reference.named_parameters())
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref[n].grad, atol=1e-5, rtol=1e-5, msg=n)


# ---------------------------------------------------------------- validation loss and perplexity
class _FixedLogits(nn.Module):
    """A "model" whose logits are given: batch i returns ``logits[i]``."""

    def __init__(self, logits: list[torch.Tensor]):
        super().__init__()
        self.logits = logits
        self.calls = 0
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, **_):
        out = self.logits[self.calls % len(self.logits)]
        self.calls += 1
        return SimpleNamespace(logits=out)


class _NoMethod:
    name = "none"

    def param_groups(self, model, lr, weight_decay): return [{"params": list(model.parameters())}]
    def after_optimizer_step(self, model, step, total_steps): pass
    def state_dict(self): return {}
    def load_state_dict(self, state): pass


def test_validation_loss_is_token_weighted_and_perplexity_is_exp_of_it():
    """Two batches with 3 and 12 scored tokens; in the first, one target lies 120 below the
    top logit, so its probability underflows in fp32 softmax: torchmetrics' Perplexity says
    inf, exp(cross-entropy) is finite."""
    from torchmetrics.text import Perplexity

    g = torch.Generator().manual_seed(0)
    v = 16
    l1 = torch.randn(1, 4, v, generator=g)
    y1 = torch.tensor([[-100, 3, 5, 7]])
    l1[0, 0, 9] = l1[0, 0, 3] + 120.0  # position 0 predicts y1[0, 1] = 3
    l2 = torch.randn(3, 5, v, generator=g)
    y2 = torch.randint(0, v, (3, 5), generator=g)
    y2[:, 0] = -100
    batches = [{"input_ids": torch.zeros_like(y1), "labels": y1}, {"input_ids": torch.zeros_like(y2), "labels": y2}]

    sums, counts, correct = [], [], 0
    for logits, y in ((l1, y1), (l2, y2)):
        z, t = logits[:, :-1].double(), y[:, 1:]
        m = t != -100
        nll = torch.logsumexp(z, -1) - z.gather(-1, t.clamp(min=0)[..., None]).squeeze(-1)
        sums.append(float(nll[m].sum()))
        counts.append(int(m.sum()))
        correct += int(((z.argmax(-1) == t) & m).sum())
    expected = sum(sums) / sum(counts)
    assert counts == [3, 12]
    assert abs(expected - (sums[0] / 3 + sums[1] / 12) / 2) > 1  # a mean of batch means differs

    ppl = Perplexity(ignore_index=-100)
    ppl.update(l1[:, :-1], y1[:, 1:])
    ppl.update(l2[:, :-1], y2[:, 1:])
    assert math.isinf(float(ppl.compute()))

    module = FinetuneModule(_FixedLogits([l1, l2]), _NoMethod(), OptimizerSettings(factory=torch.optim.SGD, lr=0.1),
                            SchedulerSettings(name="constant"), 1)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    got = trainer.validate(module, dataloaders=DataLoader(batches, batch_size=None), verbose=False)[0]
    assert got["val/loss"] == pytest.approx(expected, rel=1e-6)
    assert got["val/perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert got["val/token_accuracy"] == pytest.approx(correct / 15)


def test_classification_validation_accuracy_macro_f1_and_one_history_point_per_step():
    """Class logits of 2 + 2 examples, worked by hand: predictions 0, 1, 0, 1 for labels 0, 0, 0, 1;
    accuracy 3/4; F1 of class 0 = 2*2 / (2*2 + 0 + 1) = 4/5, of class 1 = 2*1 / (2*1 + 1 + 0) = 2/3."""
    l1, l2 = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    l3 = torch.tensor([[0.0, 5.0]])
    y1, y2, y3 = torch.tensor([0, 0]), torch.tensor([0, 1]), torch.tensor([1])

    def ce(logits, y):
        return sum(math.log(sum(math.exp(v) for v in row)) - row[c] for row, c in zip(logits.tolist(), y.tolist()))

    module = FinetuneModule(_FixedLogits([l1, l2, l3]), _NoMethod(), OptimizerSettings(factory=torch.optim.SGD, lr=0.1),
                            SchedulerSettings(name="constant"), 1, num_classes=2)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)

    def validate(*pairs):
        batches = [{"input_ids": torch.zeros(len(y), 3, dtype=torch.long), "labels": y} for y in pairs]
        return trainer.validate(module, dataloaders=DataLoader(batches, batch_size=None), verbose=False)[0]

    got = validate(y1, y2)
    assert set(got) == {"val/loss", "val/accuracy", "val/f1"}
    assert got["val/loss"] == pytest.approx((ce(l1, y1) + ce(l2, y2)) / 4, rel=1e-6)
    assert got["val/accuracy"] == pytest.approx(3 / 4) and got["val/f1"] == pytest.approx((4 / 5 + 2 / 3) / 2)
    assert module.val_history == [{"step": 0, "val_loss": pytest.approx(got["val/loss"]),
                                   "val_accuracy": pytest.approx(3 / 4), "val_f1": pytest.approx((4 / 5 + 2 / 3) / 2)}]
    again = validate(y3)  # sums start afresh; the same step replaces its history point
    assert again["val/loss"] == pytest.approx(ce(l3, y3), rel=1e-6) and again["val/accuracy"] == 1.0
    assert len(module.val_history) == 1 and module.val_history[0]["val_loss"] == pytest.approx(ce(l3, y3), rel=1e-6)


# ---------------------------------------------------------------- the real model
@pytest.mark.slow
def test_chunked_loss_equals_the_models_own_on_smollm2():
    """SmolLM2-135M (49,152-token vocabulary, tied head) with LoRA, one batch of 2 x 48
    tokens, chunks of 32 scored tokens: loss and LoRA gradients as transformers computes them."""
    import yaml

    from ftlab.settings import config_dir
    from ftlab.config import ModelSettings
    from ftlab.models import load_model

    settings = ModelSettings(**yaml.safe_load((config_dir() / "model" / "smollm2-135m.yaml").read_text()))
    base, _ = load_model(settings)
    model = build_method("lora", r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"]).apply(base, 10)
    torch.manual_seed(0)
    for p in model.parameters():  # LoRA B starts at zero: give A's gradients something to carry
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    ids = torch.randint(100, 49152, (2, 48), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :10] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    assert _chunkable_head(model) is not None

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref = model(**batch).loss
    ref_grads = grads(ref)
    s = loss_sum(model, {k: v for k, v in batch.items() if k != "labels"}, labels, chunk_size=32)
    got = grads(s.total / s.count)
    assert float(s.total / s.count) == pytest.approx(float(ref), abs=1e-5)
    for n, g in ref_grads.items():
        torch.testing.assert_close(got[n], g, atol=1e-5, rtol=1e-4, msg=n)
