"""Writers, one per format: JSON and JSONL history (:mod:`.serialized`), PNG plots
(:mod:`.plot`), HTML reports (:mod:`.html`)."""
