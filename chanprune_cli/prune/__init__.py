"""Pruning a model: computing and storing scores, iterative rounds, one verified pruning step,
and BatchNorm re-estimation afterwards."""
