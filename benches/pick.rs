//! Pick-path benchmarks (being written).
fn main() {}
