"""Pure routing rules: the provider directory and where a permitted study must go."""
