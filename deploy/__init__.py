"""How beeldportaal is run: the local platform, the operator CLI, compose and Kubernetes files."""
