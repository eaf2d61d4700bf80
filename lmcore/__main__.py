"""`python -m lmcore ...` is `lmcore ...`."""

from lmcore.cli import main

main()
