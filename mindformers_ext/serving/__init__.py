"""Serving: a continuous-batching engine over a paged KV cache, and an OpenAI-compatible HTTP API.

``engine.Engine`` runs the requests (each step admits and prefills new requests within a token
budget, then decodes one token for every running one); ``api.build_app`` puts the OpenAI endpoints
in front of it; ``tools/serve.py`` is the command line.
"""
from mindformers_ext.serving.engine import Engine, EngineFull, Event, GenerationRequest

__all__ = ["Engine", "EngineFull", "Event", "GenerationRequest"]
