"""Producer-side client for internvl-queue.

`__all__` is the public contract. Importing this package never imports
torch or transformers (a test checks it).
"""

from api_client.client import JobClient
from api_client.http_client import HttpJobClient
from api_client.errors import BrokerUnavailable, JobNotFound, RequestRejected, ServiceError, WaitTimeout
from api_client.formats import (
    ChoiceFormat,
    JsonObjectFormat,
    JsonSchemaFormat,
    JsonSchemaSpec,
    RegexFormat,
    ResponseFormat,
    TextFormat,
)
from api_client.schema import (
    CallbackSpec,
    ErrorCode,
    GenerationParams,
    ImageItem,
    JobError,
    JobRequest,
    JobResult,
    JobState,
    JobStatus,
    Message,
    TextItem,
    VideoItem,
)

__all__ = [
    "BrokerUnavailable",
    "CallbackSpec",
    "ChoiceFormat",
    "ErrorCode",
    "GenerationParams",
    "HttpJobClient",
    "ImageItem",
    "JobClient",
    "JobError",
    "JobNotFound",
    "JobRequest",
    "JobResult",
    "JobState",
    "JobStatus",
    "JsonObjectFormat",
    "JsonSchemaFormat",
    "JsonSchemaSpec",
    "Message",
    "RegexFormat",
    "RequestRejected",
    "ResponseFormat",
    "ServiceError",
    "TextFormat",
    "TextItem",
    "VideoItem",
    "WaitTimeout",
]
