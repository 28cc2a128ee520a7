"""A two-stage pipeline through the node sidecar: token ids -> embedding model -> classifier.

Each model is served once on the node by a model worker; this process loads neither. The batch
of token ids is written into shared memory once and handed to the sidecar by reference (a
brokered region, since REMOTEMEDIA_SIDECAR is set); the embeddings come back and go on to the
classifier. Run it against the test models of `make models` (`tokens`, `classifier`), served by
two workers behind a sidecar, as the README's "Python SDK" section shows:

    REMOTEMEDIA_SIDECAR=unix:///tmp/rm python examples/python/pipeline.py

It prints one line per sequence of the first few (`sequence <i>: class <k> (p=<probability>)`),
then a summary line, `classified <n> sequences: <counts per class>`. `--seed` fixes the token ids,
so the output can be checked against torch running the same models.
"""

import argparse
import asyncio

import numpy as np

from remotemedia.core import ModelWorkerClient, SharedMemoryAllocator

VOCABULARY = 1000


async def classify(token_ids, embedder, classifier):
    allocator = SharedMemoryAllocator()
    async with ModelWorkerClient() as client:  # the sidecar REMOTEMEDIA_SIDECAR names
        with allocator.tensor(token_ids.nbytes, session_id="pipeline") as ids:
            ids.from_numpy(token_ids)  # one copy into shared memory
            embeddings = await client.infer(ids, model=embedder)
        probabilities = await client.infer(embeddings, model=classifier)
        return probabilities.to_numpy()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # The test models take batches of up to 8; 8 sequences of 2048 tokens are 128 KiB, over
    # the client's 64 KiB threshold for sending a tensor by reference.
    parser.add_argument("--batch", type=int, default=8, help="sequences (at most 8)")
    parser.add_argument("--length", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=5, help="sequences to print")
    parser.add_argument("--embedder", default="tokens")
    parser.add_argument("--classifier", default="classifier")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    token_ids = rng.integers(0, VOCABULARY, (args.batch, args.length), dtype=np.int64)
    probabilities = asyncio.run(classify(token_ids, args.embedder, args.classifier))
    classes = probabilities.argmax(axis=1)
    for i in range(min(args.show, args.batch)):
        print(f"sequence {i}: class {classes[i]} (p={probabilities[i, classes[i]]:.6f})")
    counts = np.bincount(classes, minlength=probabilities.shape[1])
    print(f"classified {args.batch} sequences: {' '.join(map(str, counts))}")


if __name__ == "__main__":
    main()
