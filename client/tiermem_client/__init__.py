"""tiermem_client: a Python client for tiermem's native API (SSE turns with
resumption and retries, sessions, history, memories, forgetting)."""

from ._http import __version__
from .client import AsyncClient, Client, join_text, new_turn_id
from .errors import (
    AuthError,
    Conflict,
    ConnectionFailed,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    ProtocolError,
    RateLimited,
    ServerError,
    TiermemError,
    Unavailable,
)
from .events import (
    DoneEvent,
    ErrorEvent,
    Event,
    MemoryEvent,
    MetaEvent,
    ResetEvent,
    SkillEvent,
    TokenEvent,
    ToolCallEvent,
    ToolResultEvent,
)

__all__ = [
    "AsyncClient",
    "AuthError",
    "Client",
    "Conflict",
    "ConnectionFailed",
    "DoneEvent",
    "ErrorEvent",
    "Event",
    "InvalidRequest",
    "MemoryEvent",
    "MetaEvent",
    "MethodNotAllowed",
    "NotFound",
    "ProtocolError",
    "RateLimited",
    "ResetEvent",
    "ServerError",
    "SkillEvent",
    "TiermemError",
    "TokenEvent",
    "ToolCallEvent",
    "ToolResultEvent",
    "Unavailable",
    "__version__",
    "join_text",
    "new_turn_id",
]
