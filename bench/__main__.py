"""`python -m bench`: every benchmark, printed."""

from bench.core import main

main()
