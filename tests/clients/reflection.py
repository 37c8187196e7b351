"""Lists and describes the vault's services over gRPC server reflection with
Python's official grpcio-reflection, which speaks only v1alpha.

Usage: reflection.py HOST:PORT CA_PEM CLIENT_CERT_PEM CLIENT_KEY_PEM
Prints one line of service names and one of Credentials' methods.
"""

import sys

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def main():
    address, ca, cert, key = sys.argv[1:5]
    credentials = grpc.ssl_channel_credentials(read(ca), read(key), read(cert))
    channel = grpc.secure_channel(
        address, credentials, options=[("grpc.ssl_target_name_override", "localhost")]
    )
    database = ProtoReflectionDescriptorDatabase(channel)
    print("services:", " ".join(sorted(database.get_services())))
    service = DescriptorPool(database).FindServiceByName("credvault.v1.Credentials")
    print("methods:", " ".join(sorted(m.name for m in service.methods)))


if __name__ == "__main__":
    main()
