"""The fixed words the sim says, so every run of a test or a benchmark sees the same reply.

The default reply is readable English of about 150 words; at 30 words a second it lasts
five seconds, long enough for a person to press Stop in a demo.
"""

from __future__ import annotations

import itertools
from typing import Final

REPLY_TEXT: Final = (
    "Rivers do not hurry, yet they always arrive. This reply comes from a simulated model, "
    "so you can watch the words appear one at a time at a steady pace and press Stop "
    "whenever you like. When you do, the client should close its connection at once, and "
    "the server will notice the moment the socket goes quiet. Nothing here is clever: the "
    "sentences are fixed, the timing is fixed, and every run looks the same, which is "
    "exactly what a test needs. Imagine a lighthouse keeper who climbs the stairs each "
    "evening, trims the wick, and watches the beam sweep across the water. Ships pass, "
    "some near and some far, and none of them know his name. He does not mind. The work is "
    "simple and it matters, and when morning comes he puts out the light and goes down to "
    "breakfast, content that the night went as planned."
)

THINKING_TEXT: Final = (
    "The user asked for a reply, so I will consider the request briefly and then answer."
)

REPLY_WORDS: Final = tuple(REPLY_TEXT.split())
THINKING_WORDS: Final = tuple(THINKING_TEXT.split())


def reply_words(count: int, *, start: int = 0) -> list[str]:
    """``count`` words of the reply text from word ``start``, wrapping around as needed."""
    cycle = itertools.cycle(REPLY_WORDS)
    return list(itertools.islice(cycle, start % len(REPLY_WORDS), start % len(REPLY_WORDS) + count))
