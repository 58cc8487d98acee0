"""Looking inside trained models: reconstructions (more analyses come with later issues)."""
