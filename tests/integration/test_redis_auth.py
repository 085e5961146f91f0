"""A Redis with a password works for producers and workers alike; a wrong password fails clearly."""

from __future__ import annotations

import pytest

from api_client import BrokerUnavailable, JobClient, JobRequest
from tests.harness import running_worker
from tests.services import start_redis
from worker.settings import Settings


def test_password_protected_redis_end_to_end(tmp_path):
    server = start_redis(tmp_path / "redis", password="s3cret-pw")
    try:
        assert ":s3cret-pw@" in server.url
        settings = Settings(redis_url=server.url, data_dir=tmp_path, model="tiny",
                            model_cache_dir=tmp_path.parent / "models-cache", max_batch_size=2, lease_s=20)
        with running_worker(settings):
            client = JobClient(server.url)
            job_id = client.submit(JobRequest.simple("hello", generation={"max_new_tokens": 2}))
            assert client.wait(job_id, timeout=60).state.value == "succeeded"
        wrong = JobClient(server.url.replace("s3cret-pw", "wrong"), socket_timeout=2)
        with pytest.raises(Exception) as info:
            wrong.status(job_id)
        assert "auth" in str(info.value).lower() or isinstance(info.value, BrokerUnavailable)
    finally:
        server.stop()
