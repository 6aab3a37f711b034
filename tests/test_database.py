"""The database and live assembly: exact at level 0, shrunk == masked, GQA kept, storage round trips, resume,
and clear errors instead of a silently wrong model."""

import hashlib
import json
import random
import shutil
import threading
from pathlib import Path

import pytest
import torch

import darwinlm.core
from darwinlm.core.database import store as database_module
from darwinlm.core import uri_io
from darwinlm.core.model.arch import arch_for
from darwinlm.core.database.assembly import LiveAssembly
from darwinlm.core.database.store import Database, DatabaseBuilder, DatabaseConfig, build_database, model_digest
from darwinlm.core.model.driver import BlockDriver
from darwinlm.core.errors import DarwinLMError
from darwinlm.core.model.pruned import ZeroAttention, ZeroMLP
from tests.support.tiny_models import PLAIN_LADDERS, TINY_FAMILIES, random_token_rows, tiny_model

FAMILIES = list(TINY_FAMILIES)
GQA_MODES = ["query_heads", "kv_groups"]
# tiny models: 4 query heads, 96 MLP channels → levels 0..4 for both kinds, with the plain ladders these tests are
# written for (aligned ladders: tests/test_ladders.py)
STEPS = 4
CALIBRATION = random_token_rows(128, rows=8, seq_len=32, seed=1)
EVAL_ROWS = random_token_rows(128, rows=3, seq_len=20, seed=2)


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def db_cache(tmp_path_factory):
    """Build each (family, gqa, gqa_mode, seed) database once per module; tests get a fresh model each time."""
    base = tmp_path_factory.mktemp("databases")
    built = {}

    def get(family="llama", gqa=True, gqa_mode="query_heads", seed=0):
        key = (family, gqa, gqa_mode, seed)
        if key not in built:
            model = tiny_model(family, gqa=gqa, seed=seed)
            built[key] = build_database(
                model, CALIBRATION, str(base), calibration_digest="tiny-calibration",
                config=DatabaseConfig(**PLAIN_LADDERS, level_steps=STEPS, gqa_mode=gqa_mode),
            )
        return tiny_model(family, gqa=gqa, seed=seed), built[key]

    return get


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(EVAL_ROWS).logits


def random_levels(assembly: LiveAssembly, rng: random.Random) -> dict:
    return {key: rng.randrange(assembly.database.num_levels(*key)) for key in assembly.levels}


def block_linear_params(model) -> int:
    """Weights and biases of every block's attention and MLP linears, as the live model holds them."""
    total = 0
    for block in model.model.layers:
        for module in (block.self_attn, block.mlp):
            total += sum(p.numel() for m in module.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters())
    return total


# ---------------------------------------------------------------------------------------------- exactness


def test_level_zero_reproduces_dense_logits_exactly(db_cache):
    model, db = db_cache()
    dense = logits(model)
    assembly = LiveAssembly(model, db)
    rng = random.Random(0)
    for masked in (False, True, False):
        assembly.apply(random_levels(assembly, rng), masked=masked)
        assert not torch.equal(logits(model), dense)
    assembly.apply({key: db.num_levels(*key) - 1 for key in assembly.levels})  # everything removed
    assembly.apply({key: 0 for key in assembly.levels})
    assert torch.equal(logits(model), dense)
    assert assembly.kept_params() == db.manifest["dense_params"] == block_linear_params(model)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("gqa", [True, False], ids=["gqa", "mha"])
