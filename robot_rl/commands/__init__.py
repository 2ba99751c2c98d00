"""Command modules: what each `robot-rl <verb>` runs. The top layer: nothing in the library imports them."""
