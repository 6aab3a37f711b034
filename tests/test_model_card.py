"""Every export folder carries a model card (README.md), and its tokenizer loads without a custom-code prompt."""

import json
import subprocess
import sys

from darwinlm.core.export.huggingface import export_model
from darwinlm.core.export.model_card import write_model_card
from tests.support.tiny_models import tiny_bpe_tokenizer, tiny_model, TINY_BPE_VOCAB
from tests.support.tiny_models import pruned_tiny


def test_export_writes_a_model_card(tmp_path):
    model, database, assembly, _ = pruned_tiny("llama", tmp_path)
    metadata = {"base_model": "tiny-llama", "base_model_digest": "f00d", "database": database.digest,
                "kept_block_params": assembly.kept_params(), "dense_block_params": database.manifest["dense_params"]}
    export_model(model, tiny_bpe_tokenizer(), str(tmp_path / "out"), metadata=metadata)
    card = (tmp_path / "out" / "README.md").read_text()
    kept = assembly.kept_params()
    for expected in ("**tiny-llama**", "`f00d`", database.digest, f"{kept:,} of", "| 0 | 0 | 0 |",
                     "trust_remote_code=True", "darwinlm export --format gguf", "from llama_cpp import Llama",
                     "Not measured"):
        assert expected in card, expected


def test_model_card_shows_figures_before_and_after(tmp_path):
    export_model(tiny_model("qwen2"), tiny_bpe_tokenizer(), str(tmp_path / "out"), metadata={"base_model": "q"})
    evaluation = {"dense": {"ppl_sotu": 24.0, "ppl_sotu_se": 0.52, "ppl_moby": 60.0, "kl": 0.0},
                  "pruned": {"ppl_sotu": 31.5, "ppl_sotu_se": 0.8, "ppl_moby": 90.0, "kl": 0.7},
                  "labels": {"sotu": "State of the Union 1990+", "moby": "Moby-Dick"}, "in_domain": "sotu"}
    write_model_card(str(tmp_path / "out"), evaluation=evaluation)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| perplexity, State of the Union 1990+ (in domain) | 24 ± 0.52 | 31.5 ± 0.8 |" in card
    assert "| perplexity, Moby-Dick (out of domain) | 60 | 90 |" in card
    assert "| KL to the dense model per token | 0 | 0.7 |" in card
    # an evaluation recorded without its sets' labels still shows each perplexity, by its set's name
    write_model_card(str(tmp_path / "out"), evaluation={side: evaluation[side] for side in ("dense", "pruned")})
    assert "| perplexity, moby | 60 | 90 |" in (tmp_path / "out" / "README.md").read_text()


LOAD_TOKENIZER = """
import sys
if sys.argv[2] == "fast":  # no darwinlm, no custom code
    sys.modules["darwinlm"] = None
    from transformers import PreTrainedTokenizerFast as Loader
else:  # the registered classes make config.json's model type known: AutoTokenizer asks nothing
    from darwinlm.core import register_pruned_classes
    register_pruned_classes()
    from transformers import AutoTokenizer as Loader
tokenizer = Loader.from_pretrained(sys.argv[1])
print(tokenizer("Four score").input_ids, tokenizer.chat_template is not None)
"""


def test_exported_tokenizer_loads_without_a_prompt(tmp_path):
    """AutoTokenizer reads config.json through AutoConfig before any tokenizer file, and the custom model type
    with auto_map.AutoConfig is what asks about remote code; the card therefore names the two prompt-free ways."""
    tokenizer = tiny_bpe_tokenizer()
    export_model(tiny_model("llama", vocab_size=TINY_BPE_VOCAB), tokenizer, str(tmp_path / "out"))
    expected = f"{tokenizer('Four score').input_ids} True"
    for mode in ("fast", "auto-after-import"):
        result = subprocess.run([sys.executable, "-c", LOAD_TOKENIZER, str(tmp_path / "out"), mode],
                                capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120,
                                cwd=str(tmp_path) if mode == "fast" else None)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "Do you wish to run the custom code" not in result.stdout + result.stderr
        assert result.stdout.strip().splitlines()[-1] == expected
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["tokenizer_class"]
