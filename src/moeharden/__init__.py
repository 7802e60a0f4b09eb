"""moeharden: audit and harden Mixture-of-Experts checkpoints against expert-pruning theft.

The package version below is the single source of truth; it is stamped into every report,
manifest and checkpoint the tool writes.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
