from pipelines.reward import reward_func  # noqa: F401  (ngrpo's reward entry)
