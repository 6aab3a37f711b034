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

from darwinlm.core.database.structure import MODULE_KINDS
from darwinlm.core.errors import DarwinLMError

KINDS = MODULE_KINDS  # a genome holds one level per (layer, kind), attention first
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

    @classmethod
    def from_json(cls, record: dict) -> "Genome":
        """The inverse of to_json (extra keys, such as a search record's, are ignored)."""
        return cls(tuple(level for pair in zip(record["attn"], record["mlp"]) for level in pair), record["database"])


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


def cost_text(kind: str, cost: int) -> str:
    """A budget's cost as a reader reads it: kept parameters, FLOPs per token, or milliseconds of module prefill
    (latency budgets count nanoseconds)."""
    if kind == "latency":
        return f"{cost / 1e6:,.1f} ms of module prefill"
    return f"{cost:,} FLOPs per token" if kind == "flops" else f"{cost:,} parameters"


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
        prefill on the device a `latency` table from darwinlm.core.search.latency was measured on)."""
        if not 0.0 <= fraction_removed < 1.0:
            raise DarwinLMError(f"target fraction removed {fraction_removed} is outside [0, 1)", "use e.g. 0.5")
        if kind not in BUDGET_KINDS:
            raise DarwinLMError(f"unknown budget kind '{kind}'", f"use one of {', '.join(BUDGET_KINDS)}")
        if kind == "latency" and latency is None:
            raise DarwinLMError("a latency budget needs a latency table", "measure one with darwinlm.core.search.latency")
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
        if dense <= 0:
            raise DarwinLMError(f"the {kind} budget gives the dense modules no cost",
                                "re-measure the latency table (delete it next to the database) on a longer prompt")
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


def mutate(parent: tuple[int, ...], budget: Budget, rng: random.Random, max_switches: int = 3) -> tuple[int, ...]:
    """Level-switch mutation of 1..max_switches budget-neutral switches (the count is the min of two uniform
    draws, as EvoPress), then repaired to the budget (which the switches rarely leave)."""
    levels = list(parent)
    switches = min(rng.randint(1, max_switches), rng.randint(1, max_switches))
    for _ in range(switches):
        if not budget_neutral_switch(levels, budget, rng):
            break
    return budget.repair(levels, rng)


def _step_cost(budget: Budget, levels: list[int], index: int, direction: int) -> int:
    """Cost freed by one more level of module `index` (direction +1), or added by one fewer (−1)."""
    costs, level = budget.costs[index], levels[index]
    return costs[level] - costs[level + 1] if direction > 0 else costs[level - 1] - costs[level]


def budget_neutral_switch(levels: list[int], budget: Budget, rng: random.Random) -> bool:
    """One budget-neutral switch, in place: prune one module a level more, and pay for it with steps down of
    modules of one cost class (those whose step is within a quarter of a first, randomly chosen payer's), as
    many as the freed cost buys, and never past the target. Same-kind pairs are one-for-one; an MLP step buys
    several attention steps. Without this, a cheap step paired with a dear one leaves a gap that repair
    fills with random moves nothing selected. Returns False when no module can move."""
    up = [i for i, lvl in enumerate(levels) if lvl < len(budget.costs[i]) - 1]
    if not up:
        return False
    raised = rng.choice(up)
    down = [i for i, lvl in enumerate(levels) if lvl > 0 and i != raised]
    if not down:
        return False
    freed = _step_cost(budget, levels, raised, +1)
    levels[raised] += 1
    cost = budget.cost(levels)
    class_step = _step_cost(budget, levels, rng.choice(down), -1)
    while class_step > 0:
        payers = [i for i in down if levels[i] > 0 and cost + _step_cost(budget, levels, i, -1) <= budget.target
                  and abs(_step_cost(budget, levels, i, -1) - class_step) <= class_step / 4]
        below_band = cost < budget.target - budget.tolerance
        if not payers or (freed * 2 < class_step and not below_band):
            break
        payer = rng.choice(payers)
        step = _step_cost(budget, levels, payer, -1)
        freed, cost = freed - step, cost + step
        levels[payer] -= 1
    return True


def adapt_move_size(size: int, success_rate: float, largest: int) -> int:
    """The 1/5 success rule: grow the move while more than a fifth of recent generations improved the parent,
    shrink it while fewer did; within 1..largest."""
    if success_rate > 0.2:
        return min(largest, size + 1)
    if success_rate < 0.2:
        return max(1, size - 1)
    return size


def offspring(parent: tuple[int, ...], count: int, budget: Budget, rng: random.Random,
              max_tries_per_child: int = 100, max_switches: int = 3) -> list[tuple[int, ...]]:
    """`count` distinct mutants of `parent`, none equal to it (duplicates are redrawn)."""
    children: list[tuple[int, ...]] = []
    seen = {parent}
    for _ in range(count * max_tries_per_child):
        if len(children) == count:
            break
        child = mutate(parent, budget, rng, max_switches)
        if child not in seen:
            seen.add(child)
            children.append(child)
    return children
