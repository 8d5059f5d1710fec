"""The models clients see: the configured names, or (with none) the backends' own cards."""

from __future__ import annotations

from aiohttp import web

from proxy.health import discover_models
from proxy.middleware import EXCHANGE
from proxy.state import STATE


async def model_cards(request: web.Request) -> list[dict[str, object]]:
    """The model cards the caller sees: configured names, or the backends' own cards, only
    those its key may use when the key is scoped to some models."""
    state = request[STATE]
    if state.config.models:
        created = state.started_at
        cards: list[dict[str, object]] = [
            {"id": name, "object": "model", "created": created, "owned_by": "inference-proxy"}
            for name in state.config.models
        ]
    else:
        cards = await discover_models(state)
    principal = request[EXCHANGE].principal
    if principal is None or principal.models is None:
        return cards
    return [card for card in cards if card.get("id") in principal.models]
