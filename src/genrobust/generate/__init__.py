"""Generation: strategies (what to ask for), generators (how), and the resumable, shardable runner."""
from . import pipelines  # noqa: F401  (registers the diffusers generators; diffusers loads only when used)
from .generators import GENERATORS, create_generator, list_generators
from .runner import generate, merge, regenerate
from .strategies import STRATEGIES, Request, Sources, create_strategy, derive_seed, list_strategies

__all__ = ["GENERATORS", "STRATEGIES", "Request", "Sources", "create_generator", "create_strategy",
           "derive_seed", "generate", "list_generators", "list_strategies", "merge", "regenerate"]
