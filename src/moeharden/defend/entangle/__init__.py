"""Entangled expert training: retrain a MoE so that pruning its experts fails sharply.

``recipe`` holds the knobs (frozen YAML data); ``losses`` the terms of the objective; ``pools``
the keep-sets the pruned sub-models are drawn from; ``resume`` the training checkpoints; ``loop``
the training loop; ``record`` the ``entangle.json`` model; ``command`` the library entry
``entangle(ckpt, EntangleSettings)`` the CLI calls.
"""
