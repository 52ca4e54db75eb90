"""Generation: strategies (what to ask for), generators (how), and the resumable runner."""
from .generators import GENERATORS, create_generator, list_generators
from .runner import generate
from .strategies import STRATEGIES, Request, create_strategy, derive_seed, list_strategies

__all__ = ["GENERATORS", "STRATEGIES", "Request", "create_generator", "create_strategy", "derive_seed",
           "generate", "list_generators", "list_strategies"]
