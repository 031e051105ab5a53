"""The WebSocket gateway: the OpenClaw gateway protocol (v4) over trio-websocket, in front
of one ``Runtime``. See ../shared/PROTOCOL.md and the README's protocol section."""

from ._auth import read_token_file as read_token_file
from ._server import DEFAULT_PORT as DEFAULT_PORT
from ._server import Gateway as Gateway
from ._server import UnsafeBind as UnsafeBind
from ._server import check_bind as check_bind
