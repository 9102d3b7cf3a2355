"""An OpenAI-compatible HTTP server for LLaDA models (``llada serve``; needs the ``serve`` extra).

Modules: ``config`` (ServerConfig), ``schemas`` (request checking), ``text`` (settled answer text),
``worker`` (the thread that owns the model and the scheduler), ``completions`` (answers and streams),
``metrics`` (Prometheus), ``errors`` (OpenAI error bodies), ``app`` (routes: ``create_app``).
Nothing is imported here, so that ``llada.server.config`` works without FastAPI installed.
"""
