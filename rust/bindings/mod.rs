//! The PyO3 layer. Every optimizer phase is one call over every array of the dict, run by
//! one driver in three stages:
//!
//! 1. with the GIL (`arrays`, `driver::prepare`): check every key, dtype, shape and
//!    layout, claim the memory of every array (parameters written, gradients read: the
//!    same memory under two names, or another call in flight on it, is refused instead of
//!    racing), and take or allocate — fallibly — every state buffer the phase needs;
//! 2. without the GIL (`phases`): the read pass (finiteness, norms), then, only if it
//!    passed, the fused write pass;
//! 3. still inside the call (`driver::Prepared::commit`): write back staged arrays and put
//!    every state change into the optimizer's native state (`engine`) — buffers, step
//!    counters, SAM's pending set — before returning to Python.
//!
//! So an error changes nothing, and an exception that CPython raises as the call returns
//! (Ctrl-C) finds the step done whole. No arithmetic lives here: the formulas are in
//! `specs`, `kernels` and `phases`.

mod api;
mod arrays;
mod driver;
mod engine;
mod family;
mod flat;
mod layerwise;
mod lookahead;
mod prodigy;
mod schedule_free;
mod statedict;

use pyo3::prelude::*;

pyo3::import_exception!(samopt._errors, OptimizerError);
pyo3::import_exception!(samopt._errors, NonFiniteGradientError);
pyo3::import_exception!(samopt._errors, OutOfMemoryError);

fn optimizer_error(key: &str, message: String) -> PyErr {
    OptimizerError::new_err((message, key.to_owned()))
}

/// Sets each parameter group's learning rate (`lr_of` finds it in a group), the
/// optimizer's own first: every base engine's `lrs` setter.
fn assign_lrs<G>(
    groups: &mut [G],
    lrs: Vec<f64>,
    lr_of: impl Fn(&mut G) -> &mut f64,
) -> PyResult<()> {
    if lrs.len() != groups.len() {
        let message = format!("{} groups need as many learning rates", groups.len());
        return Err(optimizer_error("lr", message));
    }
    for (group, lr) in groups.iter_mut().zip(lrs) {
        *lr_of(group) = lr;
    }
    Ok(())
}

fn non_finite_error(key: &str, message: String) -> PyErr {
    NonFiniteGradientError::new_err((message, key.to_owned()))
}

/// A failed allocation of `bytes` for `what` (a state-dict key or a parameter's name).
fn out_of_memory(key: &str, what: &str, bytes: usize) -> PyErr {
    OutOfMemoryError::new_err((
        format!("not enough memory for {what} ({bytes} bytes asked for); nothing was changed"),
        key.to_owned(),
    ))
}

#[pymodule]
fn _core(module: &Bound<'_, PyModule>) -> PyResult<()> {
    api::register(module)?;
    family::register(module)?;
    flat::register(module)?;
    statedict::register(module)?;
    lookahead::register(module)?;
    prodigy::register(module)?;
    schedule_free::register(module)?;
    layerwise::register(module)
}
