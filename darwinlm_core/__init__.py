"""darwinlm.core: structured pruning with a training-aware evolutionary search (DarwinLM, arXiv 2502.07780).

The pure algorithm as a plain library, grouped by concern:
  model/       architecture registry, the one layer-by-layer driver, the pruned model classes, loading
  database/    Hessians, OBS pruning, unit structure, the on-disk database of pruned levels, live assembly
  search/      genomes, fitness, in-search finetune, informed start, the evolutionary search, latency tables
  export/      Hugging Face and GGUF export, model cards
  data/        corpus sources, disjoint splits, token blocks
  evaluation/  perplexity and the offline lm-eval task files
It never imports prefect or mlflow; `darwinlm.tasks` and `darwinlm.flows` wrap it. Importing it is cheap and
has no side effects: nothing here imports transformers until a function needs it.
"""

__version__ = "0.1.0"

# The one name users import from the package itself (it lives with the model code it registers).
from darwinlm.core.model.registration import register_pruned_classes  # noqa: E402, F401
