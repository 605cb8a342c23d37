"""The top Hessian and GGN eigenvalues of a network over a dataset split across processes (GPUs), with torchrun:

    torchrun --nproc_per_node=4 examples/top_eigenvalue_ddp.py            # one process per GPU, nccl
    torchrun --nproc_per_node=2 examples/top_eigenvalue_ddp.py --cpu      # CPU processes, gloo

Every rank takes its own shard of the samples (in chunks), and every rank prints the eigenvalue that one process over
all samples would compute (smoothness' ``group=``). The data here is random so that the script runs anywhere; put
your own model and data loading where the comments say.
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import smoothness


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu", action="store_true", help="gloo on CPU instead of nccl on GPUs")
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=256)
    args = parser.parse_args()
    dist.init_process_group("gloo" if args.cpu else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu") if args.cpu else torch.device("cuda", int(os.environ["LOCAL_RANK"]))

    torch.manual_seed(0)  # the same weights on every rank: your model (e.g. loaded from a checkpoint) goes here
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10)).to(device)
    g = torch.Generator().manual_seed(1)  # your dataset goes here; each rank keeps every world-th chunk
    x, y = torch.randn(args.samples, 1, 28, 28, generator=g), torch.randint(0, 10, (args.samples,), generator=g)
    chunks = [(x[i:i + args.chunk].to(device), y[i:i + args.chunk].to(device))
              for i in range(rank * args.chunk, args.samples, world * args.chunk)]

    for kind in ("hessian", "ggn"):
        result = smoothness.top_eigenvalues(model, F.cross_entropy, chunks, k=1, kind=kind, group=dist.group.WORLD)
        print(f"rank {rank}/{world}: top {kind} eigenvalue {result.values[0]:.6f} over {result.batch_size} samples",
              flush=True)
    dist.barrier()   # every rank is done before any tears the process group down
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
