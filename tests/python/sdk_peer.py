"""The other process of test_sdk_shared_memory.py: maps tensors by region id on command.

Reads one command per line on stdin and answers one line on stdout:
  map REGION_ID NBYTES   maps the region as float32 and answers "mapped"
  sum                    reads one float32 of every 4 KiB page (so every page is touched) and
                         answers their sum
  get INDEX / set INDEX VALUE   reads / writes one float32 through the NumPy view
"""

import sys

import numpy as np

from remotemedia.core import DataType, TensorBuffer

PAGE_FLOATS = 4096 // 4


def main():
    view = None
    tensor = None
    print("ready", flush=True)
    for line in sys.stdin:
        command, *args = line.split()
        if command == "map":
            region_id, nbytes = args[0], int(args[1])
            tensor = TensorBuffer.from_shared_memory(
                region_id, 0, nbytes, [nbytes // 4], DataType.F32
            )
            view = tensor.to_numpy()
            print("mapped", flush=True)
        elif command == "sum":
            print(float(view[::PAGE_FLOATS].sum(dtype=np.float64)), flush=True)
        elif command == "get":
            print(float(view[int(args[0])]), flush=True)
        elif command == "set":
            view[int(args[0])] = float(args[1])
            print("ok", flush=True)
        else:
            print(f"unknown command {command}", flush=True)


if __name__ == "__main__":
    main()
