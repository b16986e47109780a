"""Online inference: an OpenAI-compatible vLLM endpoint on Ray Serve (``kind: OnlineInference``).

>>> from runtime.specs import load_spec
>>> from runtime.serving import run_serving, build_serve_config
>>> build_serve_config(load_spec("examples/serve.yaml"))     # the `serve deploy` config  # doctest: +SKIP
>>> run_serving(load_spec("examples/serve.yaml"))            # serves until Ctrl-C       # doctest: +SKIP

Ray and vLLM load only when serving starts (``runtime.serving.app``).
"""

from runtime.serving.config import build_serve_config
from runtime.serving.runner import ServeResult, run_serving, start_serving

__all__ = ["ServeResult", "build_serve_config", "run_serving", "start_serving"]
