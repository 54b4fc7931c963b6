"""The stages of an ngrpo run: models, data, training, evaluation, export, reports, studies."""