@pytest.mark.parametrize("gqa_mode", GQA_MODES)
def test_shrunk_and_masked_give_the_same_logits(db_cache, family, gqa, gqa_mode):
    model, db = db_cache(family, gqa, gqa_mode)
    dense = logits(model)
    assembly = LiveAssembly(model, db)
    rng = random.Random(f"{family}{gqa}{gqa_mode}")
    dense_size = sum(p.numel() for p in model.parameters())
    for _ in range(3):
        levels = random_levels(assembly, rng)
        assembly.apply(levels, masked=False)
        shrunk = logits(model)
        shrunk_size = sum(p.numel() for p in model.parameters())
        if arch_for(model).index_mapped_attention:  # compact structure, even or uneven groups
            assert block_linear_params(model) == assembly.kept_params()
        else:  # uneven groups carry a KV copy per query head
            assert block_linear_params(model) >= assembly.kept_params()
        assembly.apply(levels, masked=True)
        masked = logits(model)
        assert sum(p.numel() for p in model.parameters()) == dense_size  # masked keeps dense shapes
        assert (shrunk - masked).abs().max().item() <= 1e-4, levels
        if any(levels.values()):
            assert shrunk_size < dense_size
    # and the shrunk model really is a pruned one: away from dense at a heavy level
    assembly.apply({key: db.num_levels(*key) - 2 for key in assembly.levels}, masked=False)
    assert (logits(model) - dense).abs().max().item() > 1e-2


# ---------------------------------------------------------------------------------------------- GQA structure


