//! Cosine neighbours of decoder vectors: blocked products with bounded per-row heaps.
