"""L0 structured pruning (Compresso): gates, data, training loop."""
