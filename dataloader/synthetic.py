"""The demo data set: images whose class is a small local texture at a random position.

Every image has a noisy, smoothly shaded background, one distractor blob of random colour, and one
`pattern_size` square holding its class texture (stripes of some orientation, a checker board, a
ring, ...) in its class colour. The class is a property of that small square only, so the DCG's ROI
branch has something to find. Generated deterministically from a seed.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from dataloader.transforms import item


def _texture(label: int, size: int) -> np.ndarray:
    """A (size, size) mask in [0, 1] for class `label`."""
    i, j = np.mgrid[0:size, 0:size]
    c = (size - 1) / 2
    r = np.hypot(i - c, j - c)
    textures = [
        (i // 2) % 2,  # horizontal stripes
        (j // 2) % 2,  # vertical stripes
        ((i // 3) + (j // 3)) % 2,  # checker board
        (np.abs(r - size / 3) < 1.5),  # ring
        ((i + j) // 3) % 2,  # diagonal stripes
        (r < size / 3),  # disc
        ((np.abs(i - c) < 1.5) | (np.abs(j - c) < 1.5)),  # cross
        ((i - j) // 3) % 2,  # anti-diagonal stripes
    ]
    return textures[label].astype(np.float32)


NUM_TEXTURES = 8
# Each class also has its own pattern colour (jittered). It only appears inside the small pattern, and a
# distractor blob of random colour sits elsewhere, so the class is still a local property of the image.
PALETTE = np.array(
    [
        [0.9, 0.3, 0.3],
        [0.3, 0.85, 0.3],
        [0.3, 0.4, 0.95],
        [0.9, 0.85, 0.3],
        [0.8, 0.3, 0.9],
        [0.3, 0.9, 0.9],
        [0.95, 0.6, 0.2],
        [0.6, 0.6, 0.6],
    ]
)


def make_image(rng: np.random.Generator, label: int, image_size: int, pattern_size: int) -> np.ndarray:
    """One (H, W, 3) uint8 image of class `label`."""
    return make_image_with_boxes(rng, label, image_size, pattern_size)[0]


def make_image_with_boxes(
    rng: np.random.Generator, label: int, image_size: int, pattern_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One (H, W, 3) uint8 image of class `label`, the box of its class texture and the box of its distractor blob,
    each (top, left, bottom, right) in pixels, bottom and right exclusive: where the class evidence really is."""
    s, p = image_size, pattern_size
    yy, xx = np.mgrid[0:s, 0:s] / s
    shade = rng.uniform(0.2, 0.5, 3) + rng.uniform(-0.15, 0.15, 3) * (yy[..., None] + xx[..., None])
    image = shade + rng.normal(0.0, 0.05, (s, s, 3))
    blob_y, blob_x = rng.integers(0, s - p, 2)
    image[blob_y : blob_y + p, blob_x : blob_x + p] = rng.uniform(0.2, 0.95, 3)
    y, x = rng.integers(0, s - p, 2)
    colour = np.clip(PALETTE[label] + rng.uniform(-0.1, 0.1, 3), 0.0, 1.0)
    mask = _texture(label, p)[..., None]
    image[y : y + p, x : x + p] = mask * colour + (1 - mask) * image[y : y + p, x : x + p]
    texture, distractor = np.array([y, x, y + p, x + p]), np.array([blob_y, blob_x, blob_y + p, blob_x + p])
    return (np.clip(image, 0.0, 1.0) * 255).astype(np.uint8), texture, distractor


class SyntheticPatterns(Dataset):
    """`num_samples` balanced images; `seed` selects the split (train, val and test use different seeds)."""

    def __init__(
        self, num_samples: int, num_classes: int, image_size: int, pattern_size: int, seed: int, transform=None
    ) -> None:
        assert 2 <= num_classes <= NUM_TEXTURES, f"the demo set has {NUM_TEXTURES} textures, asked for {num_classes}"
        assert 0 < pattern_size < image_size, f"pattern_size {pattern_size} must be below image_size {image_size}"
        rng = np.random.default_rng(seed)
        self.labels = np.arange(num_samples) % num_classes
        rng.shuffle(self.labels)
        made = [make_image_with_boxes(rng, int(c), image_size, pattern_size) for c in self.labels]
        self.images = np.stack([m[0] for m in made])
        # (N, 4) boxes (top, left, bottom, right) of each image's class texture and distractor, in image pixels:
        # the ground truth of the pointing game (benchmarks/explain_demo.py); the eval transform keeps the geometry
        self.texture_boxes = np.stack([m[1] for m in made])
        self.distractor_boxes = np.stack([m[2] for m in made])
        self.ids = [f"synthetic_{seed}_{k:05d}" for k in range(num_samples)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        image = Image.fromarray(self.images[index])
        return {**item(self.transform, image), "label": int(self.labels[index]), "index": index}
