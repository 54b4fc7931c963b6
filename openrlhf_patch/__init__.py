"""NGRPO's advantage calibration and dual clip ranges, and how they are put into OpenRLHF."""
