"""Layer 4: evaluation: calibration (CE, CFM, FM profile), downstream benchmarks, paired comparisons,
the in-training callback and ``evaluate.py``'s driver; imports layers 0-3."""
