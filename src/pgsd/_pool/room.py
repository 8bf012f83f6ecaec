"""Room on pipelined connections: who may send a one-shot statement where, and when a
pipelined connection goes back to the pool.

A pipeline's room is ``pipeline_depth`` minus its statements in flight
minus its *reserved* places (granted to a statement that has not been sent
yet). Room freed while others queue goes to the first in the queue if it
is a statement's (`WaiterQueue.grant_slot`); a borrower first in the queue
waits for a whole connection, which comes once the pipeline drains.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .entry import Entry
from .pipeline import Pipeline

if TYPE_CHECKING:
    from .pool import ConnectionPool

__all__ = ["give_back_if_idle", "grant_room", "release_room", "start"]


def start(pool: ConnectionPool, entry: Entry) -> Pipeline:
    """Put an idle connection in pipeline mode for one-shot statements."""
    pipeline: Pipeline | None = entry.pipeline
    if pipeline is None:
        pipeline = entry.pipeline = Pipeline(entry.conn)
        pipeline.on_room = lambda: _answered(pool, entry)
    pipeline.start()
    pool._pipelined.add(entry)
    return pipeline


def grant_room(pool: ConnectionPool, entry: Entry) -> None:
    """Give the room on *entry*'s pipeline to queued statements, first come first served."""
    pipeline: Pipeline = entry.pipeline
    room = pool.pool_config.pipeline_depth - len(pipeline.in_flight) - pipeline.reserved
    for _ in range(room):
        if not pool._waiters.grant_slot(entry):
            return
        pipeline.reserved += 1


def release_room(pool: ConnectionPool, entry: Entry) -> None:
    """A reserved place that will not be used (its caller left, or its statement failed)."""
    pipeline: Pipeline = entry.pipeline
    pipeline.reserved -= 1
    grant_room(pool, entry)
    give_back_if_idle(pool, entry)


def give_back_if_idle(pool: ConnectionPool, entry: Entry) -> None:
    """A pipeline with nothing in flight, reserved or being read: back to the pool (or evict)."""
    pipeline: Pipeline = entry.pipeline
    if pipeline.in_flight or pipeline.reserved or pipeline.running:
        return
    pool._pipelined.discard(entry)
    if pipeline.broken is not None or entry.conn.closed:
        pool._counters.lost += 1
        entry.pipeline = None
        pool._discard(entry)
        return
    pipeline.finish()
    entry.last_used = pool._now()
    pool._put_back(entry)


def _answered(pool: ConnectionPool, entry: Entry) -> None:
    """A statement was answered: count it, and give its room to the first in the queue."""
    pool._counters.statements += 1
    if pool._waiters.count:
        grant_room(pool, entry)
