//! Collective benchmarks (filled in below).
