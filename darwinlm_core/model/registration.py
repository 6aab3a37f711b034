"""Registering darwinlm's pruned model classes with transformers' Auto* factories."""


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
