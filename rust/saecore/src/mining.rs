//! One-pass mining of sparse feature activations: statistics, histograms, top-k, quantile samples.
