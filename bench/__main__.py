"""`python -m bench`: every benchmark, printed."""

from bench.core import main

main()

from bench.streams import main as streams  # noqa: E402 - job streams, after the core figures

streams([])
