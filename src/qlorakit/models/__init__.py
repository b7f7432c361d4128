"""Models: resolve a spec to a folder (built-in models, the GGUF cache), read its shape without weights, load it
as training builds it, and the decoding primitives train and eval share."""
