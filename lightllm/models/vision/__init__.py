"""Vision encoders of the vision-language families: an image → embeddings that take its placeholder tokens'
places in the language model's input (engine/model_runner.py)."""
