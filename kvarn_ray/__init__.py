"""kvarn_ray: the Ray Serve application around the kvarn engine.

    OpenAIIngress (ingress.py) -> DecodeServer (decode_server.py) -> PrefillServer
    (prefill_server.py); TP rank workers (executor.py); the builder (app.py);
    the OpenAI wire format (protocol.py); Prometheus metrics (metrics.py).

``build_app`` / ``build_pd_app`` are loaded on first use, so importing the package
does not start importing Ray Serve and torch.
"""

__all__ = ["build_app", "build_pd_app"]


def __getattr__(name):
    if name in ("build_app", "build_pd_app"):
        from kvarn_ray import app

        return getattr(app, name)
    raise AttributeError(f"module 'kvarn_ray' has no attribute {name!r}")
