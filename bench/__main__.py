"""`python -m bench ARGS` = `python bench/bench.py ARGS`.

The driver runs as a script (its folder on sys.path, for its sibling modules), so this replaces
the process with it: what the driver measures of itself (its peak RSS) is that of the script.
"""

import os
import sys
from pathlib import Path

script = str(Path(__file__).resolve().with_name("bench.py"))
os.execv(sys.executable, [sys.executable, script, *sys.argv[1:]])
