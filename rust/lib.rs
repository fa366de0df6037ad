//! samopt's native core: pure element-wise kernels over flat slices (f32 and f64), a
//! deterministic chunked scheduler, the memory claims that keep calls from aliasing, and —
//! only with the `python` feature — the PyO3 binding layer that validates a whole call,
//! claims the arrays' memory and releases the GIL.

#[macro_use]
pub mod kernels;
pub mod claims;
pub mod norm;
pub mod parallel;

#[cfg(feature = "python")]
mod bindings;
