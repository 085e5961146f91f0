"""Settings: built from IVQ_* variables at the entrypoint, with consistent timeouts."""

from __future__ import annotations

import dataclasses

import pytest
from pydantic import ValidationError

from worker.settings import Settings


def test_environment_is_read_only_when_settings_are_built(monkeypatch):
    monkeypatch.setenv("IVQ_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("IVQ_S3_ALLOWED_BUCKETS", "media,uploads")
    monkeypatch.setenv("IVQ_QUEUES", "callbacks")
    monkeypatch.setenv("IVQ_WEBHOOK_SECRETS", '{"partner": "whsec_AAAA"}')
    s = Settings()
    assert s.max_batch_size == 16 and s.resolved_concurrency == 32
    assert s.s3_allowed_buckets == ["media", "uploads"] and s.queues == ["callbacks"]
    assert s.webhook_secrets["partner"].get_secret_value() == "whsec_AAAA"
    assert "whsec_AAAA" not in repr(s)  # secrets never print


def test_visibility_timeout_must_outlast_the_longest_job():
    with pytest.raises(ValidationError, match="VISIBILITY_TIMEOUT"):
        Settings(visibility_timeout_s=60, job_timeout_s=600)
    assert Settings(visibility_timeout_s=60, job_timeout_s=30).visibility_timeout_s == 60


def test_defaults_point_at_the_embedded_store(tmp_path):
    s = Settings(data_dir=tmp_path)
    assert s.resolved_store_url == f"file://{(tmp_path / 'store').resolve()}"
    assert s.resolved_file_root == (tmp_path / "store").resolve()


def test_every_media_limit_comes_from_the_setting_of_the_same_name():
    from model_runtime.media import MediaLimits

    names = [f.name for f in dataclasses.fields(MediaLimits)]
    # Settings ignores unknown names, so a limit without a setting would silently keep its default.
    assert set(names) <= set(Settings.model_fields), set(names) - set(Settings.model_fields)
    # A value no default has, per field: a limit media_limits() forgot keeps its default and shows.
    changed = {name: type(getattr(MediaLimits(), name))(getattr(MediaLimits(), name) * 3 + 1) for name in names}
    limits = Settings(**changed).media_limits()
    assert isinstance(limits, MediaLimits)
    assert {name: getattr(limits, name) for name in names} == changed


def test_preprocess_workers_default_to_the_usable_cpus_less_one_and_zero_means_in_process() -> None:
    from worker.settings import usable_cpus

    assert Settings().resolved_preprocess_workers == max(1, min(16, usable_cpus() - 1))
    assert Settings(preprocess_workers=0).resolved_preprocess_workers == 0
    assert Settings(preprocess_workers=3).resolved_preprocess_workers == 3
