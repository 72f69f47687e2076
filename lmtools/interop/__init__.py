"""Other tools' formats: Hugging Face folders (export and import), GGUF for llama.cpp."""
