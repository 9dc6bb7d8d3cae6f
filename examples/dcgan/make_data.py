"""Make a small synthetic image set (no downloads): coloured discs and squares on gradients,
saved as uint8 ``*.npy`` shards (N x H x W x 3) that train.py reads."""

from __future__ import annotations

import argparse
import os

import numpy as np


def make_images(count: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    for i in range(count):
        top, bottom = rng.uniform(0, 120, 3), rng.uniform(0, 120, 3)
        image = top[None, None, :] * (1 - yy[..., None]) + bottom[None, None, :] * yy[..., None]
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
        colour = rng.uniform(130, 255, 3)
        if rng.random() < 0.5:
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2
        else:
            mask = (abs(xx - cx) <= r * 0.85) & (abs(yy - cy) <= r * 0.85)
        image[mask] = colour
        images[i] = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
    return images


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--count", type=int, default=1024)
    parser.add_argument("--size", type=int, default=32, choices=(32, 64))
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    images = make_images(args.count, args.size, args.seed)
    for k, shard in enumerate(np.array_split(images, args.shards)):
        np.save(os.path.join(args.out_dir, f"images-{k:03d}.npy"), shard)
    print(
        f"{args.count} images of {args.size}x{args.size} in {args.shards} shards under "
        f"{args.out_dir}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
