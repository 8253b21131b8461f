"""The adaptive router: one tandem.v1.Inference endpoint in front of edge nodes and the cloud.

Transport at the edge (``servicer``, ``relay``, ``backends``, ``server``), decisions in the
middle (``policy``, with ``circuit`` and ``stats`` as its grpc-free inputs).
"""
