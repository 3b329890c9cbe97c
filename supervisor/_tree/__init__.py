"""The generic supervision tree: specs, the supervisor, its events and errors.

It knows nothing of agents, leases or control planes; it builds only on ``_base``.
"""
