"""GGUF export run in a real llama.cpp (llama-cpp-python): logits, greedy tokens, q8_0 perplexity, tokenizer,
plus the layouts llama.cpp needs (even KV groups, zero heads in layer 0) and clear refusals.

Tolerances, against transformers on these tiny pruned random models (logits up to ~4.6 in size), with an F32
KV cache and flash attention off; measured when written (llama / qwen2):
- f32 GGUF: max |Δlogit| ≤ 1e-4 (measured 3.3e-6 / 3.6e-6);
- f16 weights: max |Δlogit| ≤ 2e-2 (7.0e-3 / 6.3e-3); greedy tokens must match exactly at f32 and f16;
- q8_0: perplexity within 1% (0.09% / 0.26%); q4_k_m (through llama.cpp's quantizer): within 10% (0.4% / 1.6%).
"""

import json

import llama_cpp  # requirements/llama.txt, installed by scripts/setup.sh: a missing build fails, never skips
import numpy as np
import pytest
import torch

from darwinlm.core.database.assembly import LiveAssembly
from darwinlm.core.database.store import DatabaseConfig, build_database
from darwinlm.core.errors import DarwinLMError
from darwinlm.core.export.gguf import GGUF_QUANTS, even_groups, export_gguf
from darwinlm.core.model.pruned import ZeroAttention, ZeroMLP
from tests.support.tiny_models import (PLAIN_LADDERS, TINY_BPE_VOCAB, random_token_rows, tiny_bpe_tokenizer, tiny_model,
                                      tiny_tokenizer)

F32_TOLERANCE, F16_TOLERANCE, Q8_PPL_TOLERANCE, Q4_PPL_TOLERANCE = 1e-4, 2e-2, 0.01, 0.10


def pruned_tiny(family: str, database_dir):
    """A 5-layer tiny model of `family` pruned in every way llama.cpp must express:
    layer 0 attention removed + MLP pruned; layer 1 query heads uneven over KV heads (3 of 4 on 2) + MLP
    pruned; layer 2 MLP removed; layers 3 and 4 (the last) removed entirely. The plain ladders: uneven groups and
    unaligned widths must still export (aligned ladders: tests/test_ladders.py)."""
    model = tiny_model(family, vocab_size=TINY_BPE_VOCAB, num_hidden_layers=5)
    rows = random_token_rows(model.config.vocab_size, rows=16, seq_len=32)
    database = build_database(model, rows, str(database_dir), calibration_digest="tiny",
                              config=DatabaseConfig(storage_dtype="float32", **PLAIN_LADDERS))
    top = lambda layer, kind: database.num_levels(layer, kind) - 1  # noqa: E731
    levels = {(0, "attn"): top(0, "attn"), (0, "mlp"): 3, (1, "attn"): 1, (1, "mlp"): 5,
              (2, "mlp"): top(2, "mlp"),
              **{(layer, kind): top(layer, kind) for layer in (3, 4) for kind in ("attn", "mlp")}}
    LiveAssembly(model, database).apply(levels)
    layers = model.model.layers
    assert isinstance(layers[0].self_attn, ZeroAttention) and isinstance(layers[2].mlp, ZeroMLP)
    assert getattr(layers[1].self_attn, "kv_of_query", None) is not None  # uneven groups
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral", "llama3"])  # llama3: rope_freqs, tied head
def pruned(request, tmp_path_factory):
    return request.param, pruned_tiny(request.param, tmp_path_factory.mktemp("db"))


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_bpe_tokenizer()


def load_llama(path, n_ctx: int = 64):
    """llama.cpp for parity: every position's logits, F32 KV cache (type 0), no flash attention, one thread."""
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, type_k=0, type_v=0,
                           flash_attn=False, n_threads=1, n_threads_batch=1, verbose=False)


def llama_logits(llm, tokens: list[int]) -> np.ndarray:
    """(len(tokens), vocab) float32 logits from a fresh evaluation of `tokens`."""
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def llama_greedy(llm, prompt: list[int], steps: int) -> list[int]:
    """Greedy continuation one token at a time (the KV-cache path)."""
    llm.reset()
    llm.eval(prompt)
    out = list(prompt)
    for _ in range(steps):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def perplexity(logits: np.ndarray, tokens: list[int]) -> float:
    """exp(mean NLL) of tokens[1:] under logits (len(tokens), vocab)."""
    log_probs = torch.log_softmax(torch.from_numpy(logits[:-1]).double(), dim=-1)
    nll = -log_probs[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])].mean()
    return float(torch.exp(nll))


