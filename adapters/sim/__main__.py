"""``python -m adapters.sim --port N``: serve the sim until Ctrl-C."""

from __future__ import annotations

from ._server import main

main()
