"""An OpenAI-compatible HTTP server for LLaDA models (``llada serve``; needs the ``serve`` extra).

Modules: ``config`` (ServerConfig), ``schemas`` (request checking), ``worker`` (the thread that owns
the model and the scheduler), ``completions`` (answers and streams; their text comes from
``llada.engine.answer_text``), ``metrics`` (Prometheus), ``errors`` (OpenAI error bodies), ``app`` (routes:
``create_app``), ``runner`` (uvicorn with the limits and the shutdown drain), ``background`` (that
server in a thread). Nothing is imported here, so that ``llada.server.config`` works without FastAPI
installed.
"""
