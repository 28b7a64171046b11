"""A run from start to end: launch and rendezvous, rank 0's phases, the LoadGen test driver, the run
directory and the record."""
