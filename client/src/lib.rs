//! DLB SDK (placeholder while being built).
