"""Patient text: fact descriptions, summaries, judge screening and sentence embeddings."""
