"""The Gemini generateContent API served from a chat-completions backend.

`to_chat_request` turns the client's request into a chat request, `from_chat_response` turns the
backend's `chat.completion` into a GenerateContentResponse, and `GeminiStream` turns its
`chat.completion.chunk`s into the `:streamGenerateContent?alt=sse` stream. Errors in Google's own
shape are rendered by `proxy.errors.envelope(err, "gemini")` and `sse_error(err, "gemini")`.
"""

from proxy.translate.gemini_request import to_chat_request
from proxy.translate.gemini_response import GeminiStream, from_chat_response

__all__ = ["GeminiStream", "from_chat_response", "to_chat_request"]
