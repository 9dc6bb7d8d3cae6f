"""Train a DCGAN with DistributedDataParallel, as a SageMaker user would write it.

Runs unchanged under SageMaker, ``torchbay train`` or plain ``torchrun --nproc-per-node 2
train.py``: the folders come from the SM_* environment (or the flags), the ranks from torchrun's
variables. Gloo on CPU, NCCL on GPUs. Rank 0 writes TensorBoard scalars (both losses, batch and data
time), a grid of fake samples per epoch under the output folder, and the generator as a
``torch.export`` program with a dynamic batch (``model.pt2``) plus ``code/inference.py`` into the
model folder.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import shutil
import struct
import time
import zlib

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from model import Discriminator, Generator, weights_init

log = logging.getLogger("dcgan")
HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None) -> argparse.Namespace:
    env = os.environ
    output = env.get("SM_OUTPUT_DIR", "/opt/ml/output")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--lr", type=float, default=0.0002)
    parser.add_argument("--beta1", type=float, default=0.5)
    parser.add_argument("--nz", type=int, default=100, help="size of the noise vector")
    parser.add_argument("--ngf", type=int, default=64)
    parser.add_argument("--ndf", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64, choices=(32, 64))
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--seed", type=int, default=999)
    parser.add_argument("--log-interval", type=int, default=5, help="steps between log lines")
    parser.add_argument(
        "--data-dir", default=env.get("SM_CHANNEL_TRAINING", "/opt/ml/input/data/training")
    )
    parser.add_argument("--model-dir", default=env.get("SM_MODEL_DIR", "/opt/ml/model"))
    parser.add_argument(
        "--output-data-dir", default=env.get("SM_OUTPUT_DATA_DIR", os.path.join(output, "data"))
    )
    parser.add_argument("--tensorboard-dir", default=os.path.join(output, "tensorboard"))
    return parser.parse_args(argv)


def load_images(data_dir: str, image_size: int) -> torch.Tensor:
    """Every ``*.npy`` under ``data_dir`` (uint8, N x H x W x 3) as floats in [-1, 1], N x 3 x H x
    W."""
    files = sorted(glob.glob(os.path.join(data_dir, "**", "*.npy"), recursive=True))
    if not files:
        raise SystemExit(f"no *.npy image shards under {data_dir}; run examples/dcgan/make_data.py")
    images = np.concatenate([np.load(path) for path in files])
    if images.shape[1:] != (image_size, image_size, 3):
        raise SystemExit(
            f"images are {images.shape[1:]}, expected ({image_size}, {image_size}, 3); "
            "set --image-size to match the data"
        )
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def save_grid(images: torch.Tensor, path: str, nrow: int = 8) -> None:
    """A PNG grid of images in [-1, 1]: torchvision if installed, else Pillow, else plain zlib."""
    try:
        from torchvision.utils import save_image

        save_image(images, path, nrow=nrow, normalize=True, value_range=(-1, 1))
        return
    except ImportError:
        pass
    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    grid = np.zeros((rows * (h + 2) + 2, nrow * (w + 2) + 2, c), dtype=np.uint8)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + col * (w + 2) : 2 + col * (w + 2) + w] = (
            pixels[i]
        )
    try:
        from PIL import Image

        Image.fromarray(grid).save(path)
        return
    except ImportError:
        pass
    height, width = grid.shape[:2]
    raw = b"".join(b"\x00" + grid[y].tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    with open(path, "wb") as f:
        f.write(
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6))
            + chunk(b"IEND", b"")
        )


def summary_writer(logdir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("tensorboard is not installed: no TensorBoard events (pip install tensorboard)")
        return None
    os.makedirs(logdir, exist_ok=True)
    return SummaryWriter(logdir)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world_size > 1
    device = torch.device(
        f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    )
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if distributed else 0
    if device.type == "cpu":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    else:
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed + rank)

    dataset = TensorDataset(load_images(args.data_dir, args.image_size))
    sampler = DistributedSampler(dataset, shuffle=True, seed=args.seed) if distributed else None
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=args.workers,
        drop_last=True,
    )
    if len(loader) == 0:
        raise SystemExit(
            f"{len(dataset)} images are fewer than one batch of {args.batch_size} per process"
        )

    net_g = Generator(args.nz, args.ngf, 3, args.image_size).to(device)
    net_d = Discriminator(args.ndf, 3, args.image_size).to(device)
    net_g.apply(weights_init)
    net_d.apply(weights_init)
    if distributed:
        ids = [device.index] if device.type == "cuda" else None
        net_g = DistributedDataParallel(net_g, device_ids=ids)
        net_d = DistributedDataParallel(net_d, device_ids=ids)
    criterion = nn.BCELoss()
    opt_d = torch.optim.Adam(net_d.parameters(), lr=args.lr, betas=(args.beta1, 0.999))
    opt_g = torch.optim.Adam(net_g.parameters(), lr=args.lr, betas=(args.beta1, 0.999))
    fixed_noise = torch.randn(
        64, args.nz, 1, 1, generator=torch.Generator().manual_seed(args.seed)
    ).to(device)

    writer = summary_writer(args.tensorboard_dir) if rank == 0 else None
    samples_dir = os.path.join(args.output_data_dir, "samples")
    if rank == 0:
        os.makedirs(samples_dir, exist_ok=True)
    log.info(
        "rank %d/%d on %s: %d images, %d steps per epoch, %d epochs",
        rank,
        world_size,
        device,
        len(dataset),
        len(loader),
        args.epochs,
    )

    step = 0
    for epoch in range(1, args.epochs + 1):
        if sampler is not None:
            sampler.set_epoch(epoch)
        end = time.perf_counter()
        for i, (real,) in enumerate(loader, 1):
            data_time = time.perf_counter() - end
            real = real.to(device, non_blocking=True)
            batch = real.size(0)
            # (1) the discriminator: maximise log(D(x)) + log(1 - D(G(z)))
            net_d.zero_grad()
            loss_d_real = criterion(net_d(real), torch.ones(batch, device=device))
            loss_d_real.backward()
            fake = net_g(torch.randn(batch, args.nz, 1, 1, device=device))
            loss_d_fake = criterion(net_d(fake.detach()), torch.zeros(batch, device=device))
            loss_d_fake.backward()
            opt_d.step()
            # (2) the generator: maximise log(D(G(z)))
            net_g.zero_grad()
            loss_g = criterion(net_d(fake), torch.ones(batch, device=device))
            loss_g.backward()
            opt_g.step()
            batch_time = time.perf_counter() - end
            end = time.perf_counter()
            step += 1
            loss_d = (loss_d_real + loss_d_fake).item()
            if rank == 0 and (i % args.log_interval == 0 or i == len(loader)):
                log.info(
                    "epoch=%d step=%d/%d loss_D=%.4f loss_G=%.4f batch_time=%.4f data_time=%.4f",
                    epoch,
                    i,
                    len(loader),
                    loss_d,
                    loss_g.item(),
                    batch_time,
                    data_time,
                )
            if writer is not None:
                writer.add_scalar("Loss/discriminator", loss_d, step)
                writer.add_scalar("Loss/generator", loss_g.item(), step)
                writer.add_scalar("Time/batch_seconds", batch_time, step)
                writer.add_scalar("Time/data_seconds", data_time, step)
        if rank == 0:
            # The bare module: a DDP forward on one rank alone would wait for the others' buffers.
            with torch.no_grad():
                samples = (net_g.module if distributed else net_g)(fixed_noise).cpu()
            path = os.path.join(samples_dir, f"fake_samples_epoch_{epoch:03d}.png")
            save_grid(samples, path)
            log.info("epoch %d: sample grid %s", epoch, path)
    if writer is not None:
        writer.close()

    if rank == 0:
        generator = net_g.module if distributed else net_g
        generator = generator.cpu().eval()
        os.makedirs(args.model_dir, exist_ok=True)
        # torch.export (TorchScript is deprecated): eval mode, any batch size from 1 up.
        noise = torch.zeros(2, args.nz, 1, 1)
        program = torch.export.export(
            generator, (noise,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
        )
        torch.export.save(program, os.path.join(args.model_dir, "model.pt2"))
        os.makedirs(os.path.join(args.model_dir, "code"), exist_ok=True)
        shutil.copy(
            os.path.join(HERE, "inference.py"), os.path.join(args.model_dir, "code", "inference.py")
        )
        log.info(
            "saved the generator (torch.export) to %s", os.path.join(args.model_dir, "model.pt2")
        )
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
