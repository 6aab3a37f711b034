"""Exports: both load paths in fresh processes, generate with a KV cache, padded == compact, clear refusals."""

import json
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from darwinlm.core.model.arch import arch_for, supported_model_types
from darwinlm.core.database.store import DatabaseConfig, build_database
from darwinlm.core.errors import DarwinLMError
from darwinlm.core.export.huggingface import export_model
from darwinlm.core.model.pruned import INPUT_ROWS
from tests.support.tiny_models import (PLAIN_LADDERS, TINY_FAMILIES, pruned_tiny, random_token_rows, tiny_model,
                                      tiny_tokenizer)
from darwinlm.flows.cli import main

FAMILIES = list(TINY_FAMILIES)


@pytest.fixture(autouse=True, scope="module")
def pruned_classes_registered():
    """This file's in-process reloads use plain AutoModelForCausalLM, as a user does after
    register_pruned_classes(); loads without darwinlm run in fresh processes. Registering here, not relying on an
    earlier test file to have done it, lets the file run alone."""
    from darwinlm.core import register_pruned_classes

    register_pruned_classes()


def greedy_without_cache(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    tokens = prompt
    for _ in range(steps):
        with torch.no_grad():
            next_token = model(tokens, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
    return tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_compact_export_reloads_exactly_and_generates(family, tmp_path):
    model, _, _, _ = pruned_tiny(family, tmp_path)
    rows = random_token_rows(model.config.vocab_size, rows=2, seq_len=20, seed=1)
    with torch.no_grad():
        expected = model(rows).logits
    export_model(model, tiny_tokenizer(), str(tmp_path / "out"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # registered classes, no remote code
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["layer_query_heads"][:2] == [0, 3]
    # the family's own settings survive: Llama 3.x rope scaling, tied or untied heads
    assert config["rope_parameters"] == model.config.rope_parameters
    assert config["tie_word_embeddings"] == model.config.tie_word_embeddings
    if not arch_for(model).index_mapped_attention:  # uneven groups: a KV copy per query head, the family's forward
        assert config["layer_kv_heads"][1] == 3 and config["layer_kv_of_query"] is None
    else:
        assert config["layer_kv_of_query"][1] is not None
    with torch.no_grad():
        assert (reloaded(rows).logits - expected).abs().max().item() <= 1e-5
    prompt = rows[:1, :6]
    generated = reloaded.generate(prompt, max_new_tokens=10, do_sample=False)
    assert torch.equal(generated, greedy_without_cache(reloaded, prompt, 10))  # the KV cache path agrees


def test_llama3_checkpoint_config_keeps_its_rope_scaling_through_export(tmp_path):
    """Llama 3.x checkpoints state their rope the pre-5 way ("rope_scaling" and a top-level "rope_theta"): the
    pruned export of such a checkpoint keeps rope_type llama3 and computes what the pruned model computes."""
    tiny_model("llama3").save_pretrained(tmp_path / "base")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    config["rope_scaling"] = config.pop("rope_parameters")
    config["rope_theta"] = config["rope_scaling"].pop("rope_theta")
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model, _, _, _ = pruned_tiny("llama3", tmp_path, model=base.eval())
    rows = random_token_rows(model.config.vocab_size, rows=2, seq_len=40, seed=4)
    export_model(model, tiny_tokenizer(), str(tmp_path / "out"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    rope = reloaded.config.rope_parameters
    assert rope["rope_type"] == "llama3" and rope["rope_theta"] == config["rope_theta"] and rope["factor"] == 8.0
    with torch.no_grad():
        assert (reloaded(rows).logits - model(rows).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["qwen2", "phi3"])  # q/k/v biases; fused qkv_proj and gate_up_proj
def test_padded_export_matches_compact(family, tmp_path):
    model, _, assembly, levels = pruned_tiny(family, tmp_path)
    rows = random_token_rows(model.config.vocab_size, rows=2, seq_len=16, seed=2)
    export_model(model, tiny_tokenizer(), str(tmp_path / "compact"))
    assembly.apply(levels, masked=True)
    export_model(model, tiny_tokenizer(), str(tmp_path / "padded"), export_format="padded")
    compact = AutoModelForCausalLM.from_pretrained(tmp_path / "compact")
    padded = AutoModelForCausalLM.from_pretrained(tmp_path / "padded")
    assert type(padded) is type(model)  # the plain family architecture
    with torch.no_grad():
        assert (padded(rows).logits - compact(rows).logits).abs().max().item() <= 1e-5
    size = lambda folder: (tmp_path / folder / "model.safetensors").stat().st_size  # noqa: E731
    assert size("compact") < size("padded")


FRESH_PROCESS = textwrap.dedent("""
    import sys, json, torch
    BLOCK = {block}
    if BLOCK:
        sys.modules["darwinlm"] = None  # any import of darwinlm from here on raises ImportError
    else:
        from darwinlm.core import register_pruned_classes
        register_pruned_classes()
    from transformers import AutoModelForCausalLM
    rows = torch.tensor(json.loads(sys.argv[1]))
    outputs = []
    for folder in sys.argv[2:]:
        model = AutoModelForCausalLM.from_pretrained(folder, **({kwargs}))
        with torch.no_grad():
            logits = model(rows).logits
        model.generation_config.eos_token_id = None
        generated = model.generate(rows[:1, :4], max_new_tokens=5, do_sample=False)
        outputs.append({{"logits": logits.tolist(), "generated": generated.tolist()}})
    print(json.dumps({{"outputs": outputs,
                      "darwinlm_imported": any(name.startswith("darwinlm") and sys.modules[name] is not None
                                               for name in sys.modules)}}))
""")


@pytest.mark.parametrize("families, block_darwinlm, kwargs", [
    (["llama"], True, "{'trust_remote_code': True}"),
    (["llama"], False, "{}"),
    # one process for the rest (each costs seconds); their plain load is test_compact_export_reloads_exactly...
    (["qwen3", "phi3", "llama3"], True, "{'trust_remote_code': True}"),
], ids=["trust_remote_code-without-darwinlm", "plain-after-register_pruned_classes", "newer-families-trust_remote_code"])
def test_export_loads_in_a_fresh_process(families, block_darwinlm, kwargs, tmp_path):
    rows = random_token_rows(128, rows=2, seq_len=12, seed=3)  # every tiny family has 128 tokens
    expected, folders = [], []
    for family in families:
        model, _, _, _ = pruned_tiny(family, tmp_path / family)
        with torch.no_grad():
            expected.append(model(rows).logits)
        folders.append(str(tmp_path / family / "out"))
        export_model(model, tiny_tokenizer(), folders[-1])
    script = FRESH_PROCESS.format(block=block_darwinlm, kwargs=kwargs)
    # Run from the export folders' parent with a clean sys.path entry, so the repository is not importable.
    result = subprocess.run([sys.executable, "-I", "-c", script, json.dumps(rows.tolist()), *folders],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    output = json.loads(result.stdout.strip().splitlines()[-1])
    assert output["darwinlm_imported"] is (not block_darwinlm)
    for family, logits, reloaded in zip(families, expected, output["outputs"], strict=True):
        assert (torch.tensor(reloaded["logits"]) - logits).abs().max().item() <= 1e-5, family
        assert len(reloaded["generated"][0]) == 9


def test_an_output_projection_bias_the_family_lacks_survives_export_and_gguf_refuses_it(tmp_path):
    """A pruning method may fold removed units' mean output into an o_proj / down_proj bias (FLAP does): the
    pruned config records it per layer, the export reloads with it where darwinlm is not installed, and the GGUF
    writer, which does not write such biases, refuses the model and its exported config in one line."""
    from darwinlm.core import register_pruned_classes
    from darwinlm.core.export.gguf import check_gguf_exportable

    register_pruned_classes()
    model, _, _, _ = pruned_tiny("llama", tmp_path)
    with torch.no_grad():
        o_proj, down = model.model.layers[1].self_attn.o_proj, model.model.layers[2].mlp.down_proj
        o_proj.bias = torch.nn.Parameter(torch.randn(o_proj.out_features))
        down.bias = torch.nn.Parameter(torch.randn(down.out_features))
    rows = random_token_rows(128, rows=2, seq_len=12, seed=3)
    with torch.no_grad():
        expected = model(rows).logits
    export_model(model, tiny_tokenizer(), str(tmp_path / "out"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["layer_o_proj_bias"] == [False, True, False] and config["layer_down_proj_bias"] == [False, False, True]
    result = subprocess.run([sys.executable, "-I", "-c", FRESH_PROCESS.format(block=True, kwargs="{'trust_remote_code': True}"),
                             json.dumps(rows.tolist()), str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    reloaded = json.loads(result.stdout.strip().splitlines()[-1])["outputs"][0]
    assert (torch.tensor(reloaded["logits"]) - expected).abs().max().item() <= 1e-5
    for subject in (model, AutoModelForCausalLM.from_pretrained(tmp_path / "out").config):
        with pytest.raises(DarwinLMError, match="output-projection bias") as refused:
            check_gguf_exportable(subject, "f16")
        assert "\n" not in str(refused.value)


def test_exported_folder_carries_only_its_own_code(tmp_path):
    model, _, _, _ = pruned_tiny("mistral", tmp_path)
    export_model(model, tiny_tokenizer(), str(tmp_path / "out"))
    python_files = sorted(path.name for path in (tmp_path / "out").glob("*.py"))
    assert python_files == ["modeling_pruned.py"]
    source = (tmp_path / "out" / "modeling_pruned.py").read_text()
    imports = [line for line in source.splitlines() if line.lstrip().startswith(("import ", "from "))]
    assert imports and not [line for line in imports if "darwinlm" in line]


def test_fused_layouts_agree_between_registry_and_exported_code():
    """modeling_pruned.py, which must not import darwinlm, restates what rows each fused linear stacks; it must
    say what the ArchSpec registry says (Phi-3: qkv_proj = q; k; v and gate_up_proj = gate; up)."""
    fused = [f for model_type in supported_model_types() for f in arch_for(SimpleNamespace(model_type=model_type)).fused]
    assert {f.path for f in fused} == {"qkv_proj", "gate_up_proj"}
    for entry in fused:
        assert INPUT_ROWS[entry.path] == tuple(kind for part in entry.parts for kind in INPUT_ROWS[part])


def test_export_refuses_an_occupied_destination(tmp_path):
    model, _, _, _ = pruned_tiny("llama", tmp_path)
    export_model(model, tiny_tokenizer(), str(tmp_path / "out"))
    with pytest.raises(DarwinLMError, match="already holds a model"):
        export_model(model, tiny_tokenizer(), str(tmp_path / "out"))


@pytest.fixture()
def saved_base(tmp_path):
    """A tiny base model saved as an HF folder plus a database built from exactly those weights."""
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    rows = random_token_rows(model.config.vocab_size, rows=8, seq_len=16)
    # the plain ladders: the level file below names MLP level 10 (a zero-width layer) and uneven KV groups
    database = build_database(reloaded, rows, str(tmp_path / "db"), calibration_digest="tiny",
                              config=DatabaseConfig(**PLAIN_LADDERS))
    return tmp_path / "base", database


def run_export(capsys, base, database, levels_file, out) -> tuple[int, str]:
    code = main(["export", "--model", str(base), "--database", database.root, "--levels", str(levels_file),
                 "--out", str(out)])
    return code, capsys.readouterr().err


def test_cli_export_writes_a_loadable_model(capsys, saved_base, tmp_path):
    base, database = saved_base
    levels = tmp_path / "levels.json"
    levels.write_text(json.dumps({"attn": [0, 1, 2], "mlp": [3, 0, 10], "database": database.digest}))
    code, err = run_export(capsys, base, database, levels, tmp_path / "pruned")
    assert code == 0, err
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert pruned.config.layer_intermediate_sizes[2] == 0
    assert json.loads((tmp_path / "pruned" / "darwinlm.json").read_text())["database"] == database.digest


def test_cli_evaluates_an_exported_model(capsys, saved_base, tmp_path):
    base, database = saved_base
    levels = tmp_path / "levels.json"
    levels.write_text(json.dumps({"attn": [1, 2, 4], "mlp": [3, 0, 10]}))
    assert run_export(capsys, base, database, levels, tmp_path / "pruned")[0] == 0
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index in range(30):
        (corpus / f"doc_{index}.txt").write_text(f"Document {index} says the union is strong. " * 6)
    code = main(["evaluate", "--model", str(tmp_path / "pruned"), "--text", str(corpus), "--seq-len", "16",
                 "--windows", "2", "--json"])
    output = capsys.readouterr().out
    assert code == 0 and json.loads(output)["results"]["in_domain"]["perplexity"] > 1


@pytest.mark.parametrize("content, message", [
    ({"attn": [0, 1], "mlp": [0, 0]}, "list of 3 levels"),
    ({"attn": [0, 1, 99], "mlp": [0, 0, 0]}, "not in 0.."),
    ({"attn": [0, 0, 0], "mlp": [0, 0, 0], "database": "0123456789abcdef"}, "chosen for database"),
    ("not json", "not JSON"),
])
def test_cli_export_refuses_levels_that_do_not_match_the_database(capsys, saved_base, tmp_path, content, message):
    base, database = saved_base
    levels = tmp_path / "levels.json"
    levels.write_text(content if isinstance(content, str) else json.dumps(content))
    code, err = run_export(capsys, base, database, levels, tmp_path / "pruned")
    assert code == 1 and message in err.strip().splitlines()[-1]
    assert not (tmp_path / "pruned").exists()  # nothing half-written


def test_cli_export_refuses_a_database_of_another_model(capsys, saved_base, tmp_path):
    _, database = saved_base
    other = tmp_path / "other"
    tiny_model("llama", seed=7).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    levels = tmp_path / "levels.json"
    levels.write_text(json.dumps({"attn": [0, 0, 0], "mlp": [0, 0, 0]}))
    code, err = run_export(capsys, other, database, levels, tmp_path / "pruned")
    assert code == 1 and "built from another model" in err.strip().splitlines()[-1]
    assert not (tmp_path / "pruned").exists()
