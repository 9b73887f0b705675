"""Access to the language model: loading models and tokenizers, and a user's checkpoints."""
