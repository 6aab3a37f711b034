"""darwinlm_core: structured pruning with a training-aware evolutionary search (DarwinLM, arXiv 2502.07780).

The pure algorithm as a plain library. It never imports prefect or mlflow; `tasks/` and `flows/` wrap it.
Importing it registers the pruned model classes with transformers' Auto* factories, so an exported pruned
folder loads with a plain `AutoModelForCausalLM.from_pretrained(dir)`.
"""

__version__ = "0.1.0"


def _register_pruned_classes() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from darwinlm_core.modeling_pruned import PRUNED_CLASSES

    for config_class, model_class in PRUNED_CLASSES.values():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)


_register_pruned_classes()
