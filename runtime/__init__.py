"""trio-agent-runtime: an embeddable agent runtime whose Stop button really stops.

Every run lives in a Trio nursery under its own cancel scope; ``Runtime.abort`` cancels
it at the next await (a provider socket read included) and a shielded stop commit saves
the partial reply, repairs the history and emits exactly one terminal event.
"""

from ._abort import AbortBus as AbortBus
from ._abort import AbortResult as AbortResult
from ._abort import LocalAbortBus as LocalAbortBus
from ._bus import Subscription as Subscription
from ._bus import SubscriptionOverflow as SubscriptionOverflow
from ._errors import AbortRefused as AbortRefused
from ._errors import AgentRuntimeError as AgentRuntimeError
from ._errors import InvalidRequest as InvalidRequest
from ._errors import RunExists as RunExists
from ._errors import RunSessionMismatch as RunSessionMismatch
from ._errors import RuntimeClosing as RuntimeClosing
from ._errors import SessionBusy as SessionBusy
from ._events import ConcurrencyPolicy as ConcurrencyPolicy
from ._events import Event as Event
from ._events import RunCancelled as RunCancelled
from ._events import RunFailed as RunFailed
from ._events import RunFinished as RunFinished
from ._events import RunQueued as RunQueued
from ._events import RunStarted as RunStarted
from ._events import StopPolicy as StopPolicy
from ._events import StopTimings as StopTimings
from ._events import StreamOptions as StreamOptions
from ._events import TerminalEvent as TerminalEvent
from ._events import TextDelta as TextDelta
from ._events import ThinkingDelta as ThinkingDelta
from ._events import ToolCallFinished as ToolCallFinished
from ._events import ToolCallProgress as ToolCallProgress
from ._events import ToolCallStarted as ToolCallStarted
from ._events import ToolReceipt as ToolReceipt
from ._events import Usage as Usage
from ._events import converter as converter
from ._events import is_terminal as is_terminal
from ._history import Block as Block
from ._history import InvalidHistory as InvalidHistory
from ._history import Message as Message
from ._history import TextBlock as TextBlock
from ._history import ThinkingBlock as ThinkingBlock
from ._history import ToolResultBlock as ToolResultBlock
from ._history import ToolUseBlock as ToolUseBlock
from ._history import validate_history as validate_history
from ._hooks import note_stopped_by_user as note_stopped_by_user
from ._model import ErrorKind as ErrorKind
from ._model import Model as Model
from ._model import ModelError as ModelError
from ._model import ModelEvent as ModelEvent
from ._model import ModelRequest as ModelRequest
from ._model import TextChunk as TextChunk
from ._model import ThinkingChunk as ThinkingChunk
from ._model import ToolCallArgs as ToolCallArgs
from ._model import ToolCallBegin as ToolCallBegin
from ._model import ToolCallEnd as ToolCallEnd
from ._model import ToolSpec as ToolSpec
from ._model import TurnEnd as TurnEnd
from ._model import UsageReport as UsageReport
from ._runtime import Run as Run
from ._runtime import RunSnapshot as RunSnapshot
from ._runtime import Runtime as Runtime
from ._runtime import RuntimeStatistics as RuntimeStatistics
from ._runtime import StopHook as StopHook
from ._runtime import is_stop_command as is_stop_command
from ._scripted import Pause as Pause
from ._scripted import ScriptedModel as ScriptedModel
from ._scripted import text_turn as text_turn
from ._scripted import tool_turn as tool_turn
from ._store import MemoryStore as MemoryStore
from ._store import RunRecord as RunRecord
from ._store import SessionSettings as SessionSettings
from ._store import Store as Store
from ._tools import Tool as Tool
from ._tools import ToolCall as ToolCall
from ._tools import current_tool_call as current_tool_call
