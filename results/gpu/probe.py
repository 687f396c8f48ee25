"""GPU probe for issue 11: which lines of a CUDA training step make the host wait for the device (torch's sync debug
mode while `ideal.py bench` runs a few steps of each kind), then the kernels' self CUDA time over a short bench.

    python3 results/gpu/probe.py          (from the repository root, on a CUDA machine)
"""
import collections
import os
import sys
import traceback
import warnings

import torch

sys.path.insert(0, os.getcwd())
import ideal  # noqa: E402

syncs = collections.Counter()


def record(message, category, filename, lineno, file=None, line=None):
    stack = [f"{f.name}:{f.lineno}" for f in traceback.extract_stack() if f.filename.endswith("ideal.py")]
    syncs[" < ".join(reversed(stack[-3:]))] += 1


if not torch.cuda.is_available():
    sys.exit("probe.py: needs a CUDA device (torch's sync debug mode exists only there)")
warnings.showwarning = record
warnings.simplefilter("always")
torch.cuda.set_sync_debug_mode("warn")
ideal.main(["bench", "--preset", "paper", "--steps", "2"])
torch.cuda.set_sync_debug_mode(0)
print("host synchronisations during `bench --steps 2` (count, where):")
for where, count in syncs.most_common():
    print(f"{count:5d}  {where}")

with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                        torch.profiler.ProfilerActivity.CUDA]) as prof:
    ideal.main(["bench", "--preset", "paper", "--steps", "10"])
print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=40))
