"""Local mode: the whole control plane on one machine over real vLLM processes (`slofleet up`)."""
