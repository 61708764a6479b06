"""Command-line tools: `python -m ogfr_jax.tools.convert` (weights in and out)."""
