"""The shared core: contracts (schemas, topics, config) and the plumbing every service uses."""
