"""One cycle's decision: the controller interface, the simplex gate, the pure cycle."""
