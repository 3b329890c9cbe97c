"""The shared base every layer builds on: the exception root, groups, thread lanes, logging.

It imports nothing else of the package.
"""
