"""The Open Inference Protocol's gRPC API: ``open_inference_grpc.proto`` as published, and the
Python modules grpcio-tools generates from it (``python -m app.api.oip_grpc.generate``; do not
edit them). The service itself is ``app.api.grpc_service``'s."""
