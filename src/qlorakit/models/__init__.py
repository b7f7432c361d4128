"""Models: resolve a spec to a folder (with the GGUF cache), read its shape without weights, load it."""
