"""The `vllm.general_plugins` entry point (pyproject: `slofleet = ...plugin:register`).

vLLM calls `register()` once in each of its processes (API server, engine core, workers) before
it builds the engine. slofleet extends the engine only through public flags (worker extension,
KV connector), and those read vLLM internals that change between minor releases, so the plugin's
one job is to refuse an engine of another series loudly at startup instead of failing later
inside a request. It patches nothing.
"""

from __future__ import annotations

import logging
import os

import vllm

# A child of the "vllm" logger, so that our lines go through vLLM's own handler and format.
logger = logging.getLogger("vllm.slofleet")

# The vLLM series the worker extension and KV connector are written against (pyproject pins it).
SUPPORTED_SERIES = "0.32"
# Escape hatch for trying a new vLLM release before the pin moves.
ALLOW_ANY_VERSION_ENV = "SLOFLEET_VLLM_ALLOW_ANY_VERSION"


def check_version(version: str) -> None:
    """Raise if `version` is not of the supported series (unless the escape hatch is set)."""
    series = ".".join(version.split(".")[:2])
    if series == SUPPORTED_SERIES or os.environ.get(ALLOW_ANY_VERSION_ENV) == "1":
        return
    raise RuntimeError(
        f"vllm version {version}: slofleet's engine extension supports vLLM {SUPPORTED_SERIES}.x "
        f"only; install the pinned engine (pip install 'slofleet[engine-cpu]') or set "
        f"{ALLOW_ANY_VERSION_ENV}=1 to try anyway"
    )


def register() -> None:
    check_version(vllm.__version__)
    logger.info("slofleet vLLM plugin loaded (vllm %s, pid %d)", vllm.__version__, os.getpid())
