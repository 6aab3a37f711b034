import tempfile, statistics
from pathlib import Path
from darwinlm.flows.offline import apply_offline_defaults
apply_offline_defaults()
from darwinlm.core.model.loading import load_model
from darwinlm.core.database.store import Database, model_digest
from darwinlm.core.database.assembly import LiveAssembly
from darwinlm.core.export.gguf import export_gguf
from darwinlm.core.search.latency import gguf_prefill_seconds
from darwinlm.core.evaluation.timing import interleaved_medians
model, tok = load_model("smollm2")
db = Database.open("/root/.cache/darwinlm/bench-demo/databases/4e7bd64175eac781")
a = LiveAssembly(model.eval(), db, base_model_digest=model_digest(model))
L = 30
variants = {"dense": {}, "A2": {(l, "attn"): 2 for l in range(L)}, "M5": {(l, "mlp"): 5 for l in range(L)},
            "A2M5": {**{(l, "attn"): 2 for l in range(L)}, **{(l, "mlp"): 5 for l in range(L)}},
            "A3": {(l, "attn"): 3 for l in range(L)}, "M10": {(l, "mlp"): 10 for l in range(L)},
            "M5half": {(l, "mlp"): 5 for l in range(15)}, "A2half": {(l, "attn"): 2 for l in range(15)},
            "A2M5half": {**{(l, "attn"): 2 for l in range(15)}, **{(l, "mlp"): 5 for l in range(15)}}}
d = Path(tempfile.mkdtemp())
files = {}
for n, lv in variants.items():
    a.apply({**{k: 0 for k in a.levels}, **lv}); files[n] = d / f"{n}.gguf"; export_gguf(a.model, tok, str(files[n]))
prompt = [(17 + 7919 * i) % 49152 for i in range(512)]
r = interleaved_medians({n: (lambda p=p: gguf_prefill_seconds(p, prompt, 2)) for n, p in files.items()}, 7, warmup=False)
print({k: round(v, 3) for k, v in r.items()})
print("additive A2M5:", r["A2"] + r["M5"] - r["dense"], "measured", r["A2M5"])
print("additive half:", r["A2half"] + r["M5half"] - r["dense"], "measured", r["A2M5half"])
print("half vs full linear: M5half", r["M5half"], "pred", (r["dense"] + r["M5"]) / 2, "A2half", r["A2half"], "pred", (r["dense"] + r["A2"]) / 2)
