//! samopt's native core: pure element-wise kernels over flat slices (f32 and f64), the
//! base optimizers as specs, the phases that run them over every array of a call, a
//! deterministic chunked scheduler, the memory claims that keep calls from aliasing, the
//! optimizers' native state, and — only with the `python` feature — the PyO3 binding
//! layer that validates a whole call, claims the arrays' memory, releases the GIL and
//! commits each phase before it returns.

#[macro_use]
mod simd;
pub mod claims;
pub mod family;
pub mod flat;
pub mod float;
pub mod kernels;
pub mod layerwise;
pub mod lookahead;
pub mod norm;
pub mod parallel;
pub mod phases;
pub mod prodigy;
pub mod specs;
pub mod specs_elementwise;
pub mod specs_schedule_free;
pub mod state;

#[cfg(feature = "python")]
mod bindings;
