"""Calibration: trajectory and curvature, schedules, sensitivity, filters, candidates and scoring."""
