"""Zoo recipe: minilm (being written)."""

RECIPES = ()
