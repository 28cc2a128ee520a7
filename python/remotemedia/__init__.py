"""RemoteMedia's Python SDK.

``remotemedia.core`` (a compiled extension over the Rust crate ``remotemedia-runtime-core``) holds
the process-wide model registry, the zero-copy shared-memory tensors, and the model-worker client
(``ModelWorkerClient``, asyncio; ``BlockingModelWorkerClient``).
"""
