"""ngrpo command-line interface (click)."""
