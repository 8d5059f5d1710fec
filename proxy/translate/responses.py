"""The OpenAI Responses API served from a chat-completions backend (TGI, or `openai` when told so).

`to_chat_request` turns a `/v1/responses` request into a chat request, `from_chat_response` turns
the backend's `chat.completion` into a Response object, and `ResponsesStream` turns its
`chat.completion.chunk`s into the Responses event stream. The gateway stores nothing, so whatever
needs a stored response, conversation or prompt is refused with a 400 that says so.
"""

from proxy.translate.responses_request import to_chat_request
from proxy.translate.responses_response import ResponsesStream, from_chat_response

__all__ = ["ResponsesStream", "from_chat_response", "to_chat_request"]
