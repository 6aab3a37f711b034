"""Post-training's learning-rate schedule and distillation term, as finetune() applies them: a linear warmup over
`warmup_fraction` of the steps, then a cosine decay from the peak; and a loss of (1 - w) × cross-entropy +
w × KL(teacher ‖ model) per token, w = `distill_weight`. Each test builds its own fresh tiny model."""

import math

import pytest
import torch
import torch.nn.functional as F

from darwinlm.core.search.finetune import FinetuneConfig, finetune
from darwinlm.core.search.fitness import compute_teacher, kl_per_token
from tests.support.tiny_models import random_token_rows, tiny_model

VOCAB = 128  # the tiny models' vocabulary: a teacher keeping all of it gives the exact KL


@pytest.fixture
def learning_rates(monkeypatch):
    """The learning rate of every optimizer step finetune() takes (it sets the rate before each step)."""
    seen = []

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            seen.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    return seen


def test_post_training_warms_up_linearly_then_decays_by_a_cosine(single_torch_thread, learning_rates):
    rows = random_token_rows(VOCAB, rows=8, seq_len=16)
    lr = 1e-3
    finetune(tiny_model("llama"), rows, FinetuneConfig(lr=lr, batch_size=1, warmup_fraction=0.25, cosine=True))
    # 8 steps, 2 of warmup: lr/2, lr; then the cosine from lr over the 6 steps left (its last step short of zero)
    expected = [lr / 2, lr] + [lr * 0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(6)]
    assert learning_rates == pytest.approx(expected, rel=1e-12)
    peak = learning_rates.index(max(learning_rates))
    assert peak == 1 and all(a > b for a, b in zip(learning_rates[peak + 1:], learning_rates[peak + 2:]))


def test_selection_finetunes_at_a_constant_rate(single_torch_thread, learning_rates):
    """The short finetune inside selection keeps the defaults: no warmup, no decay."""
    finetune(tiny_model("llama"), random_token_rows(VOCAB, rows=4, seq_len=16), FinetuneConfig(lr=3e-4, batch_size=2))
    assert learning_rates == [3e-4, 3e-4]


def test_warmup_alone_holds_the_peak_after_it(single_torch_thread, learning_rates):
    finetune(tiny_model("llama"), random_token_rows(VOCAB, rows=4, seq_len=16),
             FinetuneConfig(lr=1e-3, batch_size=1, warmup_fraction=0.5))
    assert learning_rates == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3], rel=1e-12)


def first_loss(distill_weight: float, teacher=None, rows=None) -> float:
    """The loss of finetune()'s first step (before any update) on a fresh tiny model."""
    rows = random_token_rows(VOCAB, rows=2, seq_len=16) if rows is None else rows
    config = FinetuneConfig(lr=1e-3, batch_size=2, distill_weight=distill_weight)
    return finetune(tiny_model("llama"), rows, config, teacher=teacher)[0]


def test_the_loss_mixes_cross_entropy_and_kl_to_the_teacher_by_the_distill_weight(single_torch_thread):
    rows = random_token_rows(VOCAB, rows=2, seq_len=16)
    with torch.no_grad():
        teacher = compute_teacher(tiny_model("llama", seed=1), rows, top_k=VOCAB)  # another model
        logits = tiny_model("llama")(rows, use_cache=False).logits
    cross_entropy = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), rows[:, 1:].reshape(-1)).item()
    assert first_loss(0.0, rows=rows) == pytest.approx(cross_entropy, rel=1e-5)
    kl = first_loss(1.0, teacher, rows)  # weight 1: the KL alone, per token
    with torch.no_grad():
        assert kl == pytest.approx(kl_per_token(tiny_model("llama"), teacher), rel=1e-4)
    assert first_loss(0.3, teacher, rows) == pytest.approx(0.7 * cross_entropy + 0.3 * kl, rel=1e-5)
    # a model taught by itself is at KL 0: weight 1 leaves nothing to learn
    with torch.no_grad():
        itself = compute_teacher(tiny_model("llama"), rows, top_k=VOCAB)
    assert first_loss(1.0, itself, rows) == pytest.approx(0.0, abs=1e-5)


def test_weight_zero_trains_exactly_as_plain_cross_entropy(single_torch_thread):
    rows = random_token_rows(VOCAB, rows=4, seq_len=16)
    with torch.no_grad():
        teacher = compute_teacher(tiny_model("llama", seed=1), rows, top_k=VOCAB)
    config = FinetuneConfig(lr=1e-3, batch_size=2, distill_weight=0.0)
    plain, given_a_teacher = tiny_model("llama"), tiny_model("llama")
    assert finetune(plain, rows, config) == finetune(given_a_teacher, rows, config, teacher=teacher)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), given_a_teacher.parameters()))


def test_distillation_moves_the_model_toward_the_teacher(single_torch_thread):
    """Trained on the same rows, the distilled model ends closer to the teacher than one trained on the text
    alone, and closer than it started."""
    rows = random_token_rows(VOCAB, rows=16, seq_len=16)
    with torch.no_grad():
        teacher = compute_teacher(tiny_model("llama", seed=1), rows, top_k=VOCAB)
    before = kl_per_token(tiny_model("llama"), teacher)
    distances = {}
    for weight in (0.0, 1.0):
        student = tiny_model("llama")
        finetune(student, rows, FinetuneConfig(lr=3e-3, batch_size=2, distill_weight=weight), teacher=teacher)
        distances[weight] = kl_per_token(student, teacher)
    assert distances[1.0] < 0.8 * before
    assert distances[1.0] < 0.8 * distances[0.0]
