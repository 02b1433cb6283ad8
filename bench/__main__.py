"""`python -m bench`: corral and its peers side by side (see bench/main.py)."""

from bench.main import main

main()
