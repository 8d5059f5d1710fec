"""Which backend serves a request: model entries, upstream ids, fallbacks, weights, readiness."""

from __future__ import annotations

import pytest

from proxy.accesslog import AccessLog
from proxy.auth import KeySet
from proxy.config import Config, load_config
from proxy.errors import NotFound
from proxy.health import unready_models
from proxy.metrics import Metrics
from proxy.routing import UNKNOWN_MODEL, Plan, Step, Target, plan, targets_of
from proxy.state import GatewayState

BACKENDS = """
backends:
  gpu-a: {url: 'http://10.0.0.5:8000', kind: vllm}
  gpu-b: {url: 'http://10.0.0.6:8080', kind: tgi}
  gpu-c: {url: 'http://10.0.0.7:8080', kind: sglang}
"""
MODELS = """
models:
  qwen:
    targets:
      - {backend: gpu-a, model: Qwen/Qwen2.5-7B-Instruct}
    fallbacks: [qwen-small, llama]
  qwen-small:
    targets:
      - {backend: gpu-b}
  llama:
    targets:
      - {backend: gpu-c, model: meta-llama/Llama-3.1-8B}
  same:
    targets:
      - {backend: gpu-a, model: same}
  split:
    targets:
      - {backend: gpu-a, model: up-a, weight: 3}
      - {backend: gpu-b, model: up-b, weight: 1}
"""
PASSTHROUGH = load_config(BACKENDS)
ROUTED = load_config(BACKENDS + MODELS)


def test_no_models_passes_through_with_a_known_label() -> None:
    """Without models, a model a backend listed is its own label and the body is untouched;
    every backend is a candidate."""
    result = plan(PASSTHROUGH, "llama3", known={"llama3", "other"})
    assert "llama3" == result.model_label
    assert 1 == len(result.steps)
    assert {"gpu-a", "gpu-b", "gpu-c"} == {t.backend for t in result.steps[0].candidates}
    assert {None} == {t.upstream_model for t in result.steps[0].candidates}


def test_no_models_labels_an_unlisted_model_unknown() -> None:
    """Without models, a name no backend listed is still forwarded, labelled `unknown`."""
    result = plan(PASSTHROUGH, "made-up-model", known={"llama3"})
    assert UNKNOWN_MODEL == result.model_label == "unknown"


def test_unknown_model_is_not_found() -> None:
    """With models configured, a name not among them is a 404 pointing at /v1/models."""
    with pytest.raises(NotFound) as caught:
        plan(ROUTED, "gpt-4o")
    assert 404 == caught.value.status
    assert "model 'gpt-4o' does not exist; GET /v1/models lists the models" == caught.value.message


def test_not_found_quotes_at_most_200_characters() -> None:
    """A huge model name is not echoed back whole."""
    with pytest.raises(NotFound) as caught:
        plan(ROUTED, "x" * 10_000)
    assert f"model '{'x' * 200}' does not exist" in caught.value.message


def test_plan_with_fallbacks() -> None:
    """The model's own targets come first, then each fallback's, in the configured order."""
    expected = Plan(
        model_label="qwen",
        steps=(
            Step("qwen", "least_loaded", (Target("gpu-a", "Qwen/Qwen2.5-7B-Instruct"),)),
            Step("qwen-small", "least_loaded", (Target("gpu-b", "qwen-small"),)),
            Step("llama", "least_loaded", (Target("gpu-c", "meta-llama/Llama-3.1-8B"),)),
        ),
    )
    assert expected == plan(ROUTED, "qwen")


def test_fallbacks_of_fallbacks_each_model_once() -> None:
    """Fallbacks are followed to any depth, breadth first, and no model is tried twice."""
    config = load_config(
        BACKENDS
        + "models:\n"
        + "  a: {targets: [{backend: gpu-a}], fallbacks: [b, c]}\n"
        + "  b: {targets: [{backend: gpu-b}], fallbacks: [d, c]}\n"
        + "  c: {targets: [{backend: gpu-c}]}\n"
        + "  d: {targets: [{backend: gpu-a, model: dd}]}\n"
    )
    assert ["a", "b", "c", "d"] == [step.model for step in plan(config, "a").steps]


def test_fallback_targets_get_the_fallbacks_name() -> None:
    """A fallback target without its own model id is sent the fallback's name, not the client's."""
    steps = plan(ROUTED, "qwen").steps
    assert "qwen-small" == steps[1].candidates[0].upstream_model


