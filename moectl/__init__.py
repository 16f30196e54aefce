"""moectl: a guarded experiment manager for short MoE training runs. Never imports torch."""

__version__ = "0.1.0"
