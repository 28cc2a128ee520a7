"""Writes reference descriptors of the wire protocol to stdout as an encoded
google.protobuf.FileDescriptorSet.

`triton`: grpc_service.proto and model_config.proto from the pinned tritonclient.
`kserve`: grpc_predict_v2.proto from the pinned kserve.
The two packages declare the same `inference.*` symbols, so each needs a process of its own.
"""
import sys

from google.protobuf import descriptor_pb2


def modules(source):
    if source == "triton":
        from tritonclient.grpc import model_config_pb2, service_pb2

        return [service_pb2, model_config_pb2]
    if source == "kserve":
        from kserve.protocol.grpc import grpc_predict_v2_pb2

        return [grpc_predict_v2_pb2]
    sys.exit(f"unknown source {source!r}: expected triton or kserve")


fds = descriptor_pb2.FileDescriptorSet()
for module in modules(sys.argv[1]):
    fds.file.add().MergeFromString(module.DESCRIPTOR.serialized_pb)
sys.stdout.buffer.write(fds.SerializeToString())
