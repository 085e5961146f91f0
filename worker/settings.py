"""Worker settings from IVQ_* environment variables, built once at the entrypoint.

Nothing reads the environment on import: `Settings()` is called by the CLI
(or a test builds its own) and the object is passed down.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

if TYPE_CHECKING:
    from api_client.redis_conn import Durability
    from model_runtime.media import MediaLimits


def usable_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 quota (a container's CPU limit)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cores


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IVQ_", extra="ignore")

    # Where things are. No redis_url means "start an embedded redis-server". redis:// or
    # redis+sentinel://[user:password@]host:port[,host:port...]/SERVICE[/DB] (api_client/redis_conn.py).
    redis_url: str | None = None
    # A submit is acknowledged once its record is this durable: "replica" WAITs for a replica (at most
    # redis_wait_timeout_ms, else 503 / BrokerUnavailable), "local" does not. None: replica for a
    # Sentinel URL, local otherwise.
    redis_durability: Literal["local", "replica"] | None = None
    redis_wait_timeout_ms: int = Field(default=1000, ge=1)
    data_dir: Path = Path(".ivq-data")
    store_url: str | None = None  # s3://bucket/prefix or file:///dir; default file://{data_dir}/store
    s3_endpoint_url: str | None = None
    # Comma-separated in the environment (NoDecode: not parsed as JSON first).
    s3_allowed_buckets: Annotated[list[str], NoDecode] = Field(default_factory=list)  # empty: any bucket
    allowed_file_root: Path | None = None  # default: the file store's directory
    allow_https_media: bool = False

    # The model.
    model: str = "tiny"  # "tiny" | hub id | local directory
    model_cache_dir: Path | None = None  # default {data_dir}/models
    device: str = "auto"
    dtype: str = "auto"
    attn_implementation: str = "auto"  # auto | flash_attention_2 | sdpa | eager
    quantization: str = "none"  # none | 4bit | 8bit (bitsandbytes)
    warmup: bool = True

    # Batching. "continuous": requests join and leave a running batch at every decode
    # step (model_runtime/engine_continuous.py); "static": one generate per batch, kept
    # for side-by-side benchmarks. The default cap is the CPU measurement
    # (benchmarks/BENCHMARKS.md); the gpu overlay sets its own.
    engine: Literal["continuous", "static"] = "continuous"
    max_batch_size: int = Field(default=16, ge=1, le=256)
    # KV budget of the continuous engine, in tokens (rows x longest prompt + max_new_tokens).
    # None: on CUDA read from free memory after warm-up, on a CPU 131072.
    max_batch_tokens: int | None = Field(default=None, ge=1)
    # Per step, at most this many prompt tokens are prefilled and tiles encoded: the pause
    # a joining job imposes on the running ones (measured on a CPU, benchmarks/BENCHMARKS.md).
    prefill_chunk_tokens: int = Field(default=128, ge=16)
    vision_chunk_tiles: int = Field(default=4, ge=1)
    # Vision reuse: per-tile image features kept in the model process, keyed by the tile's pixels
    # (model_runtime/vision_cache.py), least recently used evicted first; taken out of the KV budget.
    # 0: off. 256 MiB holds ~570 of InternVL3-1B's 448 px tiles (256 tokens x 896 x bf16).
    vision_cache_mb: float = Field(default=256.0, ge=0)
    cancel_poll_s: float = Field(default=0.5, gt=0)  # how often a worker looks for cancelled running jobs
    # Continuous engine: a running job's text so far is written to its record at most this often
    # (worker/jobs/progress.py; JobClient.stream). 0: no progress.
    progress_interval_s: float = Field(default=0.25, ge=0)
    max_batch_cost: float | None = None  # static engine: None means the size limit only
    max_wait_ms: float = Field(default=20.0, ge=0)  # static engine: how long a batch waits to fill
    concurrency: int | None = None  # task threads; default 2 * max_batch_size
    # Processes that fetch, decode and run the processor, so the model process's GIL stays on the
    # model loop (worker/jobs/prep_pool.py). None: the cores less one (at least 1, at most 16);
    # 0: on the task threads, in the model process.
    preprocess_workers: int | None = Field(default=None, ge=0)

    # Media limits (checked in the worker on the real bytes); media_limits() hands them on.
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_video_bytes: int = 200 * 1024 * 1024
    max_video_seconds: float = 600.0
    max_video_pixels: int = 3840 * 2160
    max_video_frames: int = 32
    default_video_frames: int = 8
    max_frame_side: int = Field(default=1024, ge=1)  # sampled video frames are scaled down to this side
    max_tiles: int = 12

    # Reliability (issue: lifecycle). visibility_timeout_s must exceed the longest job.
    visibility_timeout_s: int = 3600
    # A queued job whose Celery message is gone (lost in a Redis crash or with an old primary) is sent
    # again from its record this long after it was queued or last seen in the broker; the sweeper runs
    # every min(lease_s, resend_lost_after_s) / 2, so the bound is 1.5 x this (45 s by default).
    resend_lost_after_s: float = Field(default=30.0, gt=0)
    lease_s: int = 60
    max_attempts: int = 3
    # Deliveries that killed a worker before a job is "poison". Jobs batched beside a
    # poison job die with it and count a crash too, so leave room above 2.
    max_crashes: int = 3
    drain_timeout_s: int = 60
    job_timeout_s: float = 600.0

    # Callbacks.
    webhook_secret: SecretStr | None = None  # whsec_<base64>
    webhook_secrets: dict[str, SecretStr] = Field(default_factory=dict)  # name -> whsec_...
    callback_allow_private: bool = False
    callback_max_attempts: int = 8
    callback_backoff_base_s: float = 2.0
    callback_backoff_cap_s: float = 600.0
    callback_timeout_s: float = 10.0
    callback_resend_after_s: float = 120.0  # a notify not run by then is sent again (same webhook-id)

    # Batch lanes (api_client/lanes.py): every worker with a model releases batch jobs to the
    # broker in turns across tenants, keeping at most batch_lane_jobs of each tenant's waiting.
    batch_lane_jobs: int = Field(default=16, ge=1)
    batch_release_s: float = Field(default=0.25, gt=0)
    batch_resend_taken_s: float = Field(default=5.0, gt=0)  # taken by a releaser that died: sent again after

    # The HTTP API (`internvl-queue api`).
    api_keys_file: Path | None = None  # tenants and SHA-256 hashes of their keys (worker/http/tenants.py)
    api_max_batch_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)  # a JSONL batch body, streamed
    # Defaults for a tenant whose keys-file entry sets no batch limits: its batches may hold at most
    # api_tenant_redis_share of api_redis_memory_bytes (None: Redis's maxmemory, else 1 GiB).
    api_redis_memory_bytes: int | None = Field(default=None, ge=1024 * 1024)
    api_tenant_redis_share: float = Field(default=0.1, gt=0, le=1)
    api_redis_connections: int = Field(default=16, ge=2)  # the event streams' pool, per API process

    # Operations.
    metrics_port: int | None = None  # None: no HTTP server
    # Celery task events (task-received/started/succeeded), which Flower needs: off by default, they
    # cost Redis a PUBLISH per event (benchmarks/BENCHMARKS.md, control plane). `celery inspect` works either way.
    task_events: bool = False
    log_level: str = "INFO"
    worker_id: str | None = None
    queues: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["infer", "callbacks"])

    @field_validator("s3_allowed_buckets", "queues", mode="before")
    @classmethod
    def _comma_list(cls, v):
        if isinstance(v, str) and not v.strip().startswith("["):
            return [x.strip() for x in v.split(",") if x.strip()]
        return v

    @field_validator("webhook_secrets", mode="before")
    @classmethod
    def _json_dict(cls, v):
        return json.loads(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _consistent_timeouts(self) -> Settings:
        # The broker redelivers an unacked message after the visibility timeout: it
        # must outlast the longest job, or a healthy long job runs twice.
        if self.visibility_timeout_s <= self.job_timeout_s:
            raise ValueError(f"IVQ_VISIBILITY_TIMEOUT_S ({self.visibility_timeout_s}) must exceed "
                             f"IVQ_JOB_TIMEOUT_S ({self.job_timeout_s})")
        if self.lease_s < 1:
            raise ValueError("IVQ_LEASE_S must be at least 1 second")
        return self

    def durability(self) -> Durability:
        """The submit durability for this deployment (api_client/redis_conn.py)."""
        from api_client.redis_conn import default_durability

        return default_durability(self.redis_url or "redis://", self.redis_durability,
                                  timeout_ms=self.redis_wait_timeout_ms)

    @property
    def sweep_interval_s(self) -> float:
        return max(0.5, min(self.lease_s, self.resend_lost_after_s) / 2)

    def media_limits(self) -> MediaLimits:
        """The media limits for model_runtime's decoders, every field named here."""
        from model_runtime.media import MediaLimits  # not at the top: a callbacks-only worker has no model stack

        return MediaLimits(
            max_image_bytes=self.max_image_bytes,
            max_image_pixels=self.max_image_pixels,
            max_video_bytes=self.max_video_bytes,
            max_video_seconds=self.max_video_seconds,
            max_video_pixels=self.max_video_pixels,
            max_video_frames=self.max_video_frames,
            default_video_frames=self.default_video_frames,
            max_frame_side=self.max_frame_side,
        )

    # Derived values, so callers never repeat the defaults.
    @property
    def resolved_store_url(self) -> str:
        return self.store_url or f"file://{(self.data_dir / 'store').resolve()}"

    @property
    def resolved_file_root(self) -> Path | None:
        if self.allowed_file_root is not None:
            return self.allowed_file_root.resolve()
        url = self.resolved_store_url
        return Path(url[len("file://") :]).resolve() if url.startswith("file://") else None

    @property
    def resolved_model_cache_dir(self) -> Path:
        return (self.model_cache_dir or self.data_dir / "models").resolve()

    @property
    def resolved_concurrency(self) -> int:
        return self.concurrency or max(2, 2 * self.max_batch_size)

    @property
    def resolved_preprocess_workers(self) -> int:
        if self.preprocess_workers is not None:
            return self.preprocess_workers
        return max(1, min(16, usable_cpus() - 1))

    @property
    def resolved_worker_id(self) -> str:
        return self.worker_id or f"{os.uname().nodename}-{os.getpid()}"
