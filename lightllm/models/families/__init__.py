"""One file per model family: its descriptor (architecture names, GGUF name, tensor names, config reading) and its
differences from the Llama decoder (models/decoder.py)."""
