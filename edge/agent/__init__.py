"""The edge agent: install and enrollment, heartbeats, signed model sync and hot swap.

``install`` enrolls a node and fetches its first model; ``run`` serves inference and runs the
agent loop beside it. Nothing here imports torch; ``install`` and ``download`` don't even need
the inference engine.
"""
