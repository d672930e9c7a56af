from __future__ import annotations

import pytest
import redis

from rnnserve.client.bench import RedisProcess

from ..conftest import build_repo


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """text v1, v2 (GRU, bytes) and feat v1 (LSTM, 20 features -> 7 outputs)."""
    return build_repo(tmp_path_factory.mktemp("repo"))


class RedisServer(RedisProcess):
    """A real redis-server on loopback, without persistence; stop and start it again
    on the same port to play an outage."""

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port)


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    server.stop()
