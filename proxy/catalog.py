"""The models clients see: the configured names, or (with none) the backends' own cards."""

from __future__ import annotations

from proxy.health import discover_models
from proxy.state import GatewayState


async def model_cards(state: GatewayState) -> list[dict[str, object]]:
    """The model cards clients see: configured names, or the backends' own cards."""
    if state.config.models:
        created = state.started_at
        return [
            {"id": name, "object": "model", "created": created, "owned_by": "inference-proxy"}
            for name in state.config.models
        ]
    return await discover_models(state)
