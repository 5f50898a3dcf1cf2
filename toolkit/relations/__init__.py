"""``repgeo relations``: the geometry of relations between concepts (analogies, concept crystals) and the
first-order Markov check of a model's direct path."""
