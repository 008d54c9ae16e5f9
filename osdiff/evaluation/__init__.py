"""Evaluation: metrics, classical baseline codecs, rate-distortion comparison and reports."""
