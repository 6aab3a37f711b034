"""darwinlm_core: structured pruning with a training-aware evolutionary search (DarwinLM, arXiv 2502.07780).

The pure algorithm as a plain library. It never imports prefect or mlflow; `tasks/` and `flows/` wrap it.
"""

__version__ = "0.1.0"