def test_upstream_model_none_when_it_equals_what_was_sent() -> None:
    """No rewrite is planned when the upstream id is the name the client sent."""
    assert (Target("gpu-b", None),) == plan(ROUTED, "qwen-small").steps[0].candidates
    assert (Target("gpu-a", None),) == plan(ROUTED, "same").steps[0].candidates


def test_targets_of_names_and_weights() -> None:
    """targets_of keeps backends and weights, and rewrites only ids that differ from the request."""
    expected = [Target("gpu-a", "up-a", 3.0), Target("gpu-b", "up-b", 1.0)]
    assert expected == targets_of("split", ROUTED.models["split"], "split")
    assert [Target("gpu-b", None)] == targets_of(
        "qwen-small", ROUTED.models["qwen-small"], "qwen-small"
    )
    assert [Target("gpu-b", "qwen-small")] == targets_of(
        "qwen-small", ROUTED.models["qwen-small"], "qwen"
    )


def test_policy_comes_from_the_model() -> None:
    """Each step carries its own model's policy (least_loaded unless configured)."""
    config = load_config(
        BACKENDS
        + "models:\n"
        + "  a: {targets: [{backend: gpu-a}], fallbacks: [b], policy: affinity}\n"
        + "  b: {targets: [{backend: gpu-b}], policy: weighted}\n"
    )
    assert ["affinity", "weighted"] == [step.policy for step in plan(config, "a").steps]


# --- readiness (health.unready_models) ---------------------------------------------------


def test_unready_models_all_healthy() -> None:
    """Every model with a healthy target is ready."""
    assert [] == unready_models(ROUTED, {"gpu-a": True, "gpu-b": True, "gpu-c": True})


def test_unready_models_names_those_without_a_healthy_target() -> None:
    """A model is unready when none of its targets is healthy; a fallback does not count."""
    healthy = {"gpu-a": False, "gpu-b": True, "gpu-c": True}
    assert ["qwen", "same"] == unready_models(ROUTED, healthy)


def test_unready_models_one_healthy_target_is_enough() -> None:
    """A model with several targets is ready while any one of them is healthy."""
    healthy = {"gpu-a": False, "gpu-b": True, "gpu-c": False}
    assert ["llama", "qwen", "same"] == unready_models(ROUTED, healthy)


def test_unready_models_unknown_health_is_down() -> None:
    """A backend not yet probed counts as down."""
    assert ["llama", "qwen", "qwen-small", "same", "split"] == unready_models(ROUTED, {})


def test_unready_backends_without_models() -> None:
    """Without models, ready means some backend is up; else every backend is named."""
    assert [] == unready_models(PASSTHROUGH, {"gpu-a": False, "gpu-b": True, "gpu-c": False})
    assert ["gpu-a", "gpu-b", "gpu-c"] == unready_models(
        PASSTHROUGH, {"gpu-a": False, "gpu-b": False, "gpu-c": False}
    )


def test_the_state_plans_a_listed_model_once_until_the_lists_change() -> None:
    """With no models configured, a model the backends list is planned once (the plan is
    the same object each request) and again when a discovery replaces the lists; a name no
    backend lists is planned each time (clients choose those names), labelled unknown."""
    config = load_config(BACKENDS)
    state = _state(config)
    state.known_models = {"qwen"}
    first = state.plan("qwen")
    assert first is state.plan("qwen") and first.model_label == "qwen"
    stranger = state.plan("made-up")
    assert stranger == state.plan("made-up") and stranger is not state.plan("made-up")
    assert UNKNOWN_MODEL == stranger.model_label
    state.known_models = {"llama"}  # the backends now list another model
    again = state.plan("qwen")
    assert again is not first and UNKNOWN_MODEL == again.model_label
    assert state.plan("llama") is state.plan("llama")


def test_the_state_plans_a_configured_model_once() -> None:
    config = load_config(BACKENDS + MODELS)
    state = _state(config)
    made = state.plan("qwen")
    state.known_models = {"other"}  # the lists do not matter to configured models
    assert made is state.plan("qwen")
    with pytest.raises(NotFound):
        state.plan("other")


def _state(config: Config) -> GatewayState:
    return GatewayState(
        config, KeySet([]), {}, Metrics(list(config.backends), 60.0), AccessLog(None)
    )
