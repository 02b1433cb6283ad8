"""A module that must never be imported by a refused job.

Tests check ``"tests.jobs_sentinel" in sys.modules`` (in their own process or
in a pool child) to prove that the loader refused before importing.
"""

IMPORTED = True


def run() -> str:
    return "ran"
