"""Robust z-score spike detection against a direct numpy median/MAD computation."""

from __future__ import annotations

import math

import numpy as np

from lmforge.train.stability import SpikeDetector


def filled(values: list[float], **kwargs) -> SpikeDetector:
    detector = SpikeDetector(**kwargs)
    for v in values:
        detector.accept(v)
    return detector


def test_z_score_is_median_and_scaled_mad_of_the_window() -> None:
    rng = np.random.default_rng(0)
    history = list(3.0 + 0.05 * rng.standard_normal(60))
    detector = filled(history, window=50, min_history=10)
    window = np.array(history[-50:])
    median = np.median(window)
    mad = np.median(np.abs(window - median))
    z, got_median = detector.robust_z(3.4)
    assert math.isclose(got_median, median)
    assert math.isclose(z, (3.4 - median) / (1.4826 * mad))


def test_spikes_are_flagged_ordinary_noise_and_drops_are_not() -> None:
    rng = np.random.default_rng(1)
    detector = filled(list(2.5 + 0.02 * rng.standard_normal(30)), window=30, min_history=10, z_threshold=6)
    assert not detector.check(2.53).spike
    assert not detector.check(1.0).spike  # a falling loss is good news
    verdict = detector.check(4.0)
    assert verdict.spike and verdict.z > 6
    assert detector.check(float("nan")).spike and detector.check(float("inf")).spike


def test_one_outlier_in_the_window_does_not_blind_the_detector() -> None:
    detector = filled([2.0, 2.01, 1.99, 2.02, 1.98, 50.0, 2.0, 2.01, 1.99, 2.0], window=10, min_history=5)
    assert detector.check(2.5).spike  # a mean/std detector would have been blinded by the 50


def test_no_verdict_before_min_history_and_state_round_trips() -> None:
    detector = filled([2.0, 2.0], window=10, min_history=5)
    assert not detector.check(100.0).spike
    flat = filled([2.0] * 6, window=10, min_history=5)
    assert not flat.check(2.001).spike  # MAD 0: the spread floor keeps tiny wiggles normal
    assert flat.check(2.5).spike
    restored = SpikeDetector(window=10, min_history=5)
    restored.load_state_dict(flat.state_dict())
    assert list(restored.history) == list(flat.history)