def _rows(weight: torch.Tensor, heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return weight[(heads[:, None] * head_dim + torch.arange(head_dim)).flatten()]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("gqa_mode", GQA_MODES)
def test_gqa_groups_are_respected(db_cache, family, gqa_mode):
    model, db = db_cache(family, True, gqa_mode)
    dense = {name: getattr(model.model.layers[0].self_attn, name).weight.detach().clone()
             for name in ("q_proj", "k_proj", "v_proj")}
    assembly = LiveAssembly(model, db)
    layout = assembly.shapes[0]["attn"].layout
    hd, group = layout.head_dim, layout.group_size
    assert group == 2
    saw_uneven = saw_dropped_kv = False
    for level in range(db.num_levels(0, "attn") - 1):  # last level is the zero module
        assembly.apply({(0, "attn"): level})
        attention = model.model.layers[0].self_attn
        kept = torch.arange(assembly.shapes[0]["attn"].n_units) if level == 0 else db.load(0, "attn", level).kept_units
        if gqa_mode == "kv_groups":
            kv_heads = kept
            query_heads = (kept[:, None] * group + torch.arange(group)).flatten()  # whole groups, nothing else
        else:
            query_heads = kept
            kv_heads = torch.unique(kept // group)  # a KV head stays while any of its query heads remains
        assert torch.equal(attention.q_proj.weight, _rows(dense["q_proj"], query_heads, hd))
        for name in ("k_proj", "v_proj"):  # k/v stay compact: one copy per kept KV head
            assert torch.equal(getattr(attention, name).weight, _rows(dense[name], kv_heads, hd))
        counts = torch.bincount(query_heads // group)[kv_heads]
        if bool((counts == counts[0]).all()):
            assert attention.num_key_value_groups == len(query_heads) // len(kv_heads)
            assert attention.num_key_value_groups * attention.k_proj.out_features == attention.q_proj.out_features
            assert "kv_of_query" not in vars(attention)
        else:
            saw_uneven = True  # uneven groups: each kept query head reads its KV head by index
            assert attention.kv_of_query == torch.searchsorted(kv_heads, query_heads // group).tolist()
        # the manifest counts exactly what the shrunk model holds
        params = sum(p.numel() for lin in (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj)
                     for p in lin.parameters())
        assert db.params(0, "attn", level) == params
        saw_dropped_kv |= len(kv_heads) < layout.kv_heads
        with torch.no_grad():  # attention still computes the pruned function of the dense model's other layers
            assert torch.isfinite(model(EVAL_ROWS).logits).all()
    if gqa_mode == "query_heads":
        assert saw_uneven  # 3 of 4 query heads over 2 KV heads cannot be even
    else:
        assert saw_dropped_kv


def test_fused_projections_keep_the_rows_of_kept_units(db_cache):
    """Phi-3's qkv_proj stacks q; k; v and its gate_up_proj stacks gate; up. A level keeps, part by part and in
    that order, the rows of the kept units: what Phi-3's forward splits by head counts and by halves."""
    model, db = db_cache("phi3", True, "query_heads")
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    hd, group = model.config.head_dim, 2
    q, k, v = attention.qkv_proj.weight.detach().clone().split([4 * hd, 2 * hd, 2 * hd])
    gate, up = mlp.gate_up_proj.weight.detach().clone().chunk(2)
    assembly = LiveAssembly(model, db)
    for level in (1, 2):  # level 1: 3 query heads on 2 KV heads, uneven, so a KV copy per query head
        assembly.apply({(0, "attn"): level, (0, "mlp"): level})
        heads, channels = db.load(0, "attn", level).kept_units, db.load(0, "mlp", level).kept_units
        kv_heads = torch.unique(heads // group)
        if attention.num_key_value_heads != len(kv_heads):
            kv_heads = heads // group
        expected = torch.cat([_rows(q, heads, hd), _rows(k, kv_heads, hd), _rows(v, kv_heads, hd)])
        assert torch.equal(attention.qkv_proj.weight, expected)
        assert attention.config.num_attention_heads == len(heads)  # the query width Phi-3's forward slices
        assert model.config.num_attention_heads == 4  # ... read from this layer's view, not the model's config
        assert torch.equal(mlp.gate_up_proj.weight, torch.cat([gate[channels], up[channels]]))


def test_block_with_both_modules_removed_is_identity(db_cache):
    model, db = db_cache()
    assembly = LiveAssembly(model, db)
    assembly.apply({(1, "attn"): db.num_levels(1, "attn") - 1, (1, "mlp"): db.num_levels(1, "mlp") - 1})
    block = model.model.layers[1]
    assert isinstance(block.self_attn, ZeroAttention) and isinstance(block.mlp, ZeroMLP)
    assert db.params(1, "attn", db.num_levels(1, "attn") - 1) == db.params(1, "mlp", db.num_levels(1, "mlp") - 1) == 0
    driver = BlockDriver(model, EVAL_ROWS, batch_size=2)
    driver.advance()
    block_input = driver.hidden.clone()
    driver.advance()
    assert torch.equal(driver.hidden, block_input)
    # the masked form of the same assignment is the identity too, up to rounding
    assembly.apply({}, masked=True)
    driver = BlockDriver(model, EVAL_ROWS, batch_size=2)
    driver.advance()
    block_input = driver.hidden.clone()
    driver.advance()
    assert (driver.hidden - block_input).abs().max().item() <= 1e-5


def test_half_pruned_candidate_is_smaller_and_counts_match(db_cache):
    model, db = db_cache()
    dense_total = sum(p.numel() for p in model.parameters())
    assembly = LiveAssembly(model, db)
    levels = {key: 2 for key in assembly.levels}  # 2 of 4 steps: half the units of every module
    assembly.apply(levels)
    expected = sum(db.params(layer, kind, level) for (layer, kind), level in levels.items())
    assert assembly.kept_params() == expected == block_linear_params(model)
    assert 0.4 <= expected / db.manifest["dense_params"] <= 0.6
    assert sum(p.numel() for p in model.parameters()) == dense_total - (db.manifest["dense_params"] - expected)
    # the manifest's own records agree with the level ladder
    ladders = {"attn": [0, 1, 2, 3, 4], "mlp": [0, 24, 48, 72, 96]}
    for module in db.manifest["modules"]:
        assert [r["units_removed"] for r in module["levels"]] == ladders[module["kind"]]
        params = [r["params"] for r in module["levels"]]
        assert params == sorted(params, reverse=True) and params[-1] == 0


# ---------------------------------------------------------------------------------------------- storage


def _all_levels(db: Database):
    for module in db.manifest["modules"]:
        for level in range(1, len(module["levels"])):
            yield module["layer"], module["kind"], level


def test_round_trip_local_and_s3(tmp_path, s3_endpoint):
    model = tiny_model("qwen2", seed=3)
    config = DatabaseConfig(**PLAIN_LADDERS, level_steps=3, gqa_mode="kv_groups")
    local = build_database(model, CALIBRATION, str(tmp_path / "dbs"), calibration_digest="c", config=config)
    remote = build_database(model, CALIBRATION, "s3://darwinlm/dbs", calibration_digest="c", config=config)
    assert remote.root.startswith("s3://darwinlm/dbs/")
    assert remote.digest == local.digest  # content address does not depend on where it lives
    reopened = {"local": Database.open(local.root), "s3": Database.open(remote.root)}
    assert reopened["s3"].manifest == reopened["local"].manifest == local.manifest
    for layer, kind, level in _all_levels(local):
        a, b = reopened["local"].load(layer, kind, level), reopened["s3"].load(layer, kind, level)
        assert torch.equal(a.kept_units, b.kept_units) and torch.equal(a.weight, b.weight)
        assert a.units_removed == b.units_removed
    # a model assembled from the s3 copy equals one assembled from the local copy
    outputs = []
    for db in reopened.values():
        fresh = tiny_model("qwen2", seed=3)
        LiveAssembly(fresh, db).apply({(0, "attn"): 1, (1, "mlp"): 2, (2, "attn"): 2})
        outputs.append(logits(fresh))
    assert torch.equal(*outputs)
    # rebuilding on s3 reuses it
    assert build_database(model, CALIBRATION, "s3://darwinlm/dbs", calibration_digest="c", config=config).root == remote.root


@pytest.fixture
def counting_writes(monkeypatch):
    written = []
    original = uri_io.write_bytes

    def write_bytes(uri, data):
        written.append(uri)
        original(uri, data)

    monkeypatch.setattr(uri_io, "write_bytes", write_bytes)
    return written


def _files(root: str) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in Path(root).rglob("*") if p.is_file()}


def test_rebuild_reuses_and_partial_build_resumes(tmp_path, monkeypatch):
    model = tiny_model("llama", seed=4)
    digest = model_digest(model)
    build = lambda: build_database(model, CALIBRATION, str(tmp_path), calibration_digest="c",  # noqa: E731
                                   config=DatabaseConfig(**PLAIN_LADDERS, level_steps=3), base_model_digest=digest)
    db = build()
    before = _files(db.root)
    assert not any(".tmp-" in name for name in before)  # atomic writes leave no temporaries
    written, pruned = [], []
    original_write, original_prune = uri_io.write_bytes, database_module._prune_module
    monkeypatch.setattr(uri_io, "write_bytes", lambda uri, data: (written.append(uri), original_write(uri, data)))
    monkeypatch.setattr(database_module, "_prune_module",
                        lambda *args: (pruned.append(args[2].kind), original_prune(*args))[1])

    # same inputs: the finished database is reused, nothing is written or pruned
    assert build().root == db.root
    assert written == [] and pruned == []
    assert _files(db.root) == before

    # crash after layer 0 and 2 but before layer 1 and the manifest: only layer 1 is pruned again
    Path(db.root, "manifest.json").unlink()
    Path(db.root, "layers/001/layer.json").unlink()
    resumed = build()
    assert pruned == ["attn", "mlp"]
    rewritten = {uri[len(db.root) + 1 :] for uri in written}
    assert rewritten == {"manifest.json", "layers/001/layer.json"} | {
        f"layers/001/{kind}/level_{level:02d}.safetensors" for kind in ("attn", "mlp") for level in (1, 2, 3)}
    after = _files(db.root)
    assert after.keys() == before.keys()
    for name, (mtime, data) in after.items():
        assert data == before[name][1], name  # same bytes: pruning is deterministic
        if name not in rewritten:
            assert mtime == before[name][0], name  # untouched
    assert resumed.manifest == db.manifest



def test_builder_resumes_at_any_layer_in_a_new_process_and_refuses_gaps(tmp_path):
    """What the per-layer Prefect tasks rely on: a fresh builder (a new process after a crash) continues at
    layer i by walking the dense blocks before it, and gives the same bytes as an uninterrupted build."""
    model = tiny_model("llama", seed=4)
    config = DatabaseConfig(**PLAIN_LADDERS, level_steps=3)
    reference = build_database(model, CALIBRATION, str(tmp_path / "a"), calibration_digest="c", config=config)
    builder = lambda: DatabaseBuilder(model, CALIBRATION, str(tmp_path / "b"), calibration_digest="c",  # noqa: E731
                                      config=config)
    first = builder()
    first.build_layer(0)
    with pytest.raises(DarwinLMError, match="lacks layers \\[1, 2\\]"):
        first.finish()
    second = builder()  # the crash: layer 1 and 2 are built by another builder
    second.build_layer(1)
    second.build_layer(2)
    with pytest.raises(DarwinLMError, match="walked past"):
        skipping = DatabaseBuilder(model, CALIBRATION, str(tmp_path / "c"), calibration_digest="c", config=config)
        skipping.build_layer(1)  # walks layer 0 without writing it
        skipping.build_layer(0)
    assert second.finish().manifest == reference.manifest
    ours, theirs = _files(second.root), _files(reference.root)
    assert {name: data for name, (_, data) in ours.items()} == {name: data for name, (_, data) in theirs.items()}


@pytest.mark.parametrize("threads", [1, 2])
def test_upper_triangle_hessian_is_the_full_product(threads):
    """The accumulator computes only the upper triangle (in column blocks) and mirrors it. At SmolLM2's widths
    and a real batch (8 × 512 rows): the full Σ xᵀx bit for bit on one thread; on two, MKL may split a block's
    row reduction differently from the full product's, so only to float32 rounding."""
    from darwinlm.core.database.hessians import HessianAccumulator

    generator, previous = torch.Generator().manual_seed(0), torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for width, rows in ((64, 300), (576, 300), (1536, 300), (576, 4096), (1536, 4096)):
            accumulator, full, tokens = HessianAccumulator(width), torch.zeros(width, width), 0
            for _ in range(2):
                batch = torch.randn(rows // 512 or 1, min(rows, 512), width, generator=generator)
                batch = batch * torch.rand(width, generator=generator)
                flat = batch.reshape(-1, width)
                accumulator.add(batch)
                full.addmm_(flat.T, flat)
                tokens += flat.shape[0]
            expected = full * (2.0 / tokens)
            if threads == 1:
                assert torch.equal(accumulator.hessian(), expected), (width, rows)
            else:
                # a rounding of the largest entries (a lost block, say, would be off by whole entries)
                assert (accumulator.hessian() - expected).abs().max() <= 1e-6 * expected.abs().max(), (width, rows)
    finally:
        torch.set_num_threads(previous)


def _bytes(root: str) -> dict[str, bytes]:
    return {name: data for name, (_, data) in _files(root).items()}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_overlapped_build_writes_the_bytes_of_a_sequential_one(tmp_path, monkeypatch, family):
    """The OBS of layer i runs in a worker while the driver walks layer i+1; the shards, records and manifest
    are byte for byte those of the sequential build."""
    model = tiny_model(family, seed=5)
    config = DatabaseConfig(**PLAIN_LADDERS, level_steps=STEPS)
    sequential = build_database(model, CALIBRATION, str(tmp_path / "sequential"), calibration_digest="c",
                                config=config, overlap=False)
    events = []
    original_prune, original_write = database_module._prune_module, uri_io.write_bytes
    monkeypatch.setattr(database_module, "_prune_module", lambda *args: (
        events.append(("prune", threading.current_thread().name)), original_prune(*args))[1])
    monkeypatch.setattr(uri_io, "write_bytes", lambda uri, data: (
        events.append(("write", uri.rsplit("/", 2)[-2] + "/" + uri.rsplit("/", 1)[-1])),
        writers.append((uri.rsplit("/", 1)[-1], threading.current_thread().name)), original_write(uri, data)))
    writers = []
    handles = [block.register_forward_pre_hook(lambda *_, i=i: events.append(("walk", i)))
               for i, block in enumerate(model.model.layers)]
    overlapped = build_database(model, CALIBRATION, str(tmp_path / "overlapped"), calibration_digest="c",
                                config=config)
    for handle in handles:
        handle.remove()
    assert overlapped.manifest == sequential.manifest
    assert _bytes(overlapped.root) == _bytes(sequential.root)
    # it did overlap: layers 0 and 1 were pruned in the worker, and block 1 was walked before layer 0 was written
    assert [name.startswith("darwinlm-obs") for kind, name in events if kind == "prune"] == [True] * 4 + [False] * 2
    assert events.index(("walk", 1)) < events.index(("write", "000/layer.json"))
    # and the worker wrote what it pruned (shards, then the record), the last layer's in the caller
    layer_writes = [name.startswith("darwinlm-obs") for uri, name in writers if uri != "manifest.json"]
    assert layer_writes == [True] * (len(layer_writes) // 3 * 2) + [False] * (len(layer_writes) // 3)


def test_a_crash_in_an_overlapped_build_leaves_whole_layers_and_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    """A failure while layer 1 is pruned (its Hessians were collected ahead, layer 2's walk overlapped it)
    leaves layer 0 written and nothing of layer 1's record; a new build resumes to the bytes of a clean one."""
    model = tiny_model("llama", seed=6)
    config = DatabaseConfig(**PLAIN_LADDERS, level_steps=STEPS)
    clean = build_database(model, CALIBRATION, str(tmp_path / "clean"), calibration_digest="c", config=config)
    original_prune = database_module._prune_module
    calls = []

    def failing(*args):
        calls.append(args[2].kind)
        if len(calls) == 4:  # layer 1's MLP, in the worker
            raise RuntimeError("killed")
        return original_prune(*args)

    monkeypatch.setattr(database_module, "_prune_module", failing)
    build = lambda: build_database(model, CALIBRATION, str(tmp_path / "crashed"),  # noqa: E731
                                   calibration_digest="c", config=config)
    with pytest.raises(RuntimeError, match="killed"):
        build()
    root = Path(clean.root.replace(str(tmp_path / "clean"), str(tmp_path / "crashed")))
    assert (root / "layers/000/layer.json").exists()
    assert not (root / "layers/001/layer.json").exists() and not (root / "manifest.json").exists()
    monkeypatch.setattr(database_module, "_prune_module", original_prune)
    resumed = build()
    assert _bytes(resumed.root) == _bytes(clean.root)


# ------------------------------------------------------------------------------ gqa_cost_aware (option)


def _shards(root: str, kind: str) -> dict[str, bytes]:
    return {name: data for name, data in _bytes(root).items() if f"/{kind}/" in name}


def test_gqa_cost_aware_empties_kv_groups_sooner_and_leaves_mlp_bit_identical(tmp_path):
    """On this tiny llama (4 query heads over 2 KV heads) the plain greedy keeps a head in each group at two
    heads removed in every layer; ranking per parameter freed empties a group in some layer instead, which
    makes that level cheaper. MLP levels are the plain ones, byte for byte."""
    model = tiny_model("llama", seed=0)
    build = lambda **option: build_database(model, CALIBRATION, str(tmp_path), calibration_digest="c",  # noqa: E731
                                            config=DatabaseConfig(**PLAIN_LADDERS, level_steps=STEPS, **option))
    plain, aware = build(gqa_cost_aware=False), build(gqa_cost_aware=True)
    assert aware.root != plain.root  # a distinct database
    assert aware.manifest["config"]["gqa_cost_aware"] is True and aware.config.gqa_cost_aware
    assert not plain.config.gqa_cost_aware
    layers = range(len(model.model.layers))
    half = {name: [db.params(layer, "attn", 2) for layer in layers] for name, db in (("plain", plain), ("aware", aware))}
    assert half["plain"] == [plain.params(0, "attn", 0) * 2 // 3] * len(layers)  # 2 q heads, 2 kv heads kept
    assert any(a < p for a, p in zip(half["aware"], half["plain"]))
    assert all(a <= p for a, p in zip(half["aware"], half["plain"]))
    for db in (plain, aware):
        for layer in layers:
            costs = [db.params(layer, "attn", level) for level in range(db.num_levels(layer, "attn"))]
            assert all(a > b for a, b in zip(costs, costs[1:])), costs
    assert _shards(aware.root, "mlp") == _shards(plain.root, "mlp")


def test_gqa_cost_aware_does_not_change_kv_groups(tmp_path):
    """Whole KV groups all cost the same, so the option has nothing to rank by there: same shards."""
    model = tiny_model("llama", seed=0)
    build = lambda **option: build_database(model, CALIBRATION, str(tmp_path), calibration_digest="c",  # noqa: E731
                                            config=DatabaseConfig(**PLAIN_LADDERS, level_steps=STEPS,
                                                                  gqa_mode="kv_groups", **option))
    plain, aware = build(gqa_cost_aware=False), build(gqa_cost_aware=True)
    assert aware.root != plain.root
    assert _shards(aware.root, "attn") == _shards(plain.root, "attn")
    assert _shards(aware.root, "mlp") == _shards(plain.root, "mlp")


def test_databases_from_before_gqa_cost_aware_keep_their_address_and_open(tmp_path):
    """Off, the option is left out of the content address: a database cached before it existed (the same
    bytes) is found again. Its manifest lacks the key, which reads as off."""
    model = tiny_model("llama", seed=5)
    digest = model_digest(model)
    db = build_database(model, CALIBRATION, str(tmp_path), calibration_digest="c",
                        config=DatabaseConfig(**PLAIN_LADDERS, level_steps=2, gqa_cost_aware=False),
                        base_model_digest=digest)
    old_fields = {"level_steps": 2, "relative_damping": 0.01, "gqa_mode": "query_heads", "storage_dtype": "float16"}
    old_key = json.dumps([digest, "c", old_fields, database_module.code_version()], sort_keys=True)
    assert db.digest == hashlib.sha256(old_key.encode()).hexdigest()[:16]
    manifest_path = Path(db.root, "manifest.json")
    manifest = json.loads(manifest_path.read_text())
    del manifest["config"]["gqa_cost_aware"]
    manifest_path.write_text(json.dumps(manifest))
    reopened = Database.open(db.root)
    assert reopened.config == DatabaseConfig(**PLAIN_LADDERS, level_steps=2, gqa_cost_aware=False)


# ---------------------------------------------------------------------------------------------- errors


@pytest.fixture
def db_copy(db_cache, tmp_path):
    """A private copy of the llama database (tests damage it) and a fresh matching model."""
    model, db = db_cache()
    root = tmp_path / db.digest
    shutil.copytree(db.root, root)
    return model, Database.open(str(root))


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message and "\n" not in message
    return message


def test_missing_shard_is_an_error(db_copy):
    model, db = db_copy
    record = db.module(1, "mlp")["levels"][2]
    Path(db.root, record["shard"]).unlink()
    with pytest.raises(DarwinLMError, match="shard missing") as error:
        db.load(1, "mlp", 2)
    assert record["shard"] in _one_line(error)
    assembly = LiveAssembly(model, db)
    with pytest.raises(DarwinLMError, match="shard missing"):
        assembly.apply({(1, "mlp"): 2})
    assert assembly.levels[(1, "mlp")] == 0
    assert torch.equal(logits(model), logits(tiny_model("llama")))  # the model was not changed


def test_corrupted_shard_is_an_error(db_copy):
    model, db = db_copy
    shard = Path(db.root, db.module(0, "attn")["levels"][1]["shard"])
    data = bytearray(shard.read_bytes())
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])  # flip bytes inside the weight
    shard.write_bytes(bytes(data))
    with pytest.raises(DarwinLMError, match="corrupted") as error:
        db.load(0, "attn", 1)
    _one_line(error)
    with pytest.raises(DarwinLMError, match="corrupted"):
        LiveAssembly(model, db).apply({(0, "attn"): 1})


def test_failed_apply_leaves_a_consistent_model(db_copy):
    """A module at its zero level whose next shard is unreadable keeps computing what `levels` says."""
    model, db = db_copy
    assembly = LiveAssembly(model, db)
    assembly.apply({(0, "attn"): 1})  # the module's tensors now hold level 1
    assembly.apply({(0, "attn"): db.num_levels(0, "attn") - 1})  # then replaced by the zero module
    expected = logits(model)
    Path(db.root, db.module(0, "attn")["levels"][2]["shard"]).unlink()
    with pytest.raises(DarwinLMError):
        assembly.apply({(0, "attn"): 2})
    assert assembly.levels[(0, "attn")] == db.num_levels(0, "attn") - 1
    assert torch.equal(logits(model), expected)


def test_database_of_another_model_is_refused(db_cache):
    _, db = db_cache()
    other = tiny_model("llama", seed=1)
    with pytest.raises(DarwinLMError, match="another model") as error:
        db.check_model(other)
    _one_line(error)
    with pytest.raises(DarwinLMError, match="another model"):
        LiveAssembly(other, db)
    db.check_model(tiny_model("llama", seed=0))  # the right model passes


def test_database_of_another_code_version_is_refused(db_copy, monkeypatch):
    _, db = db_copy
    manifest_path = Path(db.root, "manifest.json")
    manifest = json.loads(manifest_path.read_text())
    manifest["code_version"] = "darwinlm-0.0.1/db-schema-0"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DarwinLMError, match="darwinlm-0.0.1/db-schema-0") as error:
        Database.open(db.root)
    assert "rebuild" in _one_line(error)
    # and the other way round: this database, opened by a newer darwinlm
    manifest["code_version"] = database_module.code_version()
    manifest_path.write_text(json.dumps(manifest))
    Database.open(db.root)
    monkeypatch.setattr(darwinlm.core, "__version__", "99.0.0")
    with pytest.raises(DarwinLMError, match="built by"):
        Database.open(db.root)


def test_new_code_version_builds_a_new_database(tmp_path, monkeypatch):
    model = tiny_model("llama", seed=5)
    config = DatabaseConfig(**PLAIN_LADDERS, level_steps=2)
    first = build_database(model, CALIBRATION, str(tmp_path), calibration_digest="c", config=config)
    monkeypatch.setattr(darwinlm.core, "__version__", "99.0.0")
    second = build_database(model, CALIBRATION, str(tmp_path), calibration_digest="c", config=config)
    assert second.root != first.root
    assert build_database(model, CALIBRATION, str(tmp_path), calibration_digest="other", config=config).root \
        != second.root  # calibration is part of the address too


def test_missing_or_corrupted_manifest_is_an_error(db_copy, tmp_path):
    _, db = db_copy
    with pytest.raises(DarwinLMError, match="manifest.json missing") as error:
        Database.open(str(tmp_path / "nowhere"))
    _one_line(error)
    Path(db.root, "manifest.json").write_text('{"schema_version": 1, "code_')  # torn write
    with pytest.raises(DarwinLMError, match="corrupted database manifest") as error:
        Database.open(db.root)
    _one_line(error)
    Path(db.root, "manifest.json").unlink()
    with pytest.raises(DarwinLMError, match="manifest.json missing"):
        Database.open(db.root)


def test_bad_config_and_level_are_errors(db_cache):
    with pytest.raises(DarwinLMError, match="gqa_mode"):
        DatabaseConfig(gqa_mode="heads")
    with pytest.raises(DarwinLMError, match="storage dtype"):
        DatabaseConfig(storage_dtype="int8")
    model, db = db_cache()
    with pytest.raises(DarwinLMError, match="out of range"):
        db.load(0, "attn", 0)  # level 0 is the dense module: never stored
    with pytest.raises(DarwinLMError, match="no module"):
        db.load(7, "attn", 1)
    with pytest.raises(ValueError, match="out of range"):
        LiveAssembly(model, db).apply({(0, "mlp"): db.num_levels(0, "mlp")})
