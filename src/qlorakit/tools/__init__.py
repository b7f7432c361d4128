"""Tools built on the whole pipeline: the memory estimate and the run comparison."""
