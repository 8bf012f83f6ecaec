"""A cache that forgets what changed, told by LISTEN; on asyncio or trio.

    python examples/cache_invalidation.py DSN [asyncio|trio]

It caches users' names, listens on ``users_changed``, renames user 1 the
way a writer would (an UPDATE, then a notification once it has
committed), and prints what the cache saw. A ``pgsd.ListenGap`` (a
reconnect, a full buffer) empties the whole cache: some changes may have
been missed. The demo ends once the change has been seen (within 10 s).
"""

from __future__ import annotations

import sys

import anyio

import pgsd

SETUP = """
CREATE TABLE IF NOT EXISTS example_users (id int PRIMARY KEY, name text NOT NULL);
INSERT INTO example_users VALUES (1, 'Ada'), (2, 'Grace') ON CONFLICT (id) DO NOTHING;
UPDATE example_users SET name = 'Ada' WHERE id = 1;
"""


class UserCache:
    def __init__(self, pool: pgsd.ConnectionPool) -> None:
        self.pool = pool
        self.names: dict[int, str] = {}

    async def name(self, user_id: int) -> str:
        if user_id not in self.names:
            query = "SELECT name FROM example_users WHERE id = %s"
            self.names[user_id] = await self.pool.fetchval(query, [user_id])
        return self.names[user_id]

    async def follow(self, changed: anyio.Event) -> None:
        async with self.pool.listen("users_changed") as notifications:
            changed.set()  # listening: changes from now on are seen
            async for item in notifications:
                if isinstance(item, pgsd.ListenGap):
                    self.names.clear()
                    print("gap: cache cleared")
                else:
                    self.names.pop(int(item.payload), None)
                    print(f"user {item.payload} changed: forgotten")
                    return


async def main(dsn: str) -> None:
    async with pgsd.ConnectionPool(pgsd.DatabaseConfig.from_dsn(dsn)) as pool:
        async with pool.connection() as conn:
            await conn.execute(SETUP)
        cache = UserCache(pool)
        print(f"user 1 is {await cache.name(1)}")
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                listening = anyio.Event()
                tg.start_soon(cache.follow, listening)
                await listening.wait()
                # A writer: the change, then the notification.
                await pool.execute("UPDATE example_users SET name = 'Ada Lovelace' WHERE id = 1")
                await pool.notify("users_changed", "1")
        print(f"user 1 is {await cache.name(1)}")


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], backend=sys.argv[2] if len(sys.argv) > 2 else "asyncio")
