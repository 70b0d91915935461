"""`eval_model.py --serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) and a chat page.

  protocol.py  the request bodies (checked strictly), OpenAI's error object, stop strings
  app.py       the endpoints, streaming, the hand-over from the engine's thread (model/engine.py), run()
  page.html    the chat page served at /: one self-contained file, no build step, nothing from a CDN
"""

from .app import Defaults, build_app, run, server

__all__ = ["Defaults", "build_app", "run", "server"]
