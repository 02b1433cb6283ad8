"""The systems measured, and what each needs before it can run.

Each adapter module defines ``Adapter`` (see :class:`bench.systems.base.Adapter`).
corral's adapter runs in corral's own environment (``.venv``); the peers'
adapters run in ``.venv-bench``, where the peers are installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Spec:
    name: str
    label: str
    module: str
    #: ``"corral"`` (corral's environment) or ``"peers"`` (``.venv-bench``).
    env: str
    #: Services that must be reachable: ``"redis"``, ``"rabbitmq"``.
    needs: tuple[str, ...] = ()
    options: dict[str, str] = field(default_factory=dict)


SYSTEMS: list[Spec] = [
    Spec("corral", "corral, SQLite store (default)", "bench.systems.corral_sys", "corral"),
    Spec(
        "corral-memory",
        "corral, --store memory://",
        "bench.systems.corral_sys",
        "corral",
        options={"store": "memory://"},
    ),
    Spec(
        "corral-curve",
        "corral, CURVE",
        "bench.systems.corral_sys",
        "corral",
        options={"curve": "1"},
    ),
    Spec(
        "celery-redis",
        "Celery + Redis",
        "bench.systems.celery_sys",
        "peers",
        ("redis",),
        {"broker": "redis"},
    ),
    Spec(
        "celery-rabbitmq",
        "Celery + RabbitMQ",
        "bench.systems.celery_sys",
        "peers",
        ("rabbitmq", "redis"),
        {"broker": "rabbitmq"},
    ),
    Spec(
        "dramatiq-rabbitmq",
        "Dramatiq + RabbitMQ",
        "bench.systems.dramatiq_sys",
        "peers",
        ("rabbitmq", "redis"),
        {"broker": "rabbitmq"},
    ),
    Spec(
        "dramatiq-redis",
        "Dramatiq + Redis",
        "bench.systems.dramatiq_sys",
        "peers",
        ("redis",),
        {"broker": "redis"},
    ),
    Spec("rq", "RQ + Redis", "bench.systems.rq_sys", "peers", ("redis",)),
    Spec("huey", "Huey + Redis", "bench.systems.huey_sys", "peers", ("redis",)),
    Spec("eventmq", "EventMQ 0.3.13", "bench.systems.eventmq_sys", "peers"),
]

BY_NAME = {s.name: s for s in SYSTEMS}
