"""Genomes, exact budgets and level-switch mutation.

A genome is one level per prunable module, in the order (layer 0 attn, layer 0 mlp, layer 1 attn, ...), tied
to the database whose levels it indexes. The budget is a cost the genome must not exceed (kept parameters,
or FLOPs per token) and must stay close to: feasible genomes cost within one level step below the target.
That tolerance is the largest single-level cost step in the database, the smallest one that repair can
always reach. (EvoPress keeps the *sum of levels* fixed instead, which drifts in parameters whenever level
steps differ between modules — for SmolLM2 an MLP step is ~1.8× an attention step.)
"""

import hashlib
import json
import random
from dataclasses import dataclass

from darwinlm_core.errors import DarwinLMError

KINDS = ("attn", "mlp")
BUDGET_KINDS = ("params", "flops", "latency")


@dataclass(frozen=True)
class Genome:
    levels: tuple[int, ...]
    database: str  # digest of the database the levels index

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps([self.database, list(self.levels)]).encode()).hexdigest()[:16]

    def assignment(self) -> dict[tuple[int, str], int]:
        """{(layer, kind): level}, what LiveAssembly.apply takes."""
        return {(index // 2, KINDS[index % 2]): level for index, level in enumerate(self.levels)}

    def to_json(self) -> dict:
        """The level-file format of `darwinlm export --levels`."""
        return {"database": self.database, "attn": list(self.levels[0::2]), "mlp": list(self.levels[1::2])}


def module_keys(database) -> list[tuple[int, str]]:
    layers = database.manifest["base_model"]["num_layers"]
    return [(layer, kind) for layer in range(layers) for kind in KINDS]


def flops_per_token(database, layer: int, kind: str, level: int, seq_len: int) -> int:
    """Multiply-adds ×2 per token of one module at one level: its linears, plus attention scores and mixing."""
    params = database.params(layer, kind, level)
    if kind == "mlp" or params == 0:
        return 2 * params
    module = database.module(layer, kind)
    head_dim = database.manifest["base_model"]["head_layout"]["head_dim"]
    query_heads = (module["n_units"] - module["levels"][level]["units_removed"]) * module["unit_size"] // head_dim
    return 2 * params + 2 * 2 * seq_len * query_heads * head_dim  # QKᵀ and AV over an average causal context


@dataclass(frozen=True)
class Budget:
    """Kept cost per genome: `costs[i][level]` for module i, feasible iff target − tolerance ≤ cost ≤ target."""

    costs: tuple[tuple[int, ...], ...]
    target: int
    tolerance: int
    kind: str

    @classmethod
    def from_database(cls, database, *, fraction_removed: float, kind: str = "params", seq_len: int = 512,
                      latency: dict | None = None):
        """`kind`: params (kept parameters), flops (per token), or latency (nanoseconds of the modules'
        prefill on the device a `latency` table from darwinlm_core.latency was measured on)."""
        if not 0.0 <= fraction_removed < 1.0:
            raise DarwinLMError(f"target fraction removed {fraction_removed} is outside [0, 1)", "use e.g. 0.5")
        if kind not in BUDGET_KINDS:
            raise DarwinLMError(f"unknown budget kind '{kind}'", f"use one of {', '.join(BUDGET_KINDS)}")
        if kind == "latency" and latency is None:
            raise DarwinLMError("a latency budget needs a latency table", "measure one with darwinlm_core.latency")
        seconds = {(m["layer"], m["kind"]): m["seconds"] for m in (latency or {}).get("modules", [])}
        costs = []
        for layer, module_kind in module_keys(database):
            levels = range(database.num_levels(layer, module_kind))
            if kind == "params":
                costs.append(tuple(database.params(layer, module_kind, lvl) for lvl in levels))
            elif kind == "flops":
                costs.append(tuple(flops_per_token(database, layer, module_kind, lvl, seq_len) for lvl in levels))
            else:
                costs.append(tuple(int(round(s * 1e9)) for s in seconds[(layer, module_kind)]))
        dense = sum(c[0] for c in costs)
        tolerance = max(c[i] - c[i + 1] for c in costs for i in range(len(c) - 1))
        return cls(tuple(costs), int(round(dense * (1.0 - fraction_removed))), tolerance, kind)

    @property
    def dense(self) -> int:
        return sum(c[0] for c in self.costs)

    def cost(self, levels) -> int:
        return sum(self.costs[i][level] for i, level in enumerate(levels))

    def feasible(self, levels) -> bool:
        return self.target - self.tolerance <= self.cost(levels) <= self.target

    def uniform(self) -> tuple[int, ...]:
        """A feasible starting genome: every module at the same fraction removed, as far as levels allow, then
        repaired. Deterministic."""
        dense = self.dense
        fraction = 1.0 - self.target / dense
        levels = []
        for cost in self.costs:
            wanted = cost[0] * (1.0 - fraction)
            levels.append(min(range(len(cost)), key=lambda lvl: (abs(cost[lvl] - wanted), lvl)))
        return self.repair(levels, random.Random(0))

    def repair(self, levels, rng: random.Random) -> tuple[int, ...]:
        """Move random modules up (more pruned) while over the target, down while more than a step below."""
        levels = list(levels)
        cost = self.cost(levels)
        while cost > self.target:
            index = rng.choice([i for i, lvl in enumerate(levels) if lvl < len(self.costs[i]) - 1])
            cost += self.costs[index][levels[index] + 1] - self.costs[index][levels[index]]
            levels[index] += 1
        while cost < self.target - self.tolerance:
            options = [i for i, lvl in enumerate(levels)
                       if lvl > 0 and cost + self.costs[i][lvl - 1] - self.costs[i][lvl] <= self.target]
            index = rng.choice(options)  # non-empty: any single step down adds at most `tolerance`
            cost += self.costs[index][levels[index] - 1] - self.costs[index][levels[index]]
            levels[index] -= 1
        return tuple(levels)


def mutate(parent: tuple[int, ...], budget: Budget, rng: random.Random) -> tuple[int, ...]:
    """Level-switch mutation: 1–3 switches (min of two uniform draws, as EvoPress), each raising one module's
    level and lowering another's, then repaired to the budget."""
    levels = list(parent)
    switches = min(rng.randint(1, 3), rng.randint(1, 3))
    for _ in range(switches):
        up = [i for i, lvl in enumerate(levels) if lvl < len(budget.costs[i]) - 1]
        down = [i for i, lvl in enumerate(levels) if lvl > 0]
        if not up or not down:
            break
        raised = rng.choice(up)
        lowered = rng.choice([i for i in down if i != raised] or down)
        levels[raised] += 1
        levels[lowered] -= 1
    return budget.repair(levels, rng)


def offspring(parent: tuple[int, ...], count: int, budget: Budget, rng: random.Random,
              max_tries_per_child: int = 100) -> list[tuple[int, ...]]:
    """`count` distinct mutants of `parent`, none equal to it (duplicates are redrawn)."""
    children: list[tuple[int, ...]] = []
    seen = {parent}
    for _ in range(count * max_tries_per_child):
        if len(children) == count:
            break
        child = mutate(parent, budget, rng)
        if child not in seen:
            seen.add(child)
            children.append(child)
    return children
