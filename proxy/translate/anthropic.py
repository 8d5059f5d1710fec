"""The Anthropic Messages API served from a chat-completions backend.

`to_chat_request` turns the client's request into a chat request, `from_chat_response` turns the
backend's `chat.completion` into a Messages response, and `AnthropicStream` turns its
`chat.completion.chunk`s into Anthropic's stream events. Errors in Anthropic's own shape are
rendered by `proxy.errors.envelope(err, "anthropic")` and `sse_error(err, "anthropic")`.
"""

from proxy.translate.anthropic_request import to_chat_request
from proxy.translate.anthropic_response import AnthropicStream, from_chat_response, make_message_id

__all__ = ["AnthropicStream", "from_chat_response", "make_message_id", "to_chat_request"]
