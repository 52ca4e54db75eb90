"""Conditioning strategies: each turns (classes, amount, run seed) into a list of generation requests.

A strategy only decides *what* to ask for; the generator decides how (its prompt templates, its model).
"""
import hashlib
import logging
from dataclasses import asdict, dataclass

from ..registry import Registry

logger = logging.getLogger(__name__)
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
    caption: str = None  # the source image's caption (captions strategy), filled in by the runner

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


def _text_only(name, per_class, sources, per_image):
    if per_image is not None:
        raise ValueError(f"--per-image needs a strategy that starts from real images (image, image-label, "
                         f"captions), not {name!r}; use --per-class")
    if per_class is None or per_class < 1:
        raise ValueError(f"--per-class must be at least 1, got {per_class}")


@STRATEGIES.register("label", description="the generator's class-label prompt, e.g. 'a photo of a {}.'")
def label_strategy(classes, per_class, seed, prompts, sources=None, per_image=None):
    _text_only("label", per_class, sources, per_image)
    return _requests(classes, per_class, seed, lambda name, s: prompts.label.format(name))


@STRATEGIES.register("templates", description="one of the generator's diverse templates per image, "
                                              "chosen by the image's seed")
def templates_strategy(classes, per_class, seed, prompts, sources=None, per_image=None):
    _text_only("templates", per_class, sources, per_image)
    t = prompts.templates
    return _requests(classes, per_class, seed, lambda name, s: t[s % len(t)].format(name))


@STRATEGIES.register("class", description="the class index only (class-conditional models)")
def class_strategy(classes, per_class, seed, prompts, sources=None, per_image=None):
    _text_only("class", per_class, sources, per_image)
    return _requests(classes, per_class, seed, lambda name, s: None)


def _sourced(classes, per_class, seed, sources, per_image, prompt_for, name):
    """Requests that each start from a real image of their class: K per source image (`per_image`), or
    `per_class` per class cycling through the class's sources in order."""
    if sources is None:
        raise ValueError(f"strategy {name!r} starts from real images: pass --source DATASET (e.g. "
                         "digits-mnist/train or imagefolder:PATH)")
    if (per_class is None) == (per_image is None):
        raise ValueError("give exactly one of --per-class N and --per-image K")
    amount = per_image if per_image is not None else per_class
    if amount < 1:
        raise ValueError(f"--per-{'image' if per_image is not None else 'class'} must be at least 1, got {amount}")
    out = []
    for c, cls in enumerate(classes):
        refs = sources.refs(cls)
        if not refs:
            raise ValueError(f"the source set has no readable image of class {cls!r}")
        n = len(refs) * per_image if per_image is not None else per_class
        for i in range(n):
            ref = refs[i // per_image] if per_image is not None else refs[i % len(refs)]
            out.append(Request(class_id=c, class_name=cls, index=i, seed=derive_seed(seed, c, i),
                               prompt=prompt_for(cls), source_image=ref))
    return out


@STRATEGIES.register("image", description="a real image only (image variations; SDEdit for digits)")
def image_strategy(classes, per_class, seed, prompts, sources=None, per_image=None):
    return _sourced(classes, per_class, seed, sources, per_image, lambda cls: None, "image")


@STRATEGIES.register("image-label", description="a real image and its class prompt, at --strength (img2img)")
def image_label_strategy(classes, per_class, seed, prompts, sources=None, per_image=None):
    return _sourced(classes, per_class, seed, sources, per_image, lambda cls: prompts.label.format(cls),
                    "image-label")


@STRATEGIES.register("captions", description="a captioner's description of a real image of the class, with "
                                             "the class name enforced")
def captions_strategy(classes, per_class, seed, prompts, sources=None, per_image=None):
    # the prompt is the caption of the source image, filled in by the runner from its caption cache
    return _sourced(classes, per_class, seed, sources, per_image, lambda cls: None, "captions")


class Sources:
    """Real source images by class, referenced by strings that the manifest records.

    `imagefolder:PATH` sets are listed, never opened, at start (`data.listing`: cached, so every rank reads
    one listing; references are paths relative to PATH); registered sets are referenced as `SPEC#INDEX`.
    A file that cannot be decoded is found when a batch needs it (`load_or_skip`): it is recorded in
    `skipped` with a warning, and more than `max_corrupt` of the sources unreadable is an error.
    """

    def __init__(self, spec, max_corrupt=0.01):
        self.spec, self.max_corrupt = spec, max_corrupt
        self.root = None  # the folder of an imagefolder: set; None for a registered (in-memory) set
        self.skipped = []
        self._by_class = {}
        if spec.startswith("imagefolder:"):
            from ..data.listing import list_folder
            listing = list_folder(spec.split(":", 1)[1])
            self.root = listing.root
            for f, y in zip(listing.files, listing.labels):
                self._by_class.setdefault(listing.classes[y], []).append(f)
            self._total = len(listing)
        else:
            from ..data import load_dataset
            self._data = load_dataset(spec)
            for i, y in enumerate(self._data.labels.tolist()):
                self._by_class.setdefault(self._data.classes[y], []).append(f"{spec}#{i}")
            self._total = len(self._data)

    def refs(self, class_name):
        return self._by_class.get(class_name, [])

    def load(self, ref):
        """The source image as a PIL RGB image; an unreadable file is a ValueError naming it."""
        from PIL import Image
        if self.root is None:
            img = self._data.images[int(ref.rsplit("#", 1)[1])]
            arr = img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()
            return Image.fromarray(arr).convert("RGB")
        try:
            with Image.open(self.root / ref) as im:
                return im.convert("RGB")
        except Exception as e:  # PIL raises several kinds (UnidentifiedImageError, SyntaxError, OSError, ...)
            raise ValueError(f"unreadable source image {self.root / ref} ({e.__class__.__name__}); delete or "
                             "replace it") from None

    def load_or_skip(self, ref):
        """`load`, or None for an unreadable file, which joins `skipped` (once); too many is an error."""
        try:
            return self.load(ref)
        except ValueError as e:
            if ref not in self.skipped:
                self.skipped.append(ref)
                logger.warning("%s; skipped (%d of %d sources so far)", e, len(self.skipped), self._total)
            if len(self.skipped) > self.max_corrupt * self._total:
                raise ValueError(f"{len(self.skipped)} of {self._total} source images in {self.root} are "
                                 f"unreadable (e.g. {self.skipped[0]}), more than --max-corrupt "
                                 f"{self.max_corrupt:g} allows: delete or replace them") from None
            return None


def create_strategy(name):
    return STRATEGIES.get(name)


def list_strategies(pattern="*"):
    return STRATEGIES.list(pattern)
