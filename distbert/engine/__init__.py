"""Rank 0's engine and the worker: the pure dispatcher, the coordinator's driver and completion, and
local worker processes."""
