"""slimgraph: a pruning compiler for neural networks, LLMs first."""

__version__ = "0.1.0"
