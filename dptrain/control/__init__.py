"""Adaptive clip/noise controllers."""
