"""Blueprints, one module per trigger family; each hands events to `shared` and shapes the answer."""
