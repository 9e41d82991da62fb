"""Built-in data: a real-text corpus every Python install has."""
