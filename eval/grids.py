"""The threshold grids that `calm eval` and `calm calibrate` sweep by default. No torch here: the
command line builds its options from these before any model is loaded."""

DEFAULT_THRESHOLDS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)  # calm eval
DEFAULT_GRID = (0.99, 0.97, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5)  # calm calibrate: most conservative first
