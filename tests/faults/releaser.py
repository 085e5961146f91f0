"""A batch releaser alone in a process, releasing as fast as it can (api_client/lanes.py),
so that tests/faults/test_release_kill.py can SIGKILL it in the middle of a release.
Settings from IVQ_* like a worker's: IVQ_REDIS_URL, IVQ_BATCH_LANE_JOBS, IVQ_BATCH_RESEND_TAKEN_S."""

from __future__ import annotations

import time

import redis

from api_client.dispatch import Dispatcher, producer_app
from api_client.lanes import Lanes
from worker.settings import Settings


def main() -> None:
    settings = Settings()
    assert settings.redis_url
    lanes = Lanes(redis.Redis.from_url(settings.redis_url), Dispatcher(producer_app(settings.redis_url)),
                  lane_jobs=settings.batch_lane_jobs, resend_taken_s=settings.batch_resend_taken_s)
    while True:
        lanes.release_once()
        time.sleep(0.005)


if __name__ == "__main__":
    main()
