"""Local HTTPS stand-in for Microsoft Entra ID, Azure Key Vault and the Dataverse Web API.

Importing the package is cheap and has no side effects; ``StandIn`` is loaded on first use.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .server import StandIn

__all__ = ["StandIn"]


def __getattr__(name: str) -> Any:
    if name == "StandIn":
        from .server import StandIn

        return StandIn
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
