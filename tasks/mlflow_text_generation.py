"""The MLflow model a registered pruned version is: a pyfunc that generates text from the exported HF folder.

This file is logged with every registered model (MLflow's "models from code") and run where the model is loaded,
which may be a process that has never seen darwinlm: so it imports only mlflow, transformers, torch and pandas,
never darwinlm. The exported folder carries its own modeling code (modeling_pruned.py, via `auto_map`), hence
`trust_remote_code=True`. Nothing imports this module; tasks.registry names its path.

    model = mlflow.pyfunc.load_model("models:/smollm2-pruned@current-50")
    model.predict(["The President said"], params={"max_new_tokens": 20})  # -> ["The President said ..."]
"""

import mlflow
from mlflow.pyfunc import PythonModel

# Where registry.log_text_generation_model puts the exported folder inside the MLflow model.
HF_FOLDER_ARTIFACT = "hf_model"
DEFAULT_MAX_NEW_TOKENS = 32


class PrunedTextGeneration(PythonModel):
    """Prompts in, prompt plus greedy continuation out (greedy: a registered model answers the same each time)."""

    def load_context(self, context):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = context.artifacts[HF_FOLDER_ARTIFACT]
        self.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        self.model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()

    def predict(self, context, model_input, params=None):
        import torch

        max_new_tokens = int((params or {}).get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
        texts = []
        for prompt in _prompts(model_input):
            ids = self.tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                output = self.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                             pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
            texts.append(self.tokenizer.decode(output[0], skip_special_tokens=True))
        return texts


def _prompts(model_input) -> list[str]:
    """A DataFrame's `prompt` column (or its first), a list of strings, or one string."""
    if hasattr(model_input, "columns"):
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return [str(value) for value in model_input[column]]
    if isinstance(model_input, str):
        return [model_input]
    return [str(value) for value in model_input]


mlflow.models.set_model(PrunedTextGeneration())
