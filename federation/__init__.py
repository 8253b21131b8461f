"""Federated fine-tuning of the edge model with Flower: the Flower App (``server_app``,
``client_app``, ``task``), each site's data, the processes (SuperLink, SuperNode) and the step
that turns a run's result into a canary rollout."""
