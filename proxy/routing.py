"""Which models serve a request: the requested one's targets, then its fallbacks' (any depth)."""

from __future__ import annotations

from collections.abc import Collection

import msgspec

from proxy.config import Config, ModelConfig, Policy
from proxy.errors import NotFound

UNKNOWN_MODEL = "unknown"


class Target(msgspec.Struct, frozen=True):
    """One place a request can go: a backend, and the model id to send it (None: as sent)."""

    backend: str
    upstream_model: str | None
    weight: float = 1.0


class Step(msgspec.Struct, frozen=True):
    """One model of the chain: its targets, to be ordered by its policy when tried."""

    model: str
    policy: Policy
    candidates: tuple[Target, ...]


class Plan(msgspec.Struct, frozen=True):
    """The models to try in order (the requested one, then its fallbacks, each once) and the
    metric label."""

    model_label: str
    steps: tuple[Step, ...]
    keyed: bool = False  # a model of the chain uses `affinity`: requests need its key


def plan(config: Config, model: str, known: Collection[str] = ()) -> Plan:
    """Resolve the client's `model` to the chain of models to try, or raise `NotFound`.

    Fallbacks are followed to any depth, breadth first, each model once.
    """
    if not config.models:
        label = model if model in known else UNKNOWN_MODEL
        backends = tuple(Target(backend=name, upstream_model=None) for name in config.backends)
        return Plan(model_label=label, steps=(Step(model, "least_loaded", backends),))
    entry = config.models.get(model)
    if entry is None:
        raise NotFound(f"model '{model[:200]}' does not exist; GET /v1/models lists the models")
    chain, queue = [model], list(entry.fallbacks)
    while queue:
        name = queue.pop(0)
        if name not in chain and name in config.models:
            chain.append(name)
            queue.extend(config.models[name].fallbacks)
    steps = tuple(
        Step(name, config.models[name].policy, tuple(targets_of(name, config.models[name], model)))
        for name in chain
    )
    keyed = any(step.policy == "affinity" for step in steps)
    return Plan(model_label=model, steps=steps, keyed=keyed)


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
