"""The Model port over the OpenAI Responses API (``POST {base_url}/responses`` with
``stream: true``), streamed with httpx and parsed with httpx-sse.

Configuration: ``model`` (required), ``base_url`` or ``OPENAI_BASE_URL`` (default
``https://api.openai.com/v1``), ``api_key`` or ``OPENAI_API_KEY`` (optional: local servers
that speak the Responses API need none). ``open_openai_responses`` owns one
``httpx.AsyncClient`` for the runtime's lifetime.

Requests are stateless: ``store: false`` and the whole history as input items every turn
(user and assistant messages, ``function_call`` and ``function_call_output`` items), never
``previous_response_id``. So a stopped turn leaves nothing on the server that the next one
depends on, and the runtime's history stays the only truth. Thinking: when
``request.thinking`` is true the request asks for ``reasoning: {effort: "medium", summary:
"auto"}``; reasoning summary deltas (and raw ``reasoning_text`` deltas, from open-weight
servers) become ``ThinkingChunk``. Reasoning items are not sent back.

Events used: ``response.output_text.delta``, ``response.reasoning_summary_text.delta``,
``response.output_item.added`` / ``.done`` (function calls), ``response.function_call_
arguments.delta``, ``response.refusal.delta``, and the terminal ``response.completed``
(usage), ``response.incomplete`` (``max_output_tokens`` is ``max_tokens``,
``content_filter`` a refusal), ``response.failed`` and ``error`` (mapped by their code).
``TurnEnd`` comes at the end of the body, as in ``openai_compat``. Stopping, retries and
the other errors are those of ``adapters._http``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, Final, final

import attrs
import httpx

from runtime import (
    ModelError,
    ModelEvent,
    ModelRequest,
    TextChunk,
    ThinkingChunk,
    ToolCallBegin,
    ToolResultBlock,
    ToolUseBlock,
    UsageReport,
)

from ._http import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_READ_TIMEOUT,
    BadResponse,
    Endpoint,
    EndpointModel,
    Parser,
    ProviderError,
    StreamedCall,
    Wording,
    field,
    json_object,
    open_client,
)
from .openai_compat import openai_settings

WORDING: Final = Wording(
    server="a server that speaks the OpenAI Responses API",
    stream="Responses API event stream",
    key_env="OPENAI_API_KEY",
    url_hint="ends in /v1",
)


@final
@attrs.define(eq=False)
class OpenAIResponsesModel(EndpointModel):
    """One model behind the OpenAI Responses API, streamed through a shared client."""

    def turn(self, request: ModelRequest) -> tuple[str, Mapping[str, Any], Parser]:
        return "/responses", _request_body(self.model, request), _Turn()


@asynccontextmanager
async def open_openai_responses(
    *,
    model: str,
    base_url: str | None = None,
    api_key: str | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    max_retries: int = 2,
    transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[OpenAIResponsesModel]:
    """Open the shared client for the runtime's lifetime and yield the model on it.

    ``base_url`` and ``api_key`` default to ``OPENAI_BASE_URL`` and ``OPENAI_API_KEY``;
    ``transport`` is for tests and custom transports.
    """
    if not model:
        raise ValueError("model is required: pass the model's name, e.g. 'gpt-5-mini'.")
    base_url, api_key = openai_settings(base_url, api_key)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with open_client(
        headers, connect_timeout=connect_timeout, read_timeout=read_timeout, transport=transport
    ) as client:
        endpoint = Endpoint(client, base_url, model, WORDING, api_key, max_retries)
        yield OpenAIResponsesModel(endpoint=endpoint)


def _request_body(model: str, request: ModelRequest) -> dict[str, Any]:
    """The Responses API request for a turn. Thinking blocks are not sent back."""
    items: list[dict[str, Any]] = []
    for message in request.messages:
        if message.role == "tool":
            items.extend(
                {
                    "type": "function_call_output",
                    "call_id": block.tool_call_id,
                    "output": f"Error: {block.content}" if block.is_error else block.content,
                }
                for block in message.content
                if isinstance(block, ToolResultBlock)
            )
            continue
        if message.text:
            items.append({"role": message.role, "content": message.text})
        items.extend(
            {
                "type": "function_call",
                "call_id": block.id,
                "name": block.name,
                "arguments": json.dumps(dict(block.arguments)),
            }
            for block in message.content
            if isinstance(block, ToolUseBlock)
        )
    body: dict[str, Any] = {
        "model": model,
        "input": items,
        "stream": True,
        "store": False,
        "max_output_tokens": request.max_tokens,
    }
    if request.system:
        body["instructions"] = request.system
    if request.tools:
        body["tools"] = [
            {
                "type": "function",
                "name": tool.name,
                "description": tool.description,
                "parameters": dict(tool.parameters),
            }
            for tool in request.tools
        ]
    if request.thinking:
        body["reasoning"] = {"effort": "medium", "summary": "auto"}
    return body


# -- the response -------------------------------------------------------------------------


@final
@attrs.define(eq=False)
class _Turn(Parser):
    """Responses API events in, model events out; after the terminal event, nothing."""

    _calls: dict[int, StreamedCall] = attrs.Factory(dict)  # by output_index
    _refusal: list[str] = attrs.Factory(list)
    # A call whose arguments do not parse: dropped if the turn then ends at the output
    # limit (max_output_tokens cut it off), else the turn fails with this.
    _unparsed: BadResponse | None = None

    def payload(self, data: str) -> list[ModelEvent | ModelError]:
        if self.stop_reason is not None:
            return []
        event = json_object(data)
        match field(event, "type", str):
            case "response.output_text.delta":
                return [TextChunk(text)] if (text := field(event, "delta", str)) else []
            case "response.reasoning_summary_text.delta" | "response.reasoning_text.delta":
                return [ThinkingChunk(text)] if (text := field(event, "delta", str)) else []
            case "response.reasoning_summary_part.added" if field(event, "summary_index", int):
                return [ThinkingChunk("\n\n")]  # between two parts of one summary
            case "response.refusal.delta":
                self._refusal.append(field(event, "delta", str) or "")
            case "response.output_item.added":
                return self._item_added(event)
            case "response.function_call_arguments.delta":
                call = self._calls.get(field(event, "output_index", int) or 0)
                if call is not None and (fragment := field(event, "delta", str)):
                    return [call.add(fragment)]
            case "response.output_item.done":
                return self._item_done(event)
            case "response.completed" | "response.incomplete" as kind:
                return self._finish(kind, field(event, "response", dict) or {})
            case "response.failed":
                response = field(event, "response", dict) or {}
                raise ProviderError.of(response.get("error") or "no details")
            case "error":
                raise ProviderError.of(event)
        return []

    def _item_added(self, event: Mapping[str, Any]) -> list[ModelEvent | ModelError]:
        item = field(event, "item", dict) or {}
        if item.get("type") != "function_call":
            return []
        name, call_id = field(item, "name", str), field(item, "call_id", str)
        if not name or not call_id:
            raise BadResponse("a function call item came without a name or call_id")
        self._calls[field(event, "output_index", int) or 0] = StreamedCall(call_id, name)
        return [ToolCallBegin(call_id, name)]

    def _item_done(self, event: Mapping[str, Any]) -> list[ModelEvent | ModelError]:
        """A function call is complete. Its arguments were streamed, or (from servers that
        send none) arrive whole here and go out as one fragment."""
        item = field(event, "item", dict) or {}
        call = self._calls.get(field(event, "output_index", int) or 0)
        if item.get("type") != "function_call" or call is None:
            return []
        events: list[ModelEvent | ModelError] = []
        if not call.fragments and (arguments := field(item, "arguments", str)):
            events.append(call.add(arguments))
        if item.get("status") == "incomplete":  # cut off by the output limit: never ran
            return events
        try:
            return [*events, call.end()]
        except BadResponse as exc:
            self._unparsed = self._unparsed or exc
            return events

    def _finish(self, kind: str, response: Mapping[str, Any]) -> list[ModelEvent | ModelError]:
        events: list[ModelEvent | ModelError] = []
        if usage := field(response, "usage", dict):
            events.append(
                UsageReport(
                    input_tokens=field(usage, "input_tokens", int),
                    output_tokens=field(usage, "output_tokens", int),
                )
            )
        details = field(response, "incomplete_details", dict) or {}
        reason = field(details, "reason", str) if kind == "response.incomplete" else None
        if self._refusal or reason == "content_filter":
            said = "".join(self._refusal).strip() or "its content filter stopped the reply"
            return [*events, ModelError("refusal", _refusal_message(said))]
        if reason == "max_output_tokens":
            self.stop_reason = "max_tokens"
        elif self._unparsed is not None:
            raise self._unparsed
        elif reason is not None:
            self.stop_reason = reason
        else:
            self.stop_reason = "tool_use" if self._calls else "end_turn"
        return events


def _refusal_message(said: str) -> str:
    said = said if said.endswith(".") else f"{said}."
    return f"The model declined to answer ({said}) Rephrase the request or ask something else."
