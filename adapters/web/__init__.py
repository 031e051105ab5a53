"""The chat page: plain HTML, CSS and JavaScript, served by the gateway on its own port
(see ``adapters.gateway``). The page is a gateway client like any other."""

from ._http import BadRequest as BadRequest
from ._http import RequestHead as RequestHead
from ._http import answer as answer
from ._http import read_head as read_head
from ._http import send_error as send_error
from ._replay import ReplayStream as ReplayStream
