"""What the Functions host hands a function besides its trigger: the invocation context and func.Out.

Shared by the tests' host simulation and the benchmark, which call the functions as the host does.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Context:
    """func.Context: the invocation id is what the app logs and answers as correlationId."""

    invocation_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    function_name: str = "local"
    function_directory: str = "."
    trace_context: Any = None
    retry_context: Any = None
    thread_local_storage: Any = None


class Out:
    """func.Out for an output binding; the host writes the value after the function returns."""

    def __init__(self) -> None:
        self.value: str | None = None

    def set(self, value: str) -> None:
        self.value = value

    def get(self) -> str | None:
        return self.value


@dataclass
class TraceContext:
    """func.TraceContext: the host's W3C trace context for this invocation."""

    trace_parent: str = ""
    trace_state: str = ""
    attributes: dict[str, str] = field(default_factory=dict)
