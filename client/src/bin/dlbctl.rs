//! dlbctl.
fn main() {}
