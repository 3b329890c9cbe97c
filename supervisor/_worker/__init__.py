"""The worker (domain layer): poller, lease keeper, session runner, delegation watcher,
presence, wedge detection, workspaces and agents, on top of the tree and the control plane.
"""
