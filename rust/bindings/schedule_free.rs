//! Schedule-Free AdamW's `eval` and `train`: the parameters moved between the point `y`
//! the steps start from and the average `x`, in one call over every array of the dict,
//! committed (the arrays and the engine's mode) before it returns.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::api::borrow;
use super::arrays::Float;
use super::driver::{prepare, Entry, Groups, Policy, TableRef, Use};
use super::engine::Engine;
use super::optimizer_error;
use crate::kernels::CopyLanes;
use crate::parallel::ByDtype;
use crate::specs::{Kind, ScheduleFreeAdamW, Spec};
use crate::specs_schedule_free::{shift, shift_offsets};

fn shift_lanes<'a, T: Float>(entry: &'a mut Entry<'_, T>) -> (CopyLanes<'a, T>, u32) {
    let group = entry.group;
    let (param, _, states) = entry.lanes();
    let offset = states.into_iter().next().expect("z − y");
    ((param, offset), group)
}

/// Puts the parameters at the average `x` (`to_average`) or back at `y`; nothing when
/// they are there already. Parameters never stepped have `x = y = z`: they do not move,
/// and get zero state.
#[pyfunction]
fn schedule_free_shift(
    py: Python<'_>,
    engine: &Bound<'_, Engine>,
    params: &Bound<'_, PyDict>,
    to_average: bool,
) -> PyResult<()> {
    let mut engine = borrow(engine)?;
    let Engine {
        kind,
        groups,
        assign,
        table,
        order,
        cache,
        averaged,
        ..
    } = &mut *engine;
    if *kind != Kind::ScheduleFreeAdamW {
        let message = "only ScheduleFreeAdamW has an average to move to".to_owned();
        return Err(optimizer_error("kind", message));
    }
    if *averaged == to_average {
        return Ok(());
    }
    // Both slots, so that a parameter never stepped gets the whole state it would have at
    // its first step (zeros: z = y, v = 0) and its entry stays complete for a state dict.
    let uses: Vec<Use> = (0..ScheduleFreeAdamW::SLOTS.len())
        .map(|slot| Use {
            table: 0,
            slot,
            prefix: ScheduleFreeAdamW::SLOTS[slot],
            policy: Policy::Lazy,
        })
        .collect();
    let mut tables = [TableRef { table, cache }];
    let assigned = Groups {
        assign: assign.as_ref().map(|assign| assign.bind(py)),
        count: groups.len(),
    };
    let mut prepared = prepare(
        params,
        Some(order),
        None,
        &mut tables,
        &uses,
        None,
        &assigned,
    )?;
    let offsets = shift_offsets(groups, to_average);
    let items: Vec<_> = prepared
        .lanes(shift_lanes::<f32>, shift_lanes::<f64>)
        .into_iter()
        .map(|item| match item {
            ByDtype::Single((lanes, group)) => (ByDtype::Single(lanes), group),
            ByDtype::Double((lanes, group)) => (ByDtype::Double(lanes), group),
        })
        .collect();
    py.detach(move || shift(items, &offsets));
    prepared.commit(&mut tables);
    *averaged = to_average;
    Ok(())
}

pub fn register(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_function(wrap_pyfunction!(schedule_free_shift, module)?)
}
