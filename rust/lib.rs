//! samopt's native core: pure element-wise kernels over flat slices (f32 and f64), a
//! deterministic chunked scheduler, and — only with the `python` feature — the PyO3
//! binding layer that validates a whole call, borrows the arrays and releases the GIL.

#[macro_use]
pub mod kernels;
pub mod claims;
pub mod norm;
pub mod parallel;

#[cfg(feature = "python")]
mod bindings;
