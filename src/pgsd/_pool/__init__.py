"""One database's connection pool, in parts (see docs/architecture.md).

`pool` holds `ConnectionPool`: its lifecycle, the lease and the hot path.
The parts it delegates to, each one job:

* `lending`: lending when the hot path cannot (queueing, checking, loans);
* `waiters`: the tasks waiting for a connection, FIFO, and their deadlines;
* `availability`: up or down, the last error, backoff, fail fast, callbacks;
* `filler`: how many connections are wanted, and the attempts that open them;
* `cleanup`: taking a connection back clean, or replacing it;
* `maintenance`: idle and lifetime expiry, leak reports, health checks;
* `replicas`: read replicas, their lag, where reads go;
* `listen`: LISTEN on a connection of its own, across reconnects;
* `entry`: one pooled connection's bookkeeping.
"""

from .availability import StateCallback
from .entry import ConnectionFactory
from .listen import Listener, ListenGap, Notification
from .pool import ConnectionPool, Hook

__all__ = [
    "ConnectionFactory",
    "ConnectionPool",
    "Hook",
    "ListenGap",
    "Listener",
    "Notification",
    "StateCallback",
]
