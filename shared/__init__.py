"""Code both tiers import: wire protocol, settings, errors, feature spec and encoder, registry client."""
