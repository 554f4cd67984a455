//! DLB control plane (placeholder while being built).
