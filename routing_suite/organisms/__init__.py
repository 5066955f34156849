"""Built-in model organisms: tiny models with a known, installed eval/deploy behaviour."""
