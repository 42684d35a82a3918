"""The slofleet operator."""
