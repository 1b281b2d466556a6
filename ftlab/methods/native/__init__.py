"""Methods implemented from scratch (no library has them, or as readable references).

Each module registers its builders when the registry imports it: ``delta_lora``, ``lora_fa``
and ``adapter``; native LoRA and VeRA are the ``method.backend=native`` branches of the
``lora`` and ``vera`` builders (``ftlab/methods/peft/lora.py``).
"""
