"""The GPU path: device and dtype from config; Hessians, OBS, assembly, fitness, finetuning and export on a
CUDA device. The CUDA tests skip on machines without a GPU; the device/dtype resolution runs everywhere."""

import pytest
import torch

from darwinlm.core.errors import DarwinLMError
from darwinlm.core.model.loading import resolve_device, resolve_dtype

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_auto_device_and_dtype_follow_the_machine():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == expected
    assert resolve_dtype("auto", "auto") == ("bfloat16" if expected == "cuda" else "float32")
    assert resolve_dtype("float16", "cpu") == "float16"
    with pytest.raises(DarwinLMError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(DarwinLMError, match="unknown dtype"):
        resolve_dtype("int4", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DarwinLMError, match="sees no GPU"):
            resolve_device("cuda")


@cuda
def test_database_search_and_export_on_the_gpu(tmp_path):
    from darwinlm.core.data.generated import sample_rows, selection_rows
    from darwinlm.core.database.assembly import LiveAssembly
    from darwinlm.core.database.store import DatabaseConfig, build_database
    from darwinlm.core.export.huggingface import export_model
    from darwinlm.core.search.finetune import FinetuneConfig
    from darwinlm.core.search.fitness import compute_teacher
    from darwinlm.core.search.evolution import Search, SearchConfig, StageConfig
    from tests.support.tiny_models import random_token_rows, tiny_model, tiny_tokenizer

    model = tiny_model("llama").cuda()
    rows = random_token_rows(model.config.vocab_size, rows=8, seq_len=32)
    database = build_database(model, rows, str(tmp_path / "db"), calibration_digest="c",
                              config=DatabaseConfig(level_steps=3, storage_dtype="float32"))
    assembly = LiveAssembly(model, database)
    levels = {key: 2 for key in assembly.levels}
    assembly.apply(levels)
    with torch.no_grad():
        shrunk = model(rows[:2].cuda(), use_cache=False).logits
        assembly.apply(levels, masked=True)
        masked = model(rows[:2].cuda(), use_cache=False).logits
    assert torch.allclose(shrunk, masked, atol=1e-3)
    assembly.apply({key: 0 for key in levels}, rebuild=True)
    config = SearchConfig(generations=1, offspring=2, batch_size=2, stages=(StageConfig(1, 64, 32),),
                          finetune=FinetuneConfig(lr=1e-3, batch_size=2))
    generated = sample_rows(model, tiny_tokenizer(), count=3, seq_len=32, seed=0)  # sampled on the GPU
    assert generated.device.type == "cpu" and torch.equal(generated, sample_rows(model, tiny_tokenizer(), 3, 32, 0))
    selection = compute_teacher(model, selection_rows(rows[4:], generated[:2]), top_k=16)
    search = Search(assembly, compute_teacher(model, rows, top_k=16), rows, config, selection_pool=selection)
    dense_params = sum(p.numel() for p in model.parameters())
    genome = search.genome(search.run())
    assembly.apply(genome.assignment(), rebuild=True)
    # a rebuild makes new, smaller modules: every weight and buffer must be on the GPU, not only the first one
    assert {tensor.device.type for tensor in (*model.parameters(), *model.buffers())} == {"cuda"}
    assert sum(p.numel() for p in model.parameters()) < dense_params  # the searched genome is applied, shrunk
    export_model(model, tiny_tokenizer(), str(tmp_path / "export"))
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), trust_remote_code=True).eval()
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in model.parameters())
    with torch.no_grad():  # the export, run on the CPU, computes what the searched model computed on the GPU
        on_gpu = model(rows[:2].cuda(), use_cache=False).logits.float().cpu()
        assert torch.allclose(reloaded(rows[:2], use_cache=False).logits, on_gpu, atol=1e-3)
