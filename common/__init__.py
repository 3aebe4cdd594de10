"""Shared plumbing for the algorithm scripts: model loading, batched generation, grading, data.

Nothing in here knows about advantages, critics or losses: that is the algorithm scripts' business.
"""
