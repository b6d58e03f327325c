"""The "platonic representation" toy: two modalities that are different views of one latent world.

Generative model (Huh et al. 2024's hypothesis made literal), all from one seed:

    concept  c ~ Uniform{0, …, C−1},        centres μ_c ~ N(0, I_L)
    latent   z = μ_c + spread · u,            u ~ N(0, I_L)
    image    x = φ(z) + noise · ξ,            φ(z) = tanh(z W₁ + b₁) W₂      (R^L → R^{image_dim})
    text     y = ψ(z) + noise · ζ,            ψ(z) = gelu(z V₁ + c₁) V₂      (R^L → R^{text_dim})

with W₁, V₁ ~ N(0, 1/L), b₁, c₁ ~ N(0, 1/4), W₂, V₂ ~ N(0, 2/hidden) drawn once per seed, and
ξ, ζ independent N(0, I). φ and ψ are different non-linear maps, so the two spaces share
structure (the same z) but are not linearly identical. Rows are NOT L2-normalised (they are
raw "encoder outputs"; cosine consumers normalise them).

A prompt naming a concept ("a photo of a {name}.") encodes as the concept's centre through the
text map plus a small deterministic template-dependent offset: `ψ(μ_c) + noise · η(template)`,
η seeded by the prompt with the name removed, so every class shares each template's offset.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field, fields

import numpy as np

from ..ot.validation import check_count, check_real
from ..rundir import atomic_output, atomic_write
from .stores import save_store

FORMATS = {"npy": ".npy", "safetensors": ".safetensors", "h5": ".h5", "hdf5": ".hdf5"}
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


@dataclass(frozen=True)
class PlatonicGenerator:
    """The fixed parts of the toy (centres, maps, concept names), rebuilt from its parameters."""

    image_dim: int = 384
    text_dim: int = 256
    latent_dim: int = 32
    n_concepts: int = 20
    noise: float = 0.1
    spread: float = 0.5
    hidden: int = 128
    seed: int = 0
    _weights: dict = field(init=False, repr=False, compare=False)
    concept_names: list = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in ("image_dim", "text_dim", "latent_dim", "n_concepts", "hidden"):
            check_count(name, getattr(self, name))
        for name in ("noise", "spread"):
            if check_real(name, getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        check_count("seed", self.seed, minimum=0)
        rng = np.random.default_rng([self.seed, 0])
        L, H = self.latent_dim, self.hidden
        w = {"centres": rng.standard_normal((self.n_concepts, L))}
        for prefix, out in (("image", self.image_dim), ("text", self.text_dim)):
            w[prefix + "_w1"] = rng.standard_normal((L, H)) / np.sqrt(L)
            w[prefix + "_b1"] = 0.5 * rng.standard_normal(H)
            w[prefix + "_w2"] = rng.standard_normal((H, out)) * np.sqrt(2.0 / H)
        object.__setattr__(self, "_weights", w)
        object.__setattr__(self, "concept_names", _make_names(self.n_concepts, self.seed))

    def params(self) -> dict:
        """The constructor arguments (JSON-serialisable)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    @property
    def centres(self) -> np.ndarray:
        return self._weights["centres"]

    def image_map(self, z: np.ndarray) -> np.ndarray:
        """φ(z) = tanh(z W₁ + b₁) W₂."""
        w = self._weights
        return np.tanh(z @ w["image_w1"] + w["image_b1"]) @ w["image_w2"]

    def text_map(self, z: np.ndarray) -> np.ndarray:
        """ψ(z) = gelu(z V₁ + c₁) V₂."""
        w = self._weights
        return _gelu(z @ w["text_w1"] + w["text_b1"]) @ w["text_w2"]

    def sample(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(images n×image_dim float32, texts n×text_dim float32, labels n int64), seeded by (seed, n)."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        rng = np.random.default_rng([self.seed, 1, n])
        labels = rng.integers(self.n_concepts, size=n)
        z = self.centres[labels] + self.spread * rng.standard_normal((n, self.latent_dim))
        images = self.image_map(z) + self.noise * rng.standard_normal((n, self.image_dim))
        texts = self.text_map(z) + self.noise * rng.standard_normal((n, self.text_dim))
        return images.astype(np.float32), texts.astype(np.float32), labels.astype(np.int64)

    def concept_of(self, prompt: str) -> tuple[int, str]:
        """(concept id, template): the longest concept name found as a whole word in `prompt`."""
        found = [
            (len(name), c)
            for c, name in enumerate(self.concept_names)
            if re.search(rf"\b{re.escape(name)}\b", prompt, flags=re.IGNORECASE)
        ]
        if not found:
            raise ValueError(
                f"prompt {prompt!r} names none of the {self.n_concepts} concepts "
                f"(e.g. {self.concept_names[0]!r})"
            )
        c = max(found)[1]
        template = re.sub(rf"\b{re.escape(self.concept_names[c])}\b", "{}", prompt, flags=re.IGNORECASE)
        return c, template

    def encode_text(self, prompts: list[str]) -> np.ndarray:
        """len(prompts) × text_dim float32: ψ(μ_c) + noise · η(template) for the concept c named."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not a single string")
        rows = []
        for prompt in prompts:
            c, template = self.concept_of(prompt)
            digest = hashlib.sha256(template.lower().encode()).digest()[:8]
            rng = np.random.default_rng([self.seed, 2, int.from_bytes(digest, "little")])
            eta = rng.standard_normal(self.text_dim)
            rows.append(self.text_map(self.centres[c]) + self.noise * eta)
        return np.asarray(rows, dtype=np.float32).reshape(len(rows), self.text_dim)

    __call__ = encode_text


def _make_names(n: int, seed: int) -> list[str]:
    """n distinct made-up words of 2–3 consonant-vowel syllables (e.g. "bako", "lumira")."""
    rng = np.random.default_rng([seed, 3])
    names: list[str] = []
    seen = set()
    while len(names) < n:
        syllables = rng.integers(2, 4)
        word = "".join(
            _CONSONANTS[rng.integers(len(_CONSONANTS))] + _VOWELS[rng.integers(len(_VOWELS))]
            for _ in range(syllables)
        )
        if word not in seen:
            seen.add(word)
            names.append(word)
    return names


@dataclass(frozen=True)
class PlatonicData:
    """A sample of the toy: aligned rows (image i ↔ text i), concept labels and names."""

    images: np.ndarray
    texts: np.ndarray
    labels: np.ndarray
    concept_names: list[str]
    generator: PlatonicGenerator

    def encode_text(self, prompts: list[str]) -> np.ndarray:
        return self.generator.encode_text(prompts)


def make_platonic(
    n: int,
    *,
    image_dim: int = 384,
    text_dim: int = 256,
    latent_dim: int = 32,
    n_concepts: int = 20,
    noise: float = 0.1,
    seed: int = 0,
    spread: float = 0.5,
    hidden: int = 128,
) -> PlatonicData:
    """n aligned (image, text) rows of the platonic toy (see the module docstring for the model).

    Concepts, maps and names depend on `seed` only; the rows are seeded by (seed, n).
    """
    gen = PlatonicGenerator(
        image_dim=image_dim,
        text_dim=text_dim,
        latent_dim=latent_dim,
        n_concepts=n_concepts,
        noise=noise,
        spread=spread,
        hidden=hidden,
        seed=seed,
    )
    images, texts, labels = gen.sample(n)
    return PlatonicData(images, texts, labels, list(gen.concept_names), gen)


def write_platonic(directory, n: int, *, format: str = "npy", **kwargs) -> PlatonicData:
    """Write images.<ext>, texts.<ext>, labels.npy and classes.json (names + generator parameters).

    `load_platonic_encoder(directory)` rebuilds the text encoder from classes.json.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {sorted(FORMATS)}")
    data = make_platonic(n, **kwargs)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    ext = FORMATS[format]
    save_store(os.path.join(directory, "images" + ext), data.images)
    save_store(os.path.join(directory, "texts" + ext), data.texts)
    with atomic_output(os.path.join(directory, "labels.npy")) as tmp:
        np.save(tmp, data.labels, allow_pickle=False)
    meta = {
        "concept_names": data.concept_names,
        "generator": data.generator.params(),
        "n": n,
        "format": format,
    }
    atomic_write(os.path.join(directory, "classes.json"), json.dumps(meta, indent=2).encode())
    return data


def load_platonic_encoder(directory) -> PlatonicGenerator:
    """The text encoder (prompts → text_dim array) of a directory written by `write_platonic`."""
    path = os.path.join(os.fspath(directory), "classes.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (write it with write_platonic)")
    try:
        with open(path) as f:
            meta = json.load(f)
        gen = PlatonicGenerator(**meta["generator"])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a platonic classes.json ({type(exc).__name__}: {exc})") from None
    if meta.get("concept_names") != gen.concept_names:
        raise ValueError(f"{path}: concept_names do not match its generator parameters")
    return gen
