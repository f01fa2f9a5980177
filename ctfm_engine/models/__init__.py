"""CT-FM networks and their checkpoints in the Hugging Face layout."""
