"""Confidence estimation: raw scores from an answer, and calibration into P(correct).

Pure code: numbers in, numbers out. Nothing here imports a web or HTTP library.
"""
