"""Built-in data sets shipped with ftlab (``data.path=builtin:<name>``) and the script that made them."""
