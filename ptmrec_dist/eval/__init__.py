"""Full-ranking evaluation (MMRec protocol), chunked over users."""
