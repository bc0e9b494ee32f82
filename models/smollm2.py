"""Zoo recipe: smollm2 (being written)."""

RECIPES = ()
