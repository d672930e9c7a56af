from __future__ import annotations

import pytest
import redis

from rnnserve.client.bench import RedisProcess


class RedisServer(RedisProcess):
    """A real redis-server on loopback, without persistence; stop and start it again
    on the same port to play an outage."""

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port)

    def session_keys(self) -> list[str]:
        """The keys of sessions (not the mark of the store's place in the list of
        shards, ``rnnserve:shard``)."""
        return sorted(k.decode() for k in self.client().keys("rnnserve:{*"))


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def shards(tmp_path):
    """Three real redis-servers: a store's shards."""
    made = []
    try:
        for i in range(3):
            (tmp_path / f"redis{i}").mkdir()
            made.append(RedisServer(tmp_path / f"redis{i}"))
        yield made
    finally:
        for s in made:
            s.stop()
