"""Cleaning up after a peer in the shared services: the benchmark's Redis and RabbitMQ.

Peers' environment only (needs ``redis`` and ``pika``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable


def flush_redis(url: str | None) -> None:
    """Empty the benchmark's own Redis database (never the machine's shared server)."""
    if not url:
        return
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        client.flushdb()
    finally:
        client.close()


def delete_amqp(
    url: str | None, queues: Iterable[str], exchanges: Iterable[str] = (), *, purge: bool = False
) -> None:
    """Delete (or with ``purge`` only empty) what this benchmark declared on the shared RabbitMQ.

    Between runs queues are only emptied: a client caches what it declared and
    would publish into the void after a delete.
    """
    if not url:
        return
    import pika

    logging.getLogger("pika").setLevel(logging.CRITICAL)
    params = pika.URLParameters(pika_url(url))
    params.socket_timeout = 5
    conn = pika.BlockingConnection(params)
    try:
        for name in queues:
            # A failed delete closes the channel, so each name gets its own.
            with contextlib.suppress(Exception):
                ch = conn.channel()
                if purge:
                    ch.queue_purge(queue=name)
                else:
                    ch.queue_delete(queue=name)
                ch.close()
        for name in () if purge else exchanges:
            with contextlib.suppress(Exception):
                ch = conn.channel()
                ch.exchange_delete(exchange=name)
                ch.close()
    finally:
        conn.close()


def pika_url(url: str) -> str:
    """kombu writes the default vhost as ``//``; pika wants it percent-encoded."""
    return url[:-1] + "%2F" if url.endswith("//") else url


def redis_version(url: str | None) -> str:
    if not url:
        return "none"
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        return str(client.info("server").get("redis_version", "?"))
    finally:
        client.close()
