"""itpk.peaks.local_maxima: which grid peaks the exact (linear) and zoomed (nonlinear) peak searches refine."""

from __future__ import annotations

import numpy as np

from itpk.peaks import PEAK_DIP, PEAK_TIE, local_maxima


def test_wiggles_on_a_flat_top_are_one_peak_and_leave_room_for_the_others():
    # three dose peaks; the first has solver-level wiggles (1e-10 relative) that are local maxima of the
    # grid too. Before the valley rule they filled the three slots and the third peak, the true one, was
    # never refined (70 of 200 small-molecule sets)
    t = np.linspace(0.0, 3.0, 301)
    y = sum(np.exp(-((t - c) / 0.1) ** 2) * h for c, h in ((0.5, 1.0), (1.5, 0.999), (2.5, 0.9995)))
    y[40:61] = 1.0 + 1e-10 * (-1.0) ** np.arange(21)  # a flat first top (0.4-0.6) with wiggles: local maxima
    index, valid = local_maxima(y[None, :], 3)
    assert valid.all()
    assert sorted(t[index[0]].round(2)) == [0.4, 1.5, 2.5]  # one of the wiggles, then the other two peaks
    assert t[index[0, 0]] == 0.4  # the grid's maximum first


def test_the_tie_is_wide_and_lower_peaks_stay_out():
    # a grid can put the true peak a few percent low: within PEAK_TIE (10%) it is a candidate; far lower not
    t = np.linspace(0.0, 3.0, 301)
    heights = (1.0, 1.0 - PEAK_TIE / 2, 1.0 - 2 * PEAK_TIE)
    y = sum(np.exp(-((t - c) / 0.1) ** 2) * h for c, h in zip((0.5, 1.5, 2.5), heights, strict=True))
    index, valid = local_maxima(y[None, :], 3)
    assert sorted(t[index[0][valid[0]]].round(2)) == [0.5, 1.5]


def test_a_shallow_valley_joins_two_maxima_and_rows_are_independent():
    # a dip of PEAK_DIP/10 between two maxima: one peak (the higher); a dip of 10·PEAK_DIP: two. Three rows
    # at once, one all NaN (a failed solve), which keeps only its argmax
    t = np.arange(7.0)
    shallow = np.array([0.0, 1.0, 1.0 - PEAK_DIP / 10, 1.0 - PEAK_DIP / 20, 0.5, 0.2, 0.1])
    deep = np.array([0.0, 1.0, 1.0 - 10 * PEAK_DIP, 1.0 - PEAK_DIP, 0.5, 0.2, 0.1])
    rows = np.stack([shallow, deep, np.full(7, np.nan)])
    index, valid = local_maxima(rows, 4)
    assert t[index[0][valid[0]]].tolist() == [1.0]
    assert t[index[1][valid[1]]].tolist() == [1.0, 3.0]
    assert valid[2].tolist() == [True] + [False] * (index.shape[1] - 1)


def test_equal_peaks_put_the_earliest_first_and_the_count_is_capped():
    y = np.tile([0.0, 1.0, 0.0], 10)  # ten equal peaks
    index, valid = local_maxima(y[None, :], 4)
    assert index.shape == (1, 4) and valid.all()
    assert index[0, 0] == 1  # argmax: the earliest
    assert index[0, 1:].tolist() == [4, 7, 10]  # the next ones in time (equal values: the earliest)
