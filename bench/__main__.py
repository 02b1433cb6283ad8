"""`python -m bench`: corral and its peers side by side (see bench/main.py)."""

from bench.main import main

main()

from bench.streams import main as streams  # noqa: E402 - job streams, after the core figures

streams([])
