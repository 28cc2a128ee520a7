"""RemoteMedia's Python SDK.

``remotemedia.core`` (a compiled extension over the Rust crate ``remotemedia-runtime-core``) holds
the process-wide model registry and the zero-copy shared-memory tensors.
"""
