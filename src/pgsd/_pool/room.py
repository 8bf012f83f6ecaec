"""Room on pipelined connections: which statements are sent where, and when a
pipelined connection goes back to the pool.

A pipeline's room is ``pipeline_depth`` minus its statements in flight.
Room freed while others queue goes to the statements first in the queue,
which are sent there and then (`WaiterQueue.take_statement`): their tasks
wake only when their results are in. A borrower first in the queue waits
for a whole connection, which comes once the pipeline drains.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .entry import Entry
from .pipeline import Pipeline, Statement

if TYPE_CHECKING:
    from .pool import ConnectionPool

__all__ = ["give_back_if_idle", "grant_room", "read_until", "send", "start"]


def start(pool: ConnectionPool, entry: Entry) -> Pipeline:
    """Put an idle connection in pipeline mode for one-shot statements."""
    pipeline: Pipeline | None = entry.pipeline
    if pipeline is None:
        pipeline = entry.pipeline = Pipeline(entry.conn, entry)
        pipeline.on_room = lambda: _answered(pool, entry)
    pipeline.start()
    pool._pipelined.add(entry)
    return pipeline


def send(pool: ConnectionPool, entry: Entry, statement: Statement) -> bool:
    """Send the caller's *statement* on *entry*'s pipeline; True: the caller reads.

    When nobody reads the pipeline's results yet, the caller does
    (`read_until`), which spares a task per quiet spell: a pipeline with
    one statement at a time is read by its caller alone.

    Raises what `Pipeline.send` raises; a pipeline left with nothing to do
    goes back to the pool.
    """
    pipeline: Pipeline = entry.pipeline
    try:
        pipeline.send(statement)
    except BaseException:
        give_back_if_idle(pool, entry)
        raise
    _track_depth(pool, pipeline)
    return pipeline.claim_reader()


async def read_until(pool: ConnectionPool, entry: Entry, statement: Statement) -> None:
    """Read *entry*'s results in the caller's task until its *statement* has ended.

    Then (or when the caller is cancelled) the statements still in flight
    get a reading task of the pool's; with none, the connection goes back.
    """
    pipeline: Pipeline = entry.pipeline
    try:
        await pipeline.run(until=statement)
    finally:
        if pipeline.claim_reader():
            pool._spawn(lambda: _drive(pool, entry))
        else:
            give_back_if_idle(pool, entry)


def grant_room(pool: ConnectionPool, entry: Entry) -> None:
    """Send the statements first in the queue on *entry*'s pipeline, while it has room.

    None while the pool is paused, nor on a drained connection: it empties.
    """
    if pool._paused or entry.retired:
        return
    pipeline: Pipeline = entry.pipeline
    room = pool.pool_config.pipeline_depth - len(pipeline.in_flight)
    waiters = pool._waiters
    sent = False
    while room > 0 and pipeline.broken is None:
        statement = waiters.take_statement()
        if statement is None:
            break
        try:
            pipeline.send(statement)
        except Exception as error:  # cannot be converted, or the connection is lost
            statement.fail(error)
            continue
        room -= 1
        sent = True
    if sent:
        _track_depth(pool, pipeline)
        if pipeline.claim_reader():
            pool._spawn(lambda: _drive(pool, entry))


def _track_depth(pool: ConnectionPool, pipeline: Pipeline) -> None:
    depth = len(pipeline.in_flight)
    if depth > pool._counters.depth_max:
        pool._counters.depth_max = depth


async def _drive(pool: ConnectionPool, entry: Entry) -> None:
    """Read the pipeline's results; when it empties, give the connection back."""
    pipeline: Pipeline = entry.pipeline
    await pipeline.run()
    give_back_if_idle(pool, entry)


def give_back_if_idle(pool: ConnectionPool, entry: Entry) -> None:
    """A pipeline with nothing in flight or being read: back to the pool (or evict)."""
    pipeline: Pipeline = entry.pipeline
    if pipeline.in_flight or pipeline.running:
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
