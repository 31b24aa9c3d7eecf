"""Pruning to a latency target on the runtime the model ships in: the target's latency tables
(`table`, measured and cached) and the loop that times pruned candidates and corrects the budget
until the measured latency meets the target (`correction`)."""
