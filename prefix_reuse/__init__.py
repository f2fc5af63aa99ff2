"""prefix_reuse."""
