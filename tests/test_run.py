"""itpk.run: the advice that comes with failed MCMC diagnostics."""

from __future__ import annotations

from itpk.run import ESS_FOR_R_HAT, R_HAT_MAX, R_HAT_STUCK, advice


def test_slow_mixing_chains_get_the_draws_that_reach_the_target_ess():
    # 4 x 500 draws, slowest ESS 155 (the virus fit of seed 1): 500 * 700 / 155 = 2258 -> 2300
    assert 1.043 <= R_HAT_STUCK
    out = advice(1.043, 155.0, "log_burst", 4, 500)
    assert len(out) == 1
    assert out[0].startswith("rerun with --draws 2300:")
    assert "log_burst" in out[0] and "155" in out[0] and "4 x 500" in out[0]


def test_low_ess_alone_also_gets_draws():
    # R-hat passes but the bulk ESS is under 400: 1000 * 700 / 350 = 2000 exactly
    assert advice(1.004, 350.0, "omega_V", 4, 1000)[0].startswith("rerun with --draws 2000:")


def test_disagreeing_chains_are_not_told_to_add_draws():
    out = advice(1.33, 10.0, "omega_k_efflux", 4, 500)
    assert len(out) == 1 and "disagree" in out[0] and "--draws" not in out[0]


def test_no_advice_when_diagnostics_pass_or_the_ess_is_already_high():
    assert advice(R_HAT_MAX, 900.0, "ka", 4, 1000) == []
    assert advice(1.005, 450.0, "ka", 4, 1000) == []  # passes: R-hat <= 1.01 and ESS >= 400
    assert advice(1.02, ESS_FOR_R_HAT + 1.0, "ka", 4, 1000) == []  # more draws would not be the remedy's measure