@torch.no_grad()
def torch_logits(model, tokens: list[int]) -> np.ndarray:
    return model(torch.tensor([tokens])).logits[0].float().numpy()


@pytest.mark.parametrize("quant, tolerance", [("f32", F32_TOLERANCE), ("f16", F16_TOLERANCE)])
def test_gguf_logits_and_greedy_tokens_match_transformers(pruned, tokenizer, quant, tolerance, tmp_path):
    family, model = pruned
    path = export_gguf(model, tokenizer, str(tmp_path / f"{family}.gguf"), quant=quant)
    llm = load_llama(path)
    tokens = random_token_rows(TINY_BPE_VOCAB, rows=1, seq_len=40, seed=4)[0].tolist()
    difference = np.abs(llama_logits(llm, tokens) - torch_logits(model, tokens)).max()
    assert difference <= tolerance, f"{family} {quant}: max |Δlogit| {difference:.3g}"
    prompt, steps = tokens[:8], 16
    expected = tokens[:8]
    for _ in range(steps):  # greedy without a cache in transformers
        expected.append(int(torch_logits(model, expected)[-1].argmax()))
    assert llama_greedy(llm, prompt, steps) == expected


def test_gguf_q8_0_perplexity_close_to_transformers(pruned, tokenizer, tmp_path):
    family, model = pruned
    path = export_gguf(model, tokenizer, str(tmp_path / "q8.gguf"), quant="q8_0")
    f32 = export_gguf(model, tokenizer, str(tmp_path / "f32.gguf"), quant="f32")
    tokens = random_token_rows(TINY_BPE_VOCAB, rows=1, seq_len=64, seed=5)[0].tolist()
    reference = perplexity(torch_logits(model, tokens), tokens)
    quantized = perplexity(llama_logits(load_llama(path), tokens), tokens)
    assert abs(quantized / reference - 1) <= Q8_PPL_TOLERANCE, (family, quantized, reference)
    assert (tmp_path / "q8.gguf").stat().st_size < 0.5 * (tmp_path / "f32.gguf").stat().st_size, f32


def test_gguf_q4_k_m_runs_through_llama_cpps_quantizer(pruned, tokenizer, tmp_path):
    family, model = pruned
    path = export_gguf(model, tokenizer, str(tmp_path / "q4.gguf"), quant="q4_k_m")
    llm = load_llama(path)
    assert llm.metadata["general.file_type"] == "15"  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    tokens = random_token_rows(TINY_BPE_VOCAB, rows=1, seq_len=32, seed=6)[0].tolist()
    reference = perplexity(torch_logits(model, tokens), tokens)
    assert abs(perplexity(llama_logits(llm, tokens), tokens) / reference - 1) <= Q4_PPL_TOLERANCE


