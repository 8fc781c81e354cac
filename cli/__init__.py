"""calm.cli: the `calm` command line (click), the top floor: it may import all of calm and calm.eval, and nothing
below imports it, save the `python -m calm.training` entry point."""
