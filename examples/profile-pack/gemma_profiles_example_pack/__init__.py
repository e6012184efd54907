"""An example gemma-profiles profile pack (see CONTRIBUTING.md in gemma-profiles)."""
