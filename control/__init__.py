"""The fleet control plane for edge nodes: enrollment, the model registry, signed artifacts,
rollouts. Its server (``server.py``) has a port of its own beside the cloud tier.

Deliberately empty of imports: importing ``control`` must not pull in grpc servers or SQLite.
An edge node verifies manifests with ``model.signing``, the artifact format's own code.
"""
