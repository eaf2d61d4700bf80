"""lmcore's benchmarks against the seed notebook's reference (README.md here).

Run `python bench/bench.py` (or `python -m bench` from the repository root). The modules here
import each other by their plain names (`from context import Bench`; sections/ by relative
imports): bench.py, helpers.py, generate_speed.py and precision_quality.py always run as scripts,
and a script's own folder is on sys.path. lmcore comes from the installed package.
"""
