//! dlbd.
fn main() {}
