"""Submitting jobs: sync and asyncio clients, job futures, an Executor.

``Client`` is synchronous and thread-safe, ``AsyncClient`` is for asyncio,
``Executor`` is a ``concurrent.futures.Executor``; ``default_client()`` is the
process-wide client behind ``Task.delay``.
"""

from corral.client.aio import AsyncClient
from corral.client.default import default_client
from corral.client.executor import Executor
from corral.client.job import AsyncJob, Job
from corral.client.sync import Client
from corral.client.target import body_for, encode_call
from corral.errors import ClientClosed, JobFailed, NotAcknowledged, Rejected

__all__ = [
    "AsyncClient",
    "AsyncJob",
    "Client",
    "ClientClosed",
    "Executor",
    "Job",
    "JobFailed",
    "NotAcknowledged",
    "Rejected",
    "body_for",
    "default_client",
    "encode_call",
]
