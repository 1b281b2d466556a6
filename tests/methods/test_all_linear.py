"""``target_modules=all-linear`` means what peft means by it, for the native methods too:
every nn.Linear / Conv1D layer but the model's output layer (the language-model head) and, on a
sequence classifier, its new head, which trains whole (peft's SEQ_CLS ``modules_to_save``).
A native method that also wrapped the head would train it twice over and save it under
``classifier.base_layer.weight``, a key plain peft cannot load."""

from __future__ import annotations

import re

import pytest
import torch
from peft import PeftModel

from ftlab.methods import count_parameters

from .tiny import FAMILIES, build

# native case -> (its builder's overrides, the peft method it must adapt the same layers as)
NATIVE = {
    "lora[native]": ("lora", {"backend": "native"}, ("lora", {})),
    "vera[native]": ("vera", {"backend": "native", "r": 8}, ("vera", {"r": 8})),
    "lora_fa": ("lora_fa", {}, ("lora", {})),
    "delta_lora": ("delta_lora", {"start_step": 0}, ("lora", {})),
}


def trainable(model) -> dict[str, tuple[int, ...]]:
    """Trainable tensors by name, with peft's wrappers taken out of the names."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            name = name.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
            out[re.sub(r"\.default(?=\.|$)", "", name)] = tuple(p.shape)
    return out


def adapted_layers(names) -> set[str]:
    return {re.sub(r"\.(lora_[AB]|vera_lambda_[bd])(\.weight)?$", "", n) for n in names
            if ".lora_" in n or ".vera_lambda_" in n}


@pytest.mark.parametrize("family", list(FAMILIES.values()), ids=list(FAMILIES))
@pytest.mark.parametrize("case", list(NATIVE))
def test_native_all_linear_adapts_what_peft_adapts_and_saves_a_peft_artifact(family, case, tmp_path):
    name, overrides, (peft_name, peft_overrides) = NATIVE[case]
    overrides = {**overrides, "target_modules": "all-linear"}
    native = build(name, family=family, **overrides)
    model = native.apply(family.load(), 4)
    reference = build(peft_name, family=family, **peft_overrides, target_modules="all-linear").apply(family.load(), 4)
    got, want = trainable(model), trainable(reference)
    assert adapted_layers(got) == adapted_layers(want)
    if case in ("lora[native]", "vera[native]", "delta_lora"):  # the same tensors as peft's LoRA / VeRA
        assert got == want
        assert count_parameters(model)[0] == count_parameters(reference)[0]
    else:  # LoRA-FA: peft's LoRA less the frozen A
        assert got == {n: s for n, s in want.items() if ".lora_A" not in n}

    # A few steps, so that B (and the head) are no longer at their initial values.
    optimizer = torch.optim.AdamW(native.param_groups(model, 1e-2, 0.0))
    batch = family.batch()
    for step in range(1, 4):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        native.after_optimizer_step(model, step, 3)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    native.save(model, tmp_path)
    loaded = PeftModel.from_pretrained(family.load(), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=0, atol=1e-5)
