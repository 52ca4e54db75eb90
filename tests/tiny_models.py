"""Tiny random-weight diffusers/transformers models, built from configs and saved with `save_pretrained`.

Each builder writes a folder that loads back with `from_pretrained` exactly as a user's local model would,
and returns the folder. Weights are fixed by `torch.manual_seed`, so a builder run twice writes the same
weights. Sizes are the smallest that run: 64 px Stable Diffusion, 32 px DiT, 32 px BLIP/CLIP.
"""
import json
import pathlib
import tempfile

import torch

# A byte-level BPE vocabulary small enough to write by hand: lower-case letters and digits, alone and as
# word ends, plus a few merges. Characters outside it become the unknown token, which is all a test needs.
_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789.,")
_MERGES = ["p h", "ph o", "pho t", "phot o</w>", "o f</w>"]


def _clip_tokenizer_files(folder):
    """Write `vocab.json` + `merges.txt` for a tiny CLIPTokenizer into `folder`; return the vocab size."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>", "!"] + _CHARS + [c + "</w>" for c in _CHARS]
    for merge in _MERGES:
        tokens.append(merge.replace(" ", ""))
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n")
    return len(vocab)


def clip_tokenizer():
    """A tiny CLIPTokenizer read from hand-written vocab files (pad = end of text, as in SD)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        _clip_tokenizer_files(tmp)
        return CLIPTokenizer(f"{tmp}/vocab.json", f"{tmp}/merges.txt", pad_token="<|endoftext|>",
                             model_max_length=77)


def _text_config(vocab_size):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                          num_attention_heads=4, num_hidden_layers=2, vocab_size=max(vocab_size, 100),
                          projection_dim=32, max_position_embeddings=77)


def _vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                            image_size=32, patch_size=8, projection_dim=32)


def _image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def _unet_and_vae(cross_attention_dim=32):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=4, norm_num_groups=4)
    # Two VAE blocks: latents are 2x smaller than images, so the 32-latent UNet makes 64 px images.
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=64)
    return unet, vae


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def tiny_sd(path, seed=0):
    """A Stable Diffusion text-to-image folder (64 px, no safety checker); img2img loads it too."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    path = pathlib.Path(path)
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    unet, vae = _unet_and_vae()
    text_encoder = CLIPTextModel(_text_config(len(tokenizer)))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def tiny_sd_variation(path, seed=0):
    """A Stable Diffusion image-variation folder: the UNet conditions on a CLIP image embedding (64 px)."""
    from diffusers import StableDiffusionImageVariationPipeline
    from transformers import CLIPVisionModelWithProjection

    path = pathlib.Path(path)
    torch.manual_seed(seed)
    unet, vae = _unet_and_vae()
    pipe = StableDiffusionImageVariationPipeline(
        vae=vae, image_encoder=CLIPVisionModelWithProjection(_vision_config()), unet=unet,
        scheduler=_scheduler(), safety_checker=None, feature_extractor=_image_processor(),
        requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def imagenet_id2label():
    """The 1,000 ImageNet labels as the hub's DiT writes them: every WordNet lemma, comma-separated."""
    from genrobust.evaluate import reference

    return {str(c["index"]): ", ".join(c["wordnet_lemmas"]) for c in reference("imagenet_classes.json")["classes"]}


def tiny_dit(path, seed=0):
    """A class-conditional DiT folder (32 px) with the ImageNet id2label.

    `num_embeds_ada_norm` stays 1000: DiTPipeline hard-codes the null class of guidance as id 1000.
    """
    from diffusers import AutoencoderKL, DiTPipeline, DiTTransformer2DModel

    path = pathlib.Path(path)
    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        sample_size=16, num_layers=2, patch_size=4, attention_head_dim=8, num_attention_heads=2, in_channels=4,
        out_channels=8, activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
        norm_elementwise_affine=False)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=32)
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=_scheduler())
    # DiTPipeline does not register id2label itself; the hub's model_index.json carries it, so write it there.
    pipe.register_to_config(id2label=imagenet_id2label())
    pipe.save_pretrained(path)
    return path


def tiny_blip(path, seed=0):
    """A BLIP captioning folder (BlipForConditionalGeneration + BlipProcessor, 32 px)."""
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    path = pathlib.Path(path)
    torch.manual_seed(seed)
    # BLIP's decoder starts from "[DEC]" (its bos) and stops at "[SEP]".
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "the", "dog", "cat",
             "on", "in", "with", "red", "small", "and", "."]
    with tempfile.TemporaryDirectory() as tmp:
        pathlib.Path(tmp, "vocab.txt").write_text("\n".join(words) + "\n")
        tokenizer = BertTokenizer(f"{tmp}/vocab.txt", bos_token="[DEC]")
    config = BlipConfig(
        text_config=dict(vocab_size=len(words), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, encoder_hidden_size=32, max_position_embeddings=64,
                         bos_token_id=words.index("[DEC]"), pad_token_id=0, sep_token_id=words.index("[SEP]"),
                         eos_token_id=words.index("[SEP]"), initializer_range=0.5),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=32, patch_size=8, initializer_range=0.5),
        projection_dim=32, initializer_range=0.5)
    # Weights 25x larger than the default init let the image steer the words: with the default every image
    # gets the same caption, and a test could not tell whether captions stay with their images.
    model = BlipForConditionalGeneration(config).eval()
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def tiny_clip(path, seed=0):
    """A CLIP folder (CLIPModel + CLIPProcessor, 32 px, 32-d embeddings)."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    path = pathlib.Path(path)
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    config = CLIPConfig(text_config=_text_config(len(tokenizer)).to_dict(),
                        vision_config=_vision_config().to_dict(), projection_dim=32)
    CLIPModel(config).eval().save_pretrained(path)
    CLIPProcessor(image_processor=_image_processor(), tokenizer=tokenizer).save_pretrained(path)
    return path


class FakeSafetyChecker(torch.nn.Module):
    """Stands in for StableDiffusionSafetyChecker: flags the images at `indices` of each call.

    Like the real one it blacks out what it flags, and it records how many images each call saw.
    """

    def __init__(self, indices=()):
        super().__init__()
        self.indices = set(indices)
        self.calls = []
        self.register_buffer("_probe", torch.zeros(1))

    # pipelines read .device and .dtype off every component, as transformers models have them
    @property
    def device(self):
        return self._probe.device

    @property
    def dtype(self):
        return self._probe.dtype

    def forward(self, images, clip_input):
        self.calls.append(len(images))
        flags = [i in self.indices for i in range(len(images))]
        for i, flagged in enumerate(flags):
            if flagged:
                images[i] = 0
        return images, flags


def attach_safety_checker(pipe, indices=()):
    """Give a loaded pipeline a fake safety checker (and the feature extractor the pipeline feeds it)."""
    checker = FakeSafetyChecker(indices)
    pipe.safety_checker = checker
    if getattr(pipe, "feature_extractor", None) is None:
        pipe.feature_extractor = _image_processor()
    return checker
