from darwinlm.core.evaluation.rank_correlation import spearman


def test_spearman_of_orders():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert spearman([1, 2, 3, 4], [9, 7, 5, 1]) == -1.0
    assert abs(spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) - 0.8) < 1e-12  # 1 - 6·Σd²/(n(n²-1)) = 1 - 6·4/120


def test_spearman_averages_tied_ranks_and_survives_constant_input():
    assert abs(spearman([1, 1, 2], [1, 2, 3]) - 0.8660254037844387) < 1e-12  # scipy.stats.spearmanr's value
    assert spearman([3, 3, 3], [1, 2, 3]) == 0.0
