"""Code every beeldportaal service shares: event contracts, codec, topics, settings and adapters."""
