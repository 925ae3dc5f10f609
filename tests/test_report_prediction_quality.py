"""Prediction quality that sees sign (issue 28, item 2): sign agreement, the spread of
log|realised/predicted|, Σ realised / Σ predicted and Spearman's rank correlation on hand-made
records with zeros, sign flips and a single step, checked against values worked out by hand."""
import math

import pytest

from fastgeffect.report import (
    compare_updates,
    iqr_log_ratio,
    prediction_quality,
    sign_agreement,
    spearman,
    sum_ratio,
    update_tables,
    with_outcome,
)


def record(step, realised, gd, opt, risk="retain"):
    return {"step": step, "risk": risk, "total": 1.0, "groups": {"a": 1.0}, "update_groups": {"a": 1.0},
            "realised": realised, "predicted_gd": gd, "predicted_opt": opt}


# (predicted, realised): a wrong sign at step 0 (Adam's first step), zeros on either side, agreements
PAIRS = [(-1e-5, 2e-4), (0.0, 0.0), (0.0, 1.0), (2.0, 0.0), (1.0, 2.0), (-4.0, -1.0), (3.0, 3.0)]


def test_sign_agreement_treats_zero_as_a_sign_of_its_own():
    # agree: (0, 0), (1, 2), (-4, -1), (3, 3); disagree: the flip, zero against nonzero both ways
    assert sign_agreement(PAIRS) == 4
    assert sign_agreement([]) == 0
    assert sign_agreement([(-1.0, 1.0)]) == 0 and sign_agreement([(-1.0, -5.0)]) == 1


def test_iqr_of_log_ratio_over_steps_where_both_are_nonzero():
    # both nonzero: ratios 2e4/1 → -20 (|.|: 20), 2, 0.25, 1; logs sorted: ln .25, ln 1, ln 2, ln 20
    logs = sorted([math.log(20.0), math.log(2.0), math.log(0.25), 0.0])
    # numpy's linear quantiles of 4 points: q1 at position 0.75, q3 at 2.25
    q1 = logs[0] + 0.75 * (logs[1] - logs[0])
    q3 = logs[2] + 0.25 * (logs[3] - logs[2])
    assert iqr_log_ratio(PAIRS) == pytest.approx(q3 - q1, rel=1e-12)
    assert iqr_log_ratio([(2.0, 6.0), (-1.0, -3.0), (5.0, 15.0)]) == pytest.approx(0.0, abs=1e-12)  # one factor
    assert iqr_log_ratio([(1.0, 2.0), (0.0, 1.0), (1.0, 0.0)]) is None  # one step with both nonzero


def test_sum_ratio_and_spearman():
    pred_sum, real_sum = math.fsum(p for p, _ in PAIRS), math.fsum(r for _, r in PAIRS)
    assert sum_ratio(PAIRS) == pytest.approx(real_sum / pred_sum, rel=1e-12)
    assert sum_ratio([(1.0, 2.0), (-1.0, 3.0)]) is None  # the predictions sum to zero
    # ranks of predicted (1, 2, 3, 4) against realised (2, 1, 4, 3): 1 - 6·Σd²/(n(n²-1)) = 1 - 6·4/60
    assert spearman([(1.0, 20.0), (2.0, 10.0), (3.0, 40.0), (4.0, 30.0)]) == pytest.approx(0.6, abs=1e-12)
    assert spearman([(1.0, -1.0), (5.0, -2.0), (9.0, -3.0)]) == pytest.approx(-1.0, abs=1e-12)  # monotone down
    assert spearman([(1.0, 5.0)]) is None  # a single step
    assert spearman([(1.0, 5.0), (2.0, 5.0), (3.0, 5.0)]) is None  # a constant series
    assert spearman([]) is None


def test_prediction_quality_per_predictor_and_a_single_step():
    recs = [record(s, r, gd=-p, opt=p) for s, (p, r) in enumerate(PAIRS)]
    q = prediction_quality(with_outcome(recs, "retain"), "predicted_opt")
    assert q["steps"] == 7 and q["sign_agree"] == 4
    assert q["iqr_log_ratio"] == pytest.approx(iqr_log_ratio(PAIRS), rel=1e-12)
    assert q["sum_ratio"] == pytest.approx(sum_ratio(PAIRS), rel=1e-12)
    assert q["spearman"] == pytest.approx(spearman(PAIRS), abs=1e-12)
    # median of realised/predicted over the nonzero predictions: -20, 0, 2, 0.25, 1 → 0.25
    assert q["median_ratio"] == pytest.approx(0.25, rel=1e-12)
    g = prediction_quality(with_outcome(recs, "retain"), "predicted_gd")  # every prediction's sign flipped
    assert g["sign_agree"] == 2  # the zero-zero step and the step 0 flip now agree
    one = prediction_quality(with_outcome(recs[:1], "retain"), "predicted_opt")
    assert one == {"steps": 1, "sign_agree": 0, "iqr_log_ratio": None, "sum_ratio": pytest.approx(-20.0),
                   "spearman": None, "corr": None, "median_ratio": pytest.approx(-20.0)}


def test_the_tables_lead_with_sign_agreement():
    recs = [record(s, r, gd=-p, opt=p) for s, (p, r) in enumerate(PAIRS)]
    recs += [record(s, 1.0, 1.0, 2.0, risk="unlearn") for s in range(2)]
    table = update_tables(recs)
    head = table.splitlines()[0]
    assert head.startswith("| risk | prediction | sign agrees | IQR of log |realised/predicted| |")
    assert "| retain | update effect, −lr·u | 4/7 | " in table and "| retain | raw G-effect, −lr·e | 2/7 | " in table
    # unlearn: both steps realised 1 for a prediction of 2: IQR 0, Σ ratio 0.5, constant → no Spearman
    assert "| unlearn | update effect, −lr·u | 2/2 | 0 | 0.5 | – | 0.5 |" in table
    cmp = compare_updates({"a": recs, "b": [r for r in recs if r["risk"] == "unlearn"]})
    assert "| a | retain | update effect, −lr·u | 4/7 |" in cmp
    assert "| b | unlearn | raw G-effect, −lr·e | 2/2 | 0 | 1 | – | 1 |" in cmp
    assert "| b | retain |" not in cmp and compare_updates({"a": []}) == ""


def test_the_second_order_prediction_gets_its_row_only_where_every_step_has_it():
    """--second-order adds predicted_opt2: a third row in the tables, whose sign agreement is its own;
    a log without it (or with a step missing it) keeps the two rows."""
    records = [record(s, real, gd, opt) for s, (gd, real) in enumerate(PAIRS[4:])
               for opt in (gd,)]  # steps 0..2: (1, 2), (-4, -1), (3, 3)
    plain = update_tables(records)
    assert "½ΔθᵀHΔθ" not in plain
    with_second = [{**r, "predicted_opt2": -r["realised"]} for r in records]  # every sign wrong
    table = update_tables(with_second)
    row = next(line for line in table.splitlines() if line.startswith("| retain | update effect + ½ΔθᵀHΔθ |"))
    assert row.split(" | ")[2] == "0/3"
    assert "½ΔθᵀHΔθ" in compare_updates({"run": with_second})
    partial = with_second[:2] + [records[2]]
    assert "½ΔθᵀHΔθ" not in update_tables(partial)
