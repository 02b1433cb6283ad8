"""The peers' own apps and task modules, configured from ``BENCH_*`` environment variables.

Each is imported both by the peer's worker processes and by the runner's
client, so both sides see the same configuration.
"""
