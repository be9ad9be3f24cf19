"""tritonclient.grpc for tests: imported so that it shares one process with the KServe SDK.

Both register protobuf messages of the same names (package ``inference``) in protobuf's default
descriptor pool, and the second import fails ("duplicate symbol 'inference.ServerLiveRequest'");
tests/test_api_v2.py imports the KServe SDK. tritonclient's modules are built here in a pool of
their own (their message classes work from any pool). The server's generated modules have their
own pool already (app/api/oip_grpc/generate.py).
"""

from __future__ import annotations

import sys
from types import ModuleType


def import_triton_grpc() -> ModuleType:
    if "tritonclient.grpc" in sys.modules:
        return sys.modules["tritonclient.grpc"]
    from google.protobuf import descriptor_pool

    own = descriptor_pool.DescriptorPool()
    default = descriptor_pool.Default
    descriptor_pool.Default = lambda: own  # what the generated modules call at import
    try:
        import tritonclient.grpc
    finally:
        descriptor_pool.Default = default
    return tritonclient.grpc


triton_grpc = import_triton_grpc()
