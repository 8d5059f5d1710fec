"""Which backend serves a request: the model's targets, weighted, then its fallbacks."""

from __future__ import annotations

import random
from collections.abc import Collection

import msgspec

from proxy.config import Config, ModelConfig
from proxy.errors import NotFound

UNKNOWN_MODEL = "unknown"


class Target(msgspec.Struct, frozen=True):
    """One place a request can go: a backend, and the model id to send it (None: as sent)."""

    backend: str
    upstream_model: str | None
    weight: float = 1.0


class Plan(msgspec.Struct, frozen=True):
    """The targets to try in order (one per model of the fallback chain) and the metric label."""

    model_label: str
    attempts: tuple[Target, ...]


def plan(config: Config, model: str, rng: random.Random, known: Collection[str] = ()) -> Plan:
    """Resolve the client's `model` to an ordered list of targets, or raise `NotFound`."""
    if not config.models:
        label = model if model in known else UNKNOWN_MODEL
        backends = [Target(backend=name, upstream_model=None) for name in config.backends]
        return Plan(model_label=label, attempts=(pick(backends, rng),))
    entry = config.models.get(model)
    if entry is None:
        raise NotFound(f"model '{model[:200]}' does not exist; GET /v1/models lists the models")
    chain = [pick(targets_of(model, entry, model), rng)]
    chain.extend(pick(targets_of(n, config.models[n], model), rng) for n in entry.fallbacks)
    return Plan(model_label=model, attempts=tuple(chain))


def targets_of(name: str, entry: ModelConfig, requested: str) -> list[Target]:
    """A model entry's targets; `upstream_model` is None where the id equals what was sent."""
    out = []
    for t in entry.targets:
        upstream = t.model if t.model is not None else name
        out.append(
            Target(
                backend=t.backend,
                upstream_model=None if upstream == requested else upstream,
                weight=t.weight,
            )
        )
    return out


def pick(targets: list[Target], rng: random.Random) -> Target:
    """Weighted random choice among targets."""
    if len(targets) == 1:
        return targets[0]
    return rng.choices(targets, weights=[t.weight for t in targets])[0]
