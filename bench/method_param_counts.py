"""Trainable parameters of every method, at its default settings, on a model's architecture.

    python bench/method_param_counts.py [MODEL] [METHOD ...]     # MODEL defaults to smollm2-135m

Each method is composed exactly as a run composes it (``method=NAME model=MODEL``), applied
to the model's architecture on the meta device (no weights are read or allocated) and counted
with :func:`ftlab.methods.count_parameters`, the count a run prints. docs/methods.md quotes
its output for SmolLM2-135M.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def counts(model: str, methods: list[str]) -> list[tuple[str, int, int]]:
    from hydra import compose, initialize_config_dir

    from ftlab.settings import config_dir, settings_from_config
    from ftlab.methods import count_parameters, method_from_spec
    from ftlab.models import meta_model

    rows = []
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        for name in methods:
            cfg = compose("train", overrides=[f"method={name}", f"model={model}"], return_hydra_config=True)
            s = settings_from_config(cfg, tempfile.gettempdir())
            method = method_from_spec(s.method)
            base = meta_model(s.model)
            _, base_total = count_parameters(base)
            adapted = method.apply(base, s.max_steps if s.max_steps > 0 else 1000)
            trainable, _ = count_parameters(adapted)
            rows.append((name, trainable, base_total))
    return rows


def main(argv: list[str]) -> None:
    from ftlab.methods import available

    model = argv[0] if argv else "smollm2-135m"
    methods = argv[1:] or available()
    start = time.perf_counter()
    rows = counts(model, methods)
    print(f"{'method':16} {'trainable':>13} {'of base':>13} {'share':>9}   ({model}, default settings, meta device)")
    for name, trainable, total in rows:
        print(f"{name:16} {trainable:>13,} {total:>13,} {100 * trainable / total:>8.4f}%")
    print(f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main(sys.argv[1:])
