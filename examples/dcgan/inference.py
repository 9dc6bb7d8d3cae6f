"""Serving hooks for the DCGAN generator (SageMaker PyTorch style; the model is the torch.export
program model.pt2, loaded by the server).

Request: noise as NPY (``application/x-npy``, shape N x nz or N x nz x 1 x 1) or JSON
(``{"noise": [[...], ...]}`` or ``{"count": N, "seed": S}`` to draw the noise on the server).
Response: the images as uint8, N x H x W x 3, in NPY (default) or JSON.
"""

from __future__ import annotations

import io
import json

import numpy as np
import torch

NZ = 100


def input_fn(body, content_type):
    if content_type == "application/x-npy":
        noise = torch.from_numpy(np.load(io.BytesIO(body), allow_pickle=False)).float()
    elif content_type == "application/json":
        request = json.loads(body)
        if "noise" in request:
            noise = torch.tensor(request["noise"], dtype=torch.float32)
        else:
            generator = torch.Generator().manual_seed(int(request.get("seed", 0)))
            noise = torch.randn(
                int(request.get("count", 16)), int(request.get("nz", NZ)), generator=generator
            )
    else:
        raise ValueError(
            f"unsupported content type {content_type!r}: send application/x-npy or application/json"
        )
    if noise.dim() == 2:
        noise = noise[:, :, None, None]
    return noise


def output_fn(images, accept):
    pixels = (
        ((images.clamp(-1, 1) + 1) * 127.5)
        .round()
        .to(torch.uint8)
        .permute(0, 2, 3, 1)
        .cpu()
        .numpy()
    )
    if accept == "application/json":
        return json.dumps({"images": pixels.tolist()}), accept
    buffer = io.BytesIO()
    np.save(buffer, pixels, allow_pickle=False)
    return buffer.getvalue(), "application/x-npy"
