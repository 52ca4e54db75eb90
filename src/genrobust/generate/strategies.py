"""Conditioning strategies: each turns (classes, amount, run seed) into a list of generation requests.

A strategy only decides *what* to ask for; the generator decides how (its prompt templates, its model).
"""
import hashlib
from dataclasses import asdict, dataclass

from ..registry import Registry

STRATEGIES = Registry("strategy")


def derive_seed(run_seed, class_id, index, attempt=0):
    """A 63-bit seed from (run seed, class, index[, attempt]): any image can be regenerated alone."""
    key = f"genrobust:{run_seed}:{class_id}:{index}" + (f":{attempt}" if attempt else "")
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 1


@dataclass(frozen=True)
class Request:
    """One image to generate. `index` is its position within its class (0..per_class-1)."""

    class_id: int
    class_name: str
    index: int
    seed: int
    prompt: str = None
    style: str = None
    source_image: str = None

    @property
    def key(self):
        return f"{self.class_id}:{self.index}"

    def to_dict(self):
        return asdict(self)


@dataclass(frozen=True)
class Prompts:
    """What a generator understands: its class-label prompt and its diverse templates (one `{}` each)."""

    label: str
    templates: tuple


def _requests(classes, per_class, seed, prompt_for):
    return [Request(class_id=c, class_name=name, index=i, seed=(s := derive_seed(seed, c, i)),
                    prompt=prompt_for(name, s))
            for c, name in enumerate(classes) for i in range(per_class)]


@STRATEGIES.register("label", description="the generator's class-label prompt, e.g. 'a photo of a {}.'")
def label_strategy(classes, per_class, seed, prompts):
    return _requests(classes, per_class, seed, lambda name, s: prompts.label.format(name))


@STRATEGIES.register("templates", description="one of the generator's diverse templates per image, "
                                              "chosen by the image's seed")
def templates_strategy(classes, per_class, seed, prompts):
    t = prompts.templates
    return _requests(classes, per_class, seed, lambda name, s: t[s % len(t)].format(name))


def create_strategy(name):
    return STRATEGIES.get(name)


def list_strategies(pattern="*"):
    return STRATEGIES.list(pattern)
