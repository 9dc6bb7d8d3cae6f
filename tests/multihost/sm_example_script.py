"""A user script in the shape of the SageMaker PyTorch examples: it finds its rank and the master
itself.

node rank = hosts.index(current_host), MASTER_ADDR = hosts[0], its own MASTER_PORT, then
init_process_group(rank=, world_size=) and an all-reduce across the hosts. It prints what it was
given, the files of its shard, and the result, on one line.
"""

import datetime
import json
import os
import sys
import time

hosts = json.loads(os.environ["SM_HOSTS"])
current_host = os.environ["SM_CURRENT_HOST"]
if os.environ.get("DIE_AT_IMPORT_ON") == current_host:
    import a_module_that_does_not_exist  # noqa: F401  (the master's script dies at import)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

index = hosts.index(current_host)
if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
    # Under torch.distributed.run (an elastic job) the ranks must use the launcher's store: a
    # script's own
    # MASTER_PORT cannot work there, so this one takes the launcher's rendezvous (env://).
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
else:
    rank = index
    os.environ["MASTER_ADDR"] = hosts[0]
    os.environ["MASTER_PORT"] = os.environ.get("SCRIPT_PORT", "23456")
    dist.init_process_group(
        "gloo", rank=rank, world_size=len(hosts), timeout=datetime.timedelta(seconds=60)
    )
value = torch.tensor([float(rank + 1)])
dist.all_reduce(value)
train = os.environ.get("SM_CHANNEL_TRAIN", "")
files = (
    sorted(
        os.path.relpath(os.path.join(d, f), train) for d, _, names in os.walk(train) for f in names
    )
    if train
    else []
)
env = json.loads(os.environ["SM_TRAINING_ENV"])
print(
    "SMEXAMPLE "
    + json.dumps(
        {
            "current_host": current_host,
            "hosts": hosts,
            "rank": rank,
            "index": index,
            "sum": value.item(),
            "files": files,
            "env": {
                k: env[k]
                for k in (
                    "current_host",
                    "hosts",
                    "master_hostname",
                    "is_master",
                    "network_interface_name",
                )
            },
            "num_gpus": os.environ.get("SM_NUM_GPUS"),
            "gloo_ifname": os.environ.get("GLOO_SOCKET_IFNAME"),
            "t": time.time(),
        }
    ),
    flush=True,
)
dist.destroy_process_group()
sys.exit(0)
