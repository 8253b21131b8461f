"""What every Tandem server stands on: typed errors and their status mapping, request
validation, durable writes, the gRPC server base, the engine contract and its servicer, metrics
plumbing and process launching. It imports no other Tandem package but ``protos``.
"""
