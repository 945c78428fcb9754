"""Offline simulation in virtual time: the engine model replayed over workloads, and the fleet simulator.

Nothing in this package reads the wall clock or talks to a network; time is a number the
simulation advances, so an hour of traffic replays in seconds.
"""
