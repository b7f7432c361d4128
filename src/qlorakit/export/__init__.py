"""Exporting trained models: merged Hugging Face folders and GGUF files for llama.cpp."""
