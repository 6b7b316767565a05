"""Small helpers shared by the CLI and the demo."""
