"""bench.positions' tables: bands and skips measured from per-position KL of a parent and its children."""

import pytest
import torch

positions = pytest.importorskip("bench.positions")  # bench is not a dependency of the suite


def test_noise_planted_in_the_first_positions_shows_in_their_band_and_leaving_them_out_lowers_a_decision_s_se():
    generator = torch.Generator().manual_seed(0)
    genomes, rows, length = 5, 12, 64
    kl = torch.rand(genomes, rows, length, generator=generator) * 0.01 + 1.0
    kl[1:] += torch.arange(1, genomes).view(-1, 1, 1) * 0.002  # each child a little worse than the parent
    kl[:, :, :8] += torch.randn(genomes, rows, 8, generator=generator)  # the first positions: loud noise
    figures = positions.position_figures(kl)
    assert set(figures["bands"]) == {"0-8", "8-32", "32-64"}  # bands past the row's length are left out
    assert figures["bands"]["0-8"]["token_sd"] > 50 * figures["bands"]["8-32"]["token_sd"]
    assert set(figures["skips"]) == {"0", "8", "16", "32"}
    counted, skipped = figures["skips"]["0"], figures["skips"]["8"]
    assert skipped["decision_se_median"] < counted["decision_se_median"] / 5
    assert skipped["decision_abs_z_median"] > 5 * counted["decision_abs_z_median"]
    assert counted["correlation_with_every_position"] == pytest.approx(1.0)
    assert skipped["mean_abs_difference_median"] == pytest.approx(0.004, abs=0.0005)  # torch: the lower median
