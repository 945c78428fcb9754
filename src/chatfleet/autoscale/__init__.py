"""Autoscaling: the operator's pure policy (policy.py); the kopf operator comes with it."""
