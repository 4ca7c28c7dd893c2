//! Sparse feature-activation store (token-major shards, manifest, feature-major copy).
