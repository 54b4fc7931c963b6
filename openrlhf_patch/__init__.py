"""NGRPO inside OpenRLHF: the algorithm core (estimators, asymmetric clipping measures, filters) and the patch that puts it into the Ray workers."""
