"""The user script of the multi-host tests: a Gloo all-reduce, then (optionally) a loop of them."""

import datetime
import os
import sys
import time

import torch
import torch.distributed as dist

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
rank, world = dist.get_rank(), dist.get_world_size()
value = torch.tensor([float(rank + 1)])
dist.all_reduce(value)
print(
    f"ALLREDUCE rank={rank} world={world} sum={value.item():g} t={time.time():.6f} "
    f"host={os.environ.get('SM_CURRENT_HOST', '?')}",
    flush=True,
)
loop_seconds = float(os.environ.get("DDP_LOOP_SECONDS", "0"))
deadline = time.monotonic() + loop_seconds
while time.monotonic() < deadline:
    time.sleep(0.2)
    dist.all_reduce(torch.tensor([1.0]))
model_dir = os.environ.get("SM_MODEL_DIR")
if (
    os.environ.get("LOCAL_RANK", "0") == "0" and model_dir
):  # every host: whichever upload wins, it is checked
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "result.txt"), "w") as out:
        out.write(f"sum={value.item():g} world={world}\n")
dist.destroy_process_group()
sys.exit(0)
