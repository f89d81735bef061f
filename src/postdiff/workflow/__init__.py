"""Job plumbing that every stage shares: the Job a rule hands its stage, atomic file I/O, shards, code hashes."""
