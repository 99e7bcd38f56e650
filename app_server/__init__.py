"""The stateless HTTP tier: validate, encode, route to a worker, answer."""
