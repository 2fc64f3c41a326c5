"""Routing metrics against values computed by hand on small arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from routers.data import DataError
from routers.metrics import apgr, cpt, curve_shares, roc_auc, routing_curve


def test_roc_auc_by_hand():
    # positives 0.9, 0.5; negatives 0.1, 0.5 -> pairs: (0.9>0.1)(0.9>0.5)(0.5>0.1)(0.5=0.5 -> 1/2) = 3.5/4
    assert roc_auc([0, 1, 1, 0], [0.1, 0.9, 0.5, 0.5]) == pytest.approx(0.875)
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert math.isnan(roc_auc([1, 1], [0.1, 0.2]))


def test_roc_auc_rejects_bad_input():
    with pytest.raises(DataError, match="labels"):
        roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(DataError, match="NaN"):
        roc_auc([0, 1], [0.1, float("nan")])
    with pytest.raises(DataError, match="has 2 values"):
        roc_auc([0, 1], [0.1])


SMALL = [1, 0, 0, 1]
LARGE = [1, 1, 1, 0]
P = [0.9, 0.1, 0.2, 0.8]  # hardest first: idx1, idx2, idx3, idx0


def test_routing_curve_by_hand():
    # k=0: small acc 2/4; 25%: idx1 -> large (+1) = 3/4; 50%: +idx2 -> 4/4;
    # 75%: +idx3 (large wrong, small right: -1) = 3/4; 100%: large acc 3/4
    curve = routing_curve(SMALL, LARGE, P, steps=5)
    np.testing.assert_allclose(curve, [0.5, 0.75, 1.0, 0.75, 0.75])
    np.testing.assert_allclose(curve_shares(5), [0, 0.25, 0.5, 0.75, 1])
    assert routing_curve(SMALL, LARGE, P).shape == (101,)


def test_apgr_by_hand():
    curve = [0.5, 0.75, 1.0, 0.75, 0.75]
    # PGR = [0, 1, 2, 1, 1]; trapezoids of width .25: (0+1)/2 + (1+2)/2 + (2+1)/2 + (1+1)/2 = 4.5 -> * .25
    assert apgr(curve, 0.5, 0.75) == pytest.approx(1.125)
    # a random router (straight line) recovers half the gap on average
    assert apgr([0.5, 0.625, 0.75], 0.5, 0.75) == pytest.approx(0.5)
    assert math.isnan(apgr([0.5, 0.5], 0.5, 0.5))
    # explicit, uneven shares
    assert apgr([0.0, 1.0, 1.0], 0.0, 1.0, shares=[0.0, 0.1, 1.0]) == pytest.approx(0.05 + 0.9)


def test_cpt_by_hand():
    curve = [0.5, 0.75, 1.0, 0.75, 0.75]
    # 50% of gap 0.25 -> goal 0.625, crossed between share 0 (0.5) and .25 (0.75): 0.125
    assert cpt(curve, 0.5, 0.75, 0.5) == pytest.approx(0.125)
    # 80% -> goal 0.7 -> 0.25 * 0.2/0.25 = 0.2
    assert cpt(curve, 0.5, 0.75, 0.8) == pytest.approx(0.2)
    # straight line (random router): CPT(50%) = 50%
    assert cpt([0.0, 0.5, 1.0], 0.0, 1.0, 0.5) == pytest.approx(0.5)
    assert cpt([0.0, 0.5, 1.0], 0.0, 1.0, 0.8) == pytest.approx(0.8)
    assert cpt([0.6, 0.5], 0.6, 0.5, 0.5) == 0.0  # large model no better
    assert math.isnan(cpt([0.0, 0.1], 0.0, 1.0, 0.5))
    with pytest.raises(DataError, match="target"):
        cpt(curve, 0.5, 0.75, 1.5)
