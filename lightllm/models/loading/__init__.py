"""Reading checkpoints: safetensors and GGUF files, the catalog of fetchable models, tensor-parallel sharding."""
