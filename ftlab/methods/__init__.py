"""Fine-tuning methods: the interface (``base``), the registry, peft-backed builders
(``peft/``) and methods implemented from scratch (``native/``)."""

from ftlab.methods.base import Method, Traits, count_parameters
from ftlab.methods.registry import available, build_method, method_from_spec, register

__all__ = ["Method", "Traits", "available", "build_method", "count_parameters", "method_from_spec",
           "register"]