def test_gguf_carries_tokenizer_and_chat_template(pruned, tokenizer, tmp_path):
    family, model = pruned
    llm = load_llama(export_gguf(model, tokenizer, str(tmp_path / "tok.gguf"), quant="f16"))
    text = "Four score and seven years ago, 1863: a new nation!"
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer(text).input_ids
    assert llm.detokenize(tokenizer(text).input_ids).decode() == text
    assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template
    assert llm.token_eos() == tokenizer.eos_token_id
    # a chat reply, as the card shows, is the exported template's prompt continued greedily: the same prompt tokens
    # and the same text as a plain completion of that rendered prompt (a missing or wrong template in the GGUF
    # makes llama.cpp fall back to another chat format, which reads other tokens)
    messages = [{"role": "user", "content": "Four score"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nFour score<|im_end|>\n"
    tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    reply = llm.create_chat_completion(messages, max_tokens=3, temperature=0.0)
    plain = llm.create_completion(tokens, max_tokens=3, temperature=0.0)
    assert reply["usage"]["prompt_tokens"] == len(tokens)
    assert reply["choices"][0]["message"]["content"] == plain["choices"][0]["text"]


def test_gguf_per_layer_shapes(pruned, tokenizer, tmp_path):
    """Layer 0 keeps one zero head (llama.cpp reads the head size from layer 0), layer 1's 3 query heads on
    2 KV heads become even groups, a removed MLP is 1 wide, a removed layer is 0/0/0 — but the last keeps a
    1-wide zero FFN (llama.cpp picks the output rows in the last layer's FFN branch)."""
    import gguf

    family, model = pruned
    reader = gguf.GGUFReader(export_gguf(model, tokenizer, str(tmp_path / "m.gguf"), quant="f32"))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    heads, kv_heads, ffn = field("deci.attention.head_count"), field("deci.attention.head_count_kv"), \
        field("deci.feed_forward_length")
    assert (heads[0], kv_heads[0]) == (1, 1) and (heads[3], kv_heads[3], ffn[3]) == (0, 0, 0)
    assert (heads[4], kv_heads[4], ffn[4]) == (0, 0, 1)
    assert heads[1] % kv_heads[1] == 0 and heads[1] >= 3 and ffn[2] == 1
    assert field("deci.attention.key_length") == 16
    names = {tensor.name for tensor in reader.tensors}
    assert "blk.3.attn_q.weight" not in names and "blk.3.ffn_up.weight" not in names
    assert "blk.0.attn_q.bias" not in names  # the zero head needs no bias, even in qwen2


@pytest.mark.parametrize("kv_of_query", [[0, 0, 1], [0, 0, 0, 1, 1, 1, 1, 2], [1, 1, 0], [0, 1, 1, 1]])
def test_even_groups_keeps_every_query_on_its_kv_head(kv_of_query):
    query_heads, kv_heads = even_groups(kv_of_query)
    group = len(query_heads) // len(kv_heads)
    assert len(query_heads) % len(kv_heads) == 0
    assert sorted(q for q in query_heads if q is not None) == list(range(len(kv_of_query)))
    for position, query in enumerate(query_heads):
        if query is not None:
            assert kv_heads[position // group] == kv_of_query[query]


def test_gguf_refuses_gemma_and_unknown_quant(tmp_path):
    # Gemma 3 and Qwen3 have q/k norms and Phi-3 fused projections, which deci's Llama layer cannot express
    for family in ("gemma3_text", "qwen3", "phi3"):
        with pytest.raises(DarwinLMError, match=f"cannot express the '{family}' family") as error:
            export_gguf(tiny_model(family), tiny_bpe_tokenizer(), str(tmp_path / "g.gguf"))
        assert "\n" not in str(error.value)
    with pytest.raises(DarwinLMError, match="unknown GGUF quant type 'q3'.*f32, f16, q8_0, q4_k_m"):
        export_gguf(tiny_model("llama"), tiny_bpe_tokenizer(), str(tmp_path / "l.gguf"), quant="q3")
    assert list(tmp_path.iterdir()) == []
    assert set(GGUF_QUANTS) == {"f32", "f16", "q8_0", "q4_k_m"}


def test_gguf_failure_leaves_no_partial_file(tmp_path):
    """A tokenizer llama.cpp cannot take (word-level) fails after tensors were prepared: nothing is left."""
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DarwinLMError, match="byte-level BPE"):
        export_gguf(tiny_model("llama"), tiny_tokenizer(), str(out / "m.gguf"))
    assert list(out.iterdir()) == []


def test_gguf_refuses_an_existing_file(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"keep me")
    with pytest.raises(DarwinLMError, match="already exists"):
        export_gguf(tiny_model("llama", vocab_size=TINY_BPE_VOCAB), tiny_bpe_tokenizer(), str(tmp_path / "m.gguf"))
    assert (tmp_path / "m.gguf").read_bytes() == b"keep me"


def test_gguf_metadata_records_the_pruning(tmp_path):
    import gguf

    model = tiny_model("mistral", vocab_size=TINY_BPE_VOCAB, sliding_window=32)
    path = export_gguf(model, tiny_bpe_tokenizer(), str(tmp_path / "m.gguf"), quant="f16",
                       metadata={"name": "tiny-pruned", "database": "abc"})
    reader = gguf.GGUFReader(path)
    assert reader.fields["deci.context_length"].contents() == 32  # deci has no sliding window: cap the context
    assert reader.fields["general.name"].contents() == "tiny-pruned"
    assert json.loads(reader.fields["darwinlm.metadata"].contents())["database"] == "abc"


@pytest.fixture()
def exported_folder(tmp_path):
    """A compact export of a pruned tiny llama with a byte-level BPE tokenizer, as the compress flow writes it."""
    from darwinlm.core.export.huggingface import export_model

    model = pruned_tiny("llama", tmp_path / "db")
    export_model(model, tiny_bpe_tokenizer(), str(tmp_path / "run" / "model"), metadata={"base_model": "tiny"})
    return model, tmp_path / "run"


def test_cli_exports_gguf_from_a_folder(exported_folder, capsys):
    from darwinlm.flows.cli import main

    model, run = exported_folder
    out = run / "cli.gguf"
    assert main(["export", "--format", "gguf", "--quant", "f32", "--model", str(run / "model"), "--out", str(out)]) == 0
    assert "exported gguf f32 model" in capsys.readouterr().out
    tokens = random_token_rows(TINY_BPE_VOCAB, rows=1, seq_len=24, seed=7)[0].tolist()
    assert np.abs(llama_logits(load_llama(out), tokens) - torch_logits(model, tokens)).max() <= F32_TOLERANCE


@pytest.mark.parametrize("arguments, message", [
    (["--model", "{tmp}/missing"], "model folder {tmp}/missing does not exist"),
    (["--model", "{folder}", "--quant", "q2"], "unknown GGUF quant type 'q2'"),
    (["--model", "{folder}", "--database", "{tmp}"], "--database and --levels go together"),
    (["--model", "{gemma}"], "cannot express the 'gemma3_text' family"),
])
def test_cli_gguf_bad_input_is_one_line_and_writes_nothing(arguments, message, exported_folder, tmp_path, capsys):
    from darwinlm.flows.cli import main

    gemma = tmp_path / "gemma"
    tiny_model("gemma3_text", vocab_size=TINY_BPE_VOCAB).save_pretrained(gemma)
    tiny_bpe_tokenizer().save_pretrained(gemma)
    fill = {"tmp": str(tmp_path), "folder": str(exported_folder[1] / "model"), "gemma": str(gemma)}
    argv = ["export", "--format", "gguf", "--out", str(tmp_path / "bad.gguf")] + [a.format(**fill) for a in arguments]
    capsys.readouterr()  # drop the setup's progress bars: only the command's own output counts
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message.format(**fill) in err, err
    assert not (tmp_path / "bad.gguf").exists() and not list(tmp_path.glob(".darwinlm-gguf-*"))


def test_compress_flow_gguf_task_and_registry(exported_folder, tmp_path):
    """The flow's export-gguf task writes model-QUANT.gguf once (a re-run reuses it) and the tracker logs it on
    the registered version."""
    from darwinlm.core.config import load_preset
    from darwinlm.tasks.refs import GgufRef, ModelRef
    from darwinlm.tasks.stages import gguf_task
    from darwinlm.tasks.tracking import Tracker

    model, run = exported_folder
    values = json.loads(json.dumps(load_preset("tiny", {"export": {"gguf": "q8_0"}}).to_dict()))
    ref = gguf_task.fn(values, str(run), ModelRef(uri=str(run / "model")))
    assert ref == GgufRef(uri=str(run / "model-q8_0.gguf"), quant="q8_0")
    written = (run / "model-q8_0.gguf").stat().st_mtime_ns
    assert gguf_task.fn(values, str(run), ModelRef(uri=str(run / "model"))) == ref
    assert (run / "model-q8_0.gguf").stat().st_mtime_ns == written  # found, not redone
    tokens = random_token_rows(TINY_BPE_VOCAB, rows=1, seq_len=48, seed=8)[0].tolist()
    ppl = perplexity(llama_logits(load_llama(ref.uri), tokens), tokens)
    assert abs(ppl / perplexity(torch_logits(model, tokens), tokens) - 1) <= Q8_PPL_TOLERANCE

    tracker = Tracker(uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = tracker.start("compress")
    version = tracker.register(run_id, str(run / "model"), "tiny-pruned", {"run_uri": str(run)})
    tracker.add_gguf("tiny-pruned", version, run_id, ref.uri)
    tagged = tracker.client.get_model_version("tiny-pruned", version).tags["gguf"]
    assert tagged.endswith("/gguf/model-q8_0.gguf")
    assert [a.path for a in tracker.client.list_artifacts(run_id, "gguf")] == ["gguf/model-q8_0.gguf"]
    assert gguf_task.fn(json.loads(json.dumps(load_preset("tiny").to_dict())), str(run), ModelRef(uri="")) is None


def test_export_config_checks_the_quant_and_keeps_the_run_digest():
    from darwinlm.core.config import load_preset

    assert load_preset("tiny", {"export": {"gguf": "q4_k_m"}}).digest == load_preset("tiny").digest
    assert load_preset("smollm2-demo").export.gguf == "q8_0"
    with pytest.raises(DarwinLMError, match="unknown GGUF quant type 'q5'"):
        load_preset("tiny", {"export": {"gguf": "q5"}})
