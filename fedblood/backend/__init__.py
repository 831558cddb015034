"""Per-backend choices: XLA flags, the CPU gradient rewrite, the numerics path."""
