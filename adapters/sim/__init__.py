"""The embedded simulated model provider: a real HTTP server on 127.0.0.1 that streams
Anthropic Messages, OpenAI chat completions, OpenAI Responses and Gemini replies, scripted
by a ``#sim key=value`` line in the last user message, and records when each client hung
up.

Tests start it with ``server = await nursery.start(serve_sim)`` and point a client at
``server.base_url``; ``python -m adapters.sim --port N`` runs it standalone.
"""

from __future__ import annotations

from ._directives import Directive as Directive
from ._directives import DirectiveError as DirectiveError
from ._directives import parse_directive as parse_directive
from ._records import ConnectionRecord as ConnectionRecord
from ._server import CONNECTIONS_PATH as CONNECTIONS_PATH
from ._server import SimServer as SimServer
from ._server import main as main
from ._server import serve_sim as serve_sim

__all__ = [
    "CONNECTIONS_PATH",
    "ConnectionRecord",
    "Directive",
    "DirectiveError",
    "SimServer",
    "main",
    "parse_directive",
    "serve_sim",
]
