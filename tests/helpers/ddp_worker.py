"""Run by tests/test_distributed.py under torchrun: gradual pruning of a DDP model, one JSON result per rank."""

import hashlib
import json
import sys

import torch
import torch.distributed as dist
from torch import nn

from prunekit import Gradual, Pruner, RandomScore


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(100 + rank)  # different init per rank: DDP must broadcast rank 0's weights
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5))
    ddp = nn.parallel.DistributedDataParallel(model)
    # a criterion that differs per rank: only the Pruner's broadcast can make the masks agree
    pruner = Pruner(ddp, 0.8, schedule=Gradual(start=0, end=6, every=2), criterion=RandomScore(seed=rank))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(rank)  # each rank sees its own data shard
    for _ in range(8):
        x = torch.randn(16, 20, generator=g)
        ddp(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        pruner.step()
    digest = hashlib.sha256()
    for name, m in pruner.masks.items():
        digest.update(name.encode() + m.numpy().tobytes())
    weights = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    zeros_ok = all(bool((dict(model.named_parameters())[n][~m] == 0).all()) for n, m in pruner.masks.items())
    result = {"rank": rank, "masks": digest.hexdigest(), "weights": weights, "sparsity": pruner.masks.sparsity(),
              "zeros_ok": zeros_ok}
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.barrier()  # both ranks done before either tears gloo down (a rank aborted at teardown once under load)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
