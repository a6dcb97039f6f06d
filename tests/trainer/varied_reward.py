"""A reward that varies between responses of one prompt, so every estimator has a non-zero
signal and DAPO's dynamic sampling finds informative groups even for a random tiny model."""


def score(sample: dict, **unused) -> dict:  # presets pass e.g. format_weight
    text = sample["response"]
    return {"overall": (len(text) % 5) / 4.0, "accuracy": float(len(text) % 2)}
