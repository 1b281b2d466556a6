"""Methods built on peft: one :class:`~ftlab.methods.peft.wrapper.PeftMethod` per method,
made by the builders in the modules beside this one (registered when imported)."""
