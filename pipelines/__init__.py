"""The stages of an ngrpo run: data prep, training, checkpoint export, evaluation."""
