"""The cloud's control plane for edge nodes: enrollment, the model registry, signed artifacts.

Deliberately empty of imports: an edge node imports ``cloud.control.signing`` alone (it needs
only ``cryptography``), and must not pull in grpc servers, SQLite or torch through here.
"""
