"""darwinlm.core: structured pruning with a training-aware evolutionary search (DarwinLM, arXiv 2502.07780).

The pure algorithm as a plain library, grouped by concern:
  model/       architecture registry, the one layer-by-layer driver, assembly of pruned models, loading
  database/    Hessians, OBS pruning, unit structure, the on-disk database of pruned levels
  search/      genomes, fitness, in-search finetune, informed start, the evolutionary search, latency tables
  export/      Hugging Face and GGUF export, model cards
  data/        corpus sources, disjoint splits, token blocks
  evaluation/  perplexity and the offline lm-eval task files
It never imports prefect or mlflow; `darwinlm.tasks` and `darwinlm.flows` wrap it. Importing it is cheap and
has no side effects: nothing here imports transformers until a function needs it.
"""

__version__ = "0.1.0"


def register_pruned_classes() -> None:
    """Register the pruned model classes with transformers' Auto* factories, so an exported pruned folder
    loads with a plain `AutoModelForCausalLM.from_pretrained(dir)`. Idempotent and cheap after the first call.

    Explicit rather than an import side effect: importing transformers pulls in huggingface_hub, which reads
    its offline settings once, and entry points must set those first (darwinlm.flows.offline)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from darwinlm.core.model.pruned import PRUNED_CLASSES

    for config_class, model_class in PRUNED_CLASSES.values():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)
